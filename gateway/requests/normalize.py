"""The normalised view of prompt text that content rules look at.

A model reads through a zero-width space, a full-width digit or a Cyrillic
"Р" that a pattern would not, so the policy sees, besides the text as sent
(``input.request.text``), this view of it (``input.request.normalized_text``);
:func:`normalize` lists the steps. See docs/architecture.md, section
"gateway/requests and gateway/dispatch".
"""

from __future__ import annotations

import re
import unicodedata

#: Cyrillic and Greek look-alikes of Latin letters (documented as a small fold, not the Unicode list).
CONFUSABLES: dict[str, str] = {
    # Cyrillic capitals
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P",
    "С": "C", "Т": "T", "У": "Y", "Х": "X", "Ѕ": "S", "І": "I", "Ј": "J", "Ԛ": "Q",
    "Ԝ": "W", "Ү": "Y", "Һ": "H", "Ӏ": "I",
    # Cyrillic small letters
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "ѕ": "s",
    "і": "i", "ј": "j", "һ": "h", "ԛ": "q", "ԝ": "w", "ү": "y", "к": "k", "ӏ": "l",
    # Greek capitals
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M",
    "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    # Greek small letters
    "α": "a", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "υ": "u",
    # Cyrillic letters NFKC leaves alone that read as G and V
    "Ԍ": "G", "ԍ": "g", "Ѵ": "V", "ѵ": "v",
    # Latin letters outside ASCII that read as ASCII ones (NFKC keeps "İ" whole)
    "ı": "i", "ɑ": "a", "ɡ": "g", "İ": "I",
    # Latin small capitals (phonetic letters, no language's words): read as capitals
    "ᴀ": "A", "ʙ": "B", "ᴄ": "C", "ᴅ": "D", "ᴇ": "E", "ꜰ": "F", "ɢ": "G", "ʜ": "H", "ɪ": "I",
    "ᴊ": "J", "ᴋ": "K", "ʟ": "L", "ᴍ": "M", "ɴ": "N", "ᴏ": "O", "ᴘ": "P", "ʀ": "R", "ꜱ": "S",
    "ᴛ": "T", "ᴜ": "U", "ᴠ": "V", "ᴡ": "W", "ʏ": "Y", "ᴢ": "Z",
}

_LINE_BREAKS = "\r\x0b\x0c\x85\u2028\u2029"
_INVISIBLE = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}
#: Dashes outside Unicode's dash punctuation, and the horizontal lines of box drawing that draw one.
_DASHES = {"\u2212", "\u2043", "\u02d7", "\ufe63", "\uff0d", "\u2500", "\u2501", "\u23af", "\u2796"}
_DROPPED_CATEGORIES = {"Cc", "Cf", "Mn", "Me"}
_SPACES = re.compile(" {2,}")
#: The fold of every ASCII character that is not kept as is (the fast path for ASCII text).
_ASCII_FOLD: dict[int, str | None] = {code: None for code in [*range(0x20), 0x7f]} | {
    ord("\t"): " ", ord("\n"): "\n", ord("\r"): "\n", 0x0b: "\n", 0x0c: "\n"}


def _fold(char: str) -> str:
    """One character of NFKC text as the normalised view spells it ('' when it is dropped)."""
    if char == "\n":
        return char
    if char in _LINE_BREAKS:
        return "\n"
    if char == "\t":
        return " "
    category = unicodedata.category(char)
    if category == "Zs":
        return " "
    if category in _DROPPED_CATEGORIES or char in _INVISIBLE:
        return ""
    if category == "Nd":
        return str(unicodedata.decimal(char))
    if category == "Pd" or char in _DASHES:
        return "-"
    return CONFUSABLES.get(char, char)


def normalize(text: str) -> str:
    """The normalised view of one text.

    1. Unicode NFKC (full-width and other compatibility forms become their
       plain letters, digits and spaces; NBSP becomes a space);
    2. line breaks (CR LF, CR, VT, FF, NEL, U+2028/9) become ``\\n``;
    3. tabs and every other space separator become a space, and runs of
       spaces one space;
    4. invisible characters are removed: control characters (but ``\\n``),
       format characters (zero-width space/joiners, soft hyphen, BOM, bidi
       controls), combining marks sent as characters of their own (removed
       before NFKC, which would compose "E" and U+0301 into "É"), Hangul fillers and
       the blank Braille pattern;
    5. decimal digits of every script become ASCII digits, and every dash
       (hyphen, en dash, minus sign…, and box drawing's horizontal lines)
       becomes ``-``;
    6. the Cyrillic and Greek letters that look like Latin ones, Latin small
       capitals and ``İ`` (:data:`CONFUSABLES`) become those Latin letters. NFKC leaves them
       alone; this small fold covers the letters the shipped detectors and key
       headers are spelt with, not Unicode's whole confusables list.

    Case is kept (IBAN country codes are capitals; a rule that should ignore
    case says ``(?i)``).
    """
    text = text.replace("\r\n", "\n")
    if text.isascii():  # the common case: no look-ups in the Unicode database
        return _SPACES.sub(" ", text.translate(_ASCII_FOLD))
    # Marks sent as characters of their own go before NFKC could compose them
    # with their letter: "E" + U+0301 is "E", not "É" (a precomposed "É" stays).
    _learn(set(text) - _SEEN)
    text = unicodedata.normalize("NFKC", text.translate(_MARKS))
    _learn(set(text) - _SEEN)
    return _SPACES.sub(" ", text.translate(_CHANGED))


#: Characters already folded, and the translate table of those the fold changes.
_SEEN: set[str] = set()
_CHANGED: dict[int, str] = dict(_ASCII_FOLD)
#: The combining marks seen, each mapped to None (removed before NFKC).
_MARKS: dict[int, None] = {}


def _learn(chars: set[str]) -> None:
    """Fold each character not seen before once, so translate runs on a plain dict."""
    for char in chars:
        folded = _fold(char)
        if folded != char:
            _CHANGED[ord(char)] = folded
        if unicodedata.category(char) in {"Mn", "Me"}:
            _MARKS[ord(char)] = None
    _SEEN.update(chars)


def weight(char: str) -> int:
    """1 for a character the rules see, 0 for one the compact view drops (invisible, space, line break).

    The stream's hold-back (``gateway/requests/holdback.py``) counts its
    characters this way, so that a finding padded with zero-width or space
    characters still fits in the text it holds back. Characters NFKC expands
    count 1: never more than they weigh in the view.
    """
    folded = _WEIGHTS.get(char)
    if folded is None:
        view = normalize(char)
        folded = _WEIGHTS[char] = 0 if view.strip(" \n") == "" else 1
    return folded


_WEIGHTS: dict[str, int] = {}


def normalized_text(messages: list[dict[str, str]] | None, prompt: str | None) -> str:
    """All prompt text normalised: ``input.request.normalized_text``.

    Messages are normalised one by one and joined with a newline, as ``text``
    is; content.rego removes all spacing from this view for rules that must see
    a secret split across messages or lines.
    """
    if messages is not None:
        return "\n".join(normalize(m["content"]) for m in messages)
    return normalize(prompt or "")
