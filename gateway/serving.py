"""``govgate serve``'s server: uvicorn, with the gateway's drain run when it is told to stop.

uvicorn's own graceful stop closes the listening socket, then waits for
open connections (for ever, or ``timeout_graceful_shutdown``, after which
it cancels their tasks: no answer at all), and only then runs the app's
lifespan shutdown, too late to end anything cleanly. So the drain
(``gateway/drain.py``) runs first, while the server still listens: new
requests get a 503 they can act on rather than a refused connection, the
requests in flight get ``GOVGATE_DRAIN_S`` to finish and are then ended
with an answer. uvicorn's own stop follows, with little left to wait for;
its graceful timeout (``gateway/stop_timing.py``) only bounds a connection that
still does not close. A forced stop (a second signal) skips the app's
shutdown; only the closing audit checkpoint is still written
(``gateway/forced_stop.py``).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from gateway.drain import Drain
from gateway.forced_stop import ForcedStop
from gateway.settings import Settings
from gateway.stop_timing import GRACEFUL_S


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose stop drains the gateway first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, forced_stop: ForcedStop | None = None) -> None:
        super().__init__(config)
        self.drain = drain
        self.forced_stop = forced_stop or ForcedStop()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ticks = asyncio.create_task(self._tick_while_stopping())
        try:
            await self.drain.run(forced=lambda: self.force_exit)  # a second Ctrl-C stops waiting
            await super().shutdown(sockets)
        finally:
            ticks.cancel()
        if self.force_exit:  # uvicorn skipped the app's shutdown: what must still run (the closing checkpoint)
            await self.forced_stop.run()

    async def _tick_while_stopping(self) -> None:
        """uvicorn's once-a-second tick (the ``Date`` header its answers carry) while the stop runs.

        uvicorn ticks in its main loop, which has ended once the stop
        begins: every answer of a drain (the 503s, the ends of the requests
        in flight) carried the ``Date`` of its first second, ~23 s old at the
        end of a 20 s drain (probe s54). ``on_tick`` with a count of 0 is
        the tick that renews it; what it says about exiting is not asked.
        """
        while True:
            await asyncio.sleep(1)
            await self.on_tick(0)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """A second stop signal of either kind forces the exit (uvicorn forces only on a SIGINT).

        ``govgate up`` stops its API with SIGTERM and passes a second Ctrl-C
        on as SIGINT (probe p1 F3). When both are pending at once (the second
        Ctrl-C came quickly, or the API was busy), Python runs their handlers
        in signal-number order, SIGINT first: to uvicorn that SIGINT is the
        first signal, and the SIGTERM after it would not force anything.
        """
        if self.should_exit:
            self.force_exit = True
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> None:
    """Run the gateway's app on uvicorn until told to stop, then drain and stop."""
    from gateway.app import create_app
    from gateway.http_head import BoundedHttpToolsProtocol

    drain = Drain(settings.drain_s)
    forced_stop = ForcedStop()
    # log_config=None: uvicorn's own lines go through the handler configured by the caller (JSON too), not its
    # own. loop "auto": uvloop (a dependency, pyproject.toml) where it installs, asyncio's loop elsewhere; http:
    # httptools' parser with the bound on a request's head that uvicorn's h11 protocol has (gateway/http_head.py).
    config = uvicorn.Config(lambda: create_app(settings, freeze_heap=True, drain=drain, forced_stop=forced_stop),
                            factory=True,
                            host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            access_log=False, lifespan="on", log_config=None, loop="auto",
                            http=BoundedHttpToolsProtocol, timeout_graceful_shutdown=GRACEFUL_S,
                            # uvicorn believes forwarded headers from 127.0.0.1 unless told: only from the proxies
                            # the operator names (a local client chose its logged address, probe s56)
                            proxy_headers=bool(settings.forwarded_allow_ips),
                            forwarded_allow_ips=settings.forwarded_allow_ips or "")
    config.load_app()  # as uvicorn.run does: the app is made before the server starts
    server = DrainingServer(config, drain, forced_stop)
    try:
        server.run()
    except KeyboardInterrupt:  # pragma: no cover - uvicorn handles the signals itself
        pass
    if not server.started:  # uvicorn.run's exit code for a failed start (govgate up reports it)
        sys.exit(STARTUP_FAILURE)
