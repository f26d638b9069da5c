"""A model's places held by requests admitted but not yet queued: one Redis hash per model.

Between a request's reservation and its push onto the queue lie its audit
entry and the queue's own round trip (and its policy decision, when the
reservation is the early one); without these places every admission of a burst
read the same queue depth and up to ``GOVGATE_ADMISSION_CONCURRENCY`` of
them passed the check at once (h8 finding 2: thirty requests of one team
took twenty places against a limit of four, and the 2 × limit ceiling then
refused another team that held none).

The admit script (``gateway/limits/scripts.py``) counts the hash's live
fields with the queue, per team in fair mode, and adds the request's field
in the same step as its reservation; the push (``gateway/dispatch/``)
deletes it in the same step as it queues the job, so a request is counted
once, here or in the queue. A request that never reaches the queue gives its
place back with its reservation (an undo or a release, ``FINISH``); one whose
gateway died keeps it only until :data:`ADMITTING_TTL_S` has passed, when the
next admission for the model drops it. docs/architecture.md, "Usage counters".

An early reservation, made before the policy decides, adds no field: a
request the policy denies must never hold a place (probe p2 #1). Its push
counts the hash with the queue, as the admit script does
(``gateway/limits/places_lua.py``), and queues the job only if there is room.

Field: the request id; value: ``"<team field> <expiry, Unix µs>"`` (the team
field empty in fifo mode). Gateways only: workers never read it.
"""

from __future__ import annotations

#: How long a place is held for a request on its way to the queue (s). Admission takes a policy decision
#: (at most ``GOVGATE_POLICY_WAIT_TIMEOUT_S`` + ``GOVGATE_POLICY_TIMEOUT_S``), an audit append and a few Redis
#: calls: far less. A longer one loses its hold, not its request (the queue may then take one more than its
#: limit); a dead gateway's places free themselves after this.
ADMITTING_TTL_S = 60.0


def admitting_key(model: str) -> str:
    """The hash of ``model``'s places held by requests admitted and not yet queued."""
    return f"govgate:admitting:{model}"
