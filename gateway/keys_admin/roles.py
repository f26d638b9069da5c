"""Which roles a key may be given: those the policy knows (``govgate_config.roles`` in its data).

A role the policy does not know grants nothing, so a key made with a typo
(``analist``) would work and be refused everything: confusing for its user
and invisible to the admin who made it. ``govgate keys`` and the HTTP key
administration both check here, so they accept and refuse the same roles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


class UnknownRoles(ValueError):
    """No role given, or one the policy does not know; the message lists the known ones."""


class RolesUnreadable(RuntimeError):
    """The policy's files cannot be read, so no role can be checked (a change is refused, not guessed)."""


def policy_roles(policy_dir: Path) -> list[str]:
    """The roles the policy grants anything to, sorted; raises :class:`RolesUnreadable`."""
    from gateway.policy.revision import PolicyFilesError, read_policy

    try:
        config = read_policy(policy_dir).base_data().get("govgate_config", {})
    except PolicyFilesError as exc:
        raise RolesUnreadable(f"cannot read the roles from GOVGATE_POLICY_DIR={policy_dir}: {exc}") from None
    roles = config.get("roles", {}) if isinstance(config, dict) else {}
    return sorted(roles) if isinstance(roles, dict) else []


def checked_roles(roles: Iterable[str], known: list[str], *, none_given: str = "no role given") -> list[str]:
    """``roles`` (in order, once each) if there is at least one and ``known`` has each; else :class:`UnknownRoles`."""
    wanted = list(dict.fromkeys(roles))
    unknown = [role for role in wanted if role not in known]
    if not wanted or unknown:
        what = f"unknown role {', '.join(map(repr, unknown))}" if unknown else none_given
        raise UnknownRoles(f"{what}: a key needs at least one of the roles the policy knows: "
                           f"{', '.join(known) or '(none)'}")
    return wanted
