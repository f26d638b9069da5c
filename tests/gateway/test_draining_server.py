"""``govgate serve``'s server takes any second stop signal as a forced exit, in either order (probe p1 F3).

``govgate up`` stops its API with SIGTERM and passes a second Ctrl-C on as SIGINT; when both are pending at
once Python runs SIGINT's handler first, which uvicorn alone would take as the first signal and the SIGTERM
after it as nothing more.
"""

from __future__ import annotations

import signal

import pytest
import uvicorn

from gateway.drain import Drain
from gateway.serving import DrainingServer


def _server() -> DrainingServer:
    async def app(scope, receive, send) -> None:  # never called: only the signal handling is looked at
        raise AssertionError("not served")
    return DrainingServer(uvicorn.Config(app, lifespan="off"), Drain(60.0))


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM),
                                           (signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT)])
def test_a_second_stop_signal_forces_the_exit(first: int, second: int) -> None:
    server = _server()
    server.handle_exit(first, None)
    assert server.should_exit and not server.force_exit  # the first one drains
    server.handle_exit(second, None)
    assert server.force_exit
