"""How long a stopping gateway takes, in a module of its own: ``govgate up``, which must import little (no
uvicorn, no Litestar), derives from it when to give up on the API it stops."""

from __future__ import annotations

from gateway.settings import Settings

#: After the drain's cut, how long it waits for the requests it ended to send their last bytes.
END_WAIT_S = 5.0
#: Then, before the closing audit checkpoint, how long the app waits for the ends (terminal entries) of the
#: requests the cut ended, which their workers record a moment later (``gateway/cut_ends.py``).
CUT_ENDS_WAIT_S = 10.0
#: The same wait at a forced stop (a second Ctrl-C), within its 3 s (``gateway/forced_stop.py``): a worker
#: records the end of a request the cut ended milliseconds after it, and the closing checkpoint signs it then.
FORCED_CUT_ENDS_WAIT_S = 1.5
#: uvicorn's bound (``timeout_graceful_shutdown``) on connections still open after the drain (their tasks are
#: cancelled then).
GRACEFUL_S = 5.0
#: What a stop takes beyond ``GOVGATE_DRAIN_S`` at most: the ended requests' last bytes, uvicorn's bound on
#: connections still open, and the app's own shutdown (closing its parts, the last audit checkpoint).
STOP_MARGIN_S = END_WAIT_S + GRACEFUL_S + CUT_ENDS_WAIT_S + 20.0


def stop_deadline_s(settings: Settings) -> float:
    """How long a stopping API may take before whoever stops it kills it (``govgate up``; a container's grace
    period should be as long): the drain and :data:`STOP_MARGIN_S`."""
    return settings.drain_s + STOP_MARGIN_S
