"""Who may read which audit entries, and who may act on them.

Three kinds of caller, decided by the key's roles alone (the policy's
``data.json`` knows ``reviewer`` and ``auditor`` as roles that grant no
model, so a key may hold them beside a role that does):

- ``reviewer``: reads every entry and every text, flags, comments, disposes
  (but never of a request its own principal made: separation of duties);
- ``auditor``: reads every entry and every text, acts on nothing (an
  external auditor must not change what they audit);
- anyone else, admins included: reads only entries they made themselves
  (``principal`` is the caller), never another's, and acts on nothing.

Nobody may update or delete an entry: there is no such route, and the
database refuses it anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gateway.api_errors import ApiError
from gateway.auth import Principal

REVIEWER: Final = "reviewer"
AUDITOR: Final = "auditor"
#: The error code of a refusal by these rules.
FORBIDDEN: Final = "review_forbidden"


@dataclass(frozen=True)
class Access:
    """What one caller may do with the trail."""

    principal: Principal

    @property
    def sees_all(self) -> bool:
        """Reviewers and auditors read every entry; others only their own."""
        return REVIEWER in self.principal.roles or AUDITOR in self.principal.roles

    @property
    def may_act(self) -> bool:
        """Only reviewers flag, comment and dispose."""
        return REVIEWER in self.principal.roles

    def own_principal(self, asked: str | None) -> str | None:
        """The ``principal`` filter a search runs with: the caller's own unless they see all.

        Asking for someone else's entries without the right is a 403 rather
        than an empty answer, so a client does not read "no entries" as "none made".
        """
        if self.sees_all:
            return asked
        if asked is not None and asked != self.principal.id:
            raise ApiError(403, FORBIDDEN, "This key may read only its own principal's audit entries (the "
                           "'reviewer' and 'auditor' roles read all).", param="principal")
        return self.principal.id

    def require_reviewer(self) -> None:
        if not self.may_act:
            raise ApiError(403, FORBIDDEN, "Only a key with the 'reviewer' role may flag, comment on or dispose of "
                           "a request.")

    def require_other_principal(self, action: str, target_principal: str | None) -> None:
        """Refuse a disposition of the caller's own request: a verdict needs a second person.

        Otherwise a key holding ``reviewer`` beside a role that reaches models
        could clear its own denials out of every reviewer's queue with
        ``disposition: ok``. Flags and comments on one's own requests stay
        allowed (reporting oneself is harmless); the request stays in the
        queue for another reviewer.
        """
        if action == "disposition" and target_principal is not None and target_principal == self.principal.id:
            raise ApiError(403, FORBIDDEN, "A reviewer may not dispose of a request their own principal made; "
                           "another reviewer must.")
