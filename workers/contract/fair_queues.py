"""Fair-share queues: the Redis names the gateway and the workers agree on.

With fair share on, a model's waiting jobs are not one Celery queue but one
per (team, principal): each is an ordinary Celery queue on kombu's Redis
transport (its ten priority lists, ``queue_keys``), so a message, its
acknowledgement and its redelivery are Celery's as before. What changes is
only the order a worker looks at the lists in: the worker's channel
(``workers/contract/kombu_redis.py``) asks Redis for the lists ordered by
how far each team, and within it each principal, is below its share, and
BRPOPs them in that order. See docs/architecture.md, "Fair share".

Names here are the contract; both sides import them and nothing else of
each other. Team and principal names are percent-encoded (no ``:``, which
kombu reads as the priority separator, no ``/``, which separates the parts)
and long ones replaced by ``#`` + SHA-256, so no name can spell another
queue.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import quote

from workers.contract.jobs import queue_for

#: Longest encoded team or principal kept as is in a queue name: every name the key store takes (1-128
#: letters, digits or . _ @ -, the first a letter or digit; '@' is spelt %40) fits, so the waiting hash and
#: the admins' queue view (``GET /v1/models``) name a long team as it is, not as ``#`` + its SHA-256.
_MAX_NAME = 1 + 127 * 3
#: Separates a fair queue's parts: ``model.<model>/<team>/<principal>``.
PART_SEP = "/"
#: Queue mode values (``GOVGATE_QUEUE_MODE``): one FIFO queue per model, or fair share.
MODE_FIFO = "fifo"
MODE_FAIR = "fair"
QUEUE_MODES = (MODE_FIFO, MODE_FAIR)

#: Hash, team → weight (a positive number as text), ``*`` → the weight of a team the policy does not
#: name. Written by gateways from the policy's data on every (re)load; read by the workers' ordering,
#: which looks a team up by its encoded name (:func:`team_field`) and then by its name as is.
SHARES_KEY = "govgate:fair:shares"


def encode_name(name: str) -> str:
    """A team or principal as it appears in queue names and in the fair-share hashes."""
    quoted = quote(name, safe="")
    if len(quoted) <= _MAX_NAME:
        return quoted
    return "#" + hashlib.sha256(name.encode()).hexdigest()  # '#' never appears in a quoted name


def fair_queue(model: str, team: str, principal: str) -> str:
    """The Celery queue (routing key) holding ``principal`` of ``team``'s jobs for ``model``."""
    return PART_SEP.join((queue_for(model), encode_name(team), encode_name(principal)))


@dataclass(frozen=True)
class FairQueue:
    """A fair queue's name read back; ``team`` and ``principal`` as encoded (:func:`encode_name`)."""

    model_queue: str
    team: str
    principal: str


def parse_fair_queue(name: str) -> FairQueue | None:
    """The parts of a fair queue's name (encoded, as in the hashes), or None for any other queue."""
    parts = name.split(PART_SEP)
    if len(parts) != 3 or not parts[0].startswith("model.") or not parts[1] or not parts[2]:
        return None
    return FairQueue(parts[0], parts[1], parts[2])


def registry_key(model: str) -> str:
    """Sorted set of the model's fair lists (the Redis list keys, priority suffix included), scored by the
    time (s) a gateway last pushed to each; the workers' ordering reads it and drops long-idle empty lists."""
    return f"govgate:fair:{model}:lists"


def tags_key(model: str) -> str:
    """Hash of the model's fair-share state: virtual time ``V``, each team's finish tag ``t:<team>``, each
    principal's ``p:<team>/<principal>`` (encoded as in queue names), ``v:<team>`` the team's own virtual
    time, and ``svc`` the running mean service time (ms) of one job."""
    return f"govgate:fair:{model}:tags"


#: Field of :func:`tags_key` that is set (1) while the model's plain lists may hold a job: a worker's take
#: looks at them only then, or once a second (``workers/contract/take.py``).
PLAIN_HINT = "plain"
#: The tags hash's field holding the registry's members (a JSON array), so a take reads them with the
#: tags (one HGETALL) and not the registry; deleted by whoever adds a list (a push registering a new one,
#: a restore), rewritten by the take that reads the registry then and by the recount (workers/contract/take.py).
REGISTRY_COPY = "L"
#: The tags hash's field noting each worker's last fair job taken (worker, request id, team, priority), which
#: a push that turns a list non-empty marks for a look again at its start (``workers/contract/repick.py``).
NOTED_FIELD = "tk"
#: The tags hash's field noting, per worker channel, the last batch of service corrections its takes applied
#: ("<writer> <batch>", the latest few): a take sent again after its reply was lost applies none twice
#: (``workers/contract/take.py``).
APPLIED_FIELD = "cb"


def waiting_key(model: str) -> str:
    """Hash of waiting jobs per team (encoded, :func:`team_field`); the model's total is the sum of the values.
    Raised by each push (and each restore), lowered by each worker pick, and recounted exactly from the
    lists by a worker's pick at most once a second (which heals drift from crashes)."""
    return f"govgate:fair:{model}:waiting"


def wake_key(model: str) -> str:
    """List a gateway pushes a token onto when it registers a new fair list: a worker blocked in BRPOP on
    the old set of lists wakes, discards the token and orders the lists again."""
    return f"govgate:fair:{model}:wake"


#: The team part of the queues (and the field in the hashes) of principals without a team: they share
#: one team's place in the schedule. ``!`` never appears in an encoded name, so no team can spell it.
NO_TEAM = "!"


def team_field(team: str | None) -> str:
    """``team`` as it appears in fair queue names and in the ``waiting``/``tags`` hashes (None: :data:`NO_TEAM`)."""
    return encode_name(team) if team else NO_TEAM  # "" too: an empty part would make no fair queue at all


def job_queue(model: str, team: str | None, principal: str) -> str:
    """The fair queue a job of ``principal`` of ``team`` (None: no team) for ``model`` goes on."""
    return PART_SEP.join((queue_for(model), team_field(team), encode_name(principal) or NO_TEAM))
