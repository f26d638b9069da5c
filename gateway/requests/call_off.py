"""Why an admitted request is ended before its answer, and what its client, its worker and its audit end say.

Three things end a request early: its client goes away, its stopping gateway's drain cuts it
(``gateway/drain.py``), or its API key is revoked while it is in flight (``gateway/auth/revocations.py``).
The paths that end it (a queued job taken back, a running one stopped at its cancel key, a stream's error
event) are the same for all three; only the words differ, and they are here, so that those paths take one
:class:`CallOff` rather than a flag per reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from gateway.api_errors import CLIENT_CLOSED_STATUS, ApiError
from gateway.drain import shutting_down
from workers.contract.jobs import STOP_KEY_REVOKED


@dataclass(frozen=True)
class CallOff:
    """One reason an admitted request ends before its answer."""

    #: A short name, for logs and tests.
    name: str
    #: The error of the ``cancelled`` end the gateway records for a job taken back before a worker took it.
    queued_error: dict[str, str]
    #: The value of the job's cancel key that asks its worker to stop (``workers/contract/jobs.py``).
    cancel_value: bytes
    #: The answer its client gets (``unrecorded``: neither the queue nor the audit store could be reached,
    #: so the job may still run: see :func:`gateway.drain.shutting_down`).
    _answer: Callable[[bool], ApiError]
    #: Whether its worker's ``cancelled`` verdict (a checked stream) says the key was revoked.
    key_revoked: bool = False

    def answer(self, *, unrecorded: bool = False) -> ApiError:
        return self._answer(unrecorded)

    def queued_end(self) -> dict[str, Any]:
        return dict(self.queued_error)


def _client_gone(_unrecorded: bool) -> ApiError:
    # 499, not a 5xx: the client went away (the metrics count it with the client's errors); nobody reads it
    return ApiError(CLIENT_CLOSED_STATUS, "cancelled", "The request was cancelled before it completed.")


def _revoked(unrecorded: bool) -> ApiError:
    message = "The API key of this request was revoked while the request was in flight; the request was ended."
    if unrecorded:
        message += (" The gateway could reach neither the queue to cancel it nor the audit log to record its end, "
                    "so it may still run once they are back.")
    return ApiError(401, "invalid_api_key", message, headers={"WWW-Authenticate": "Bearer"})


#: The client went away (a closed connection).
CLIENT_GONE = CallOff(
    "client_gone", {"code": "cancelled", "message": "the client went away before a worker took the request"},
    b"1", _client_gone)
#: The stopping gateway's drain time was over.
STOPPING = CallOff(
    "stopping", {"code": "cancelled", "message": "the gateway stopped before a worker took the request"},
    b"1", lambda unrecorded: shutting_down(in_flight=True, unrecorded=unrecorded))
#: The request's API key was revoked (answered 401 ``invalid_api_key``, as the key's next request is).
KEY_REVOKED = CallOff(
    "key_revoked",
    {"code": "cancelled", "message": "the request's API key was revoked before a worker took the request"},
    STOP_KEY_REVOKED, _revoked, key_revoked=True)
