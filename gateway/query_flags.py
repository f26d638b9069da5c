"""How a yes/no query parameter is spelt, one reading for every endpoint.

The review API's ``include_text`` and the key admin's ``include_revoked``
once read their flags differently (one took ``1`` and ``TRUE``, the other
refused them), so a script that worked on one endpoint failed on the other.
Both now accept the spellings HTTP clients commonly send for a boolean:
``true``/``false`` and ``1``/``0``, in any case; anything else is refused by
the caller with its own error code, never read as false.
"""

from __future__ import annotations

from typing import Final

#: The accepted spellings, lower-cased, and what each means.
FLAG_WORDS: Final = {"true": True, "1": True, "false": False, "0": False}
#: How an error message names the accepted spellings.
FLAG_SPELLINGS: Final = "true or false (or 1 or 0)"


def read_flag(text: str) -> bool | None:
    """What ``text`` says, or None when it is no flag at all (the caller refuses it)."""
    return FLAG_WORDS.get(text.lower())
