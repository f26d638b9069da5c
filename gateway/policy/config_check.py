"""The policy's check of its own data, run once per load instead of on every decision.

``data.govgate.config_problems`` depends on the data alone (every role, team,
model and limits entry, not the ones a request touches), so its value is the
same for every request: the engines evaluate it when they load or reload a
policy and refuse one whose data has problems, naming them. The decision
rules can then rely on data that passed the check. Imported by the evaluator
child, so nothing here may pull in more than the standard library.
"""

from __future__ import annotations

from typing import Any

#: The rule whose value is the set of problems of the policy's data (empty when usable).
CONFIG_PROBLEMS_RULE = "data.govgate.config_problems"

#: Problems named in a load error; the rest are counted (a broken file can have hundreds).
MAX_LISTED = 20


def config_refusal(problems: Any) -> str | None:
    """The load error for the value of :data:`CONFIG_PROBLEMS_RULE`, or None for usable data.

    ``problems`` is the rule's JSON value (a set arrives as a list); None
    means the policy defines no such rule, which a policy may leave out.
    Anything but a list of strings is refused too: a check that cannot be
    read has not passed.
    """
    if problems is None:
        return None
    if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
        return f"{CONFIG_PROBLEMS_RULE} is not a set of messages: {str(problems)[:200]}"
    if not problems:
        return None
    listed = sorted(problems)[:MAX_LISTED]
    more = len(problems) - len(listed)
    suffix = f"; and {more} more" if more else ""
    return f"config_error: the policy's data is unusable: {'; '.join(listed)}{suffix}"
