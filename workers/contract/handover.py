"""A finished output's hand-over carried by the take the ack sends (solo pool only).

Why: between two jobs on the solo pool the worker used to send the
hand-over (the fallback's ``HSETNX`` and the report's ``PUBLISH``, one
pipeline) and, at the ack, the next take: two sends, each of which can hand
the core to Redis on a busy two-core machine. Here the job leaves its
hand-over with the transport channel that delivered it
(:meth:`Carrier.carry`); the take the ack sends runs it first, then the
ack's removal of the delivery's bookkeeping, then the pop
(``workers/contract/take.py``): one send between two jobs.

The promises that came with the job's own round trip are kept:

- *the hand-over goes before the removal*: when no take goes out at the ack
  (the channel is not consuming, a poll is already out, the send failed),
  the ack sends the hand-over on its own (:meth:`CarriedHandOver.alone`)
  before it removes the bookkeeping, as the job used to;
- *a hand-over that fails still ends the request, once*: the job's output is
  kept (in ``alone``'s closure) until the take's reply is read. A take that
  Redis refused, failed inside, or whose reply was lost runs ``alone``: the
  idempotent ``HSETNX`` and the report once more (a gateway hears a second
  report only when the take had run and its reply was lost; it records the
  first and drops the other, and a fallback kept again after its gateway
  dropped it is found already recorded by the retry that reaches it), and
  when that is refused too, the job records ``failed``/``output_unchecked``
  itself and delivers that end, as it did before the hand-over rode on the
  take.

A prefork pool process has no channel of its own (the take is its parent's):
its jobs keep their own round trip. Only the delivery under way has a
carrier (:func:`delivering`, set around the solo pool's run of the task), so
nothing else can leave a hand-over with a channel that will not send it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

log = logging.getLogger(__name__)

#: Redis hash of the pending terminal entries (``workers/contract/pending_terminals.py``), where a
#: hand-over keeps its fallback.
PENDING_KEY = "govgate:pending-terminals"


@dataclass(frozen=True)
class CarriedHandOver:
    """One output's hand-over as a take carries it: the fallback kept under ``request_id`` in the pending
    terminals, then ``message`` published on ``reply_to``; ``alone`` sends it on its own, and ends the
    request itself when Redis refuses that too (it never raises)."""

    request_id: str
    fallback: bytes
    reply_to: str
    message: bytes
    alone: Callable[[], None]

    def send_alone(self) -> None:
        """Run :attr:`alone`; a failure there is logged, never raised into the transport."""
        try:
            self.alone()
        except Exception:  # noqa: BLE001 - the consumer must go on; the gateway's own timeout is the last resort
            log.exception("the hand-over of %s could not be completed", self.request_id)


class Carrier(Protocol):
    """What carries a hand-over: the transport channel whose delivery the job is."""

    def carry(self, hand_over: CarriedHandOver) -> None: ...


_current: Carrier | None = None


def current() -> Carrier | None:
    """The channel whose delivery is running in this process now (None outside a solo pool's delivery)."""
    return _current


@contextlib.contextmanager
def delivering(carrier: Carrier) -> Iterator[None]:
    """While a delivery of ``carrier`` is handed to Celery (under the solo pool the task runs inside)."""
    global _current
    previous, _current = _current, carrier
    try:
        yield
    finally:
        _current = previous
