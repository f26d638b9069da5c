"""Rendering console pages: the Jinja environment (autoescaping on), the headers every page carries.

Prompts, outputs, notes and names are untrusted text: autoescape turns
``<script>`` into text, and the Content-Security-Policy allows scripts,
styles and images from the gateway itself only (no inline script or style,
no CDN), so even a markup slip could not run anything. Pages hold prompts
and outputs, so no cache may keep them (``no-store``). Characters that
reorder or hide text (bidi overrides, zero-width spaces) are shown as a
mark by the ``reveal`` filter, so a text reads in the order it was sent.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Final, Mapping

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Template
from litestar.template import TemplateConfig

from gateway import urls
from gateway.console.csrf import FIELD

CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

#: On every console response, pages, static files and error pages alike.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

#: The nav bar: (path, label); the review pages' for reviewers and auditors, the keys page's for admins.
REVIEW_NAV: Final = ((urls.CONSOLE_QUEUE, "Review queue"), (urls.CONSOLE_SEARCH, "Search"),
                     (urls.CONSOLE_USAGE, "Usage"), (urls.CONSOLE_CHAIN, "Chain"))
ADMIN_NAV: Final = ((urls.CONSOLE_KEYS, "Keys"),)


def _when(value: Any) -> str:
    """A time as ``YYYY-MM-DD HH:MM:SS UTC``, anything else as is.

    The zone is written out: a reviewer elsewhere read a bare time as their
    own. Stored times are UTC; one that carries another offset is converted,
    a naive one is taken as UTC (as the store writes them).
    """
    if isinstance(value, str) and len(value) >= 19 and value[10] == "T":
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return f"{value[:10]} {value[11:19]}"
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            try:
                value = value.astimezone(timezone.utc)
            except OverflowError:  # at the calendar's ends: shown with its own offset
                return value.isoformat(" ", "seconds")
        return value.strftime("%Y-%m-%d %H:%M:%S UTC")
    return "" if value is None else str(value)


#: Characters that reorder or hide the text around them without being seen: bidi embeddings, overrides and
#: isolates, zero-width spaces, word joiners, the BOM. A prompt holding U+202E shows "evil gnp.exe" as
#: "exe.png live" ("Trojan Source"), so a reviewer would judge other text than the model was sent.
#: (Zero-width joiners and non-joiners are left alone: emoji and Persian or Indic scripts need them; so is U+FE0F,
#: the emoji presentation selector after most emoji.) Also Unicode's other default-ignorable characters, which a
#: browser draws as nothing but a model's tokenizer reads: the tag characters U+E0000-E007F and the variation
#: selectors (U+FE00-FE0E, U+E0100-E01EF) spell out whole hidden sentences ("ASCII smuggling"); the bidi marks
#: LRM/RLM reorder digits ("1<RLM>-<RLM>2"); soft hyphen, CGJ, Hangul fillers, the Mongolian vowel separator.
HIDDEN_CHARS: Final = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b\u200e\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0e\ufeff\uffa0\ufff0-\ufffb\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")


#: Characters HTML has no place for: the C0 controls other than tab, newline, form feed and carriage return
#: (HTML's whitespace), DEL and the C1 controls. Each is a parse error in a page; a browser turns NUL into
#: U+FFFD or drops it, so the page would not hold what the server meant it to.
CONTROL_CHARS: Final = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
#: What :func:`_reveal` shows as marks: the hidden characters, and the controls, which a page cannot hold (a NUL
#: in a prompt served by a llama.cpp model was drawn as nothing, or as U+FFFD, by the browser).
_MARKED: Final = re.compile(f"{HIDDEN_CHARS.pattern}|{CONTROL_CHARS.pattern}")


def _reveal(value: Any) -> Markup:
    """Untrusted text, escaped, with each hidden or control character shown as a visible mark (``⟨U+202E⟩``)."""
    text = str(escape("" if value is None else str(value)))
    return Markup(_MARKED.sub(lambda found: f'<span class="hidden-char" title="an invisible character">'
                                                 f'\u27e8U+{ord(found.group()):04X}\u27e9</span>', text))




def echoed(values: Mapping[str, str | None]) -> dict[str, str | None]:
    """A form's values as sent, to fill it in again: each control character as U+FFFD (the replacement mark).

    A refused filter keeps the form filled in so it can be corrected, and
    a value refused for holding a NUL went back into the input with the NUL
    in it. The message beside the form still says what was wrong; the
    values as sent still make the query and the page links.
    """
    return {name: None if value is None else CONTROL_CHARS.sub("\ufffd", value) for name, value in values.items()}


def _value(value: Any) -> str:
    """A document's value as JSON (``null``, ``true``, nested objects) rather than Python's ``repr``
    (``None``, ``True``, quotes a reader of the API never sees); a string as is."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("gateway.console", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = _when
    env.filters["reveal"] = _reveal
    env.filters["value"] = _value
    env.globals.update(urls=urls, csrf_field=FIELD)
    return env


TEMPLATE_CONFIG: Final = TemplateConfig(instance=JinjaTemplateEngine(engine_instance=_environment()))


def page(name: str, *, status: int = 200, headers: dict[str, str] | None = None, **context: Any) -> Template:
    """A console page; ``context`` needs ``user`` (None on pages shown signed out)."""
    context.setdefault("user", None)
    context.setdefault("active", None)
    return Template(template_name=name, context=context, status_code=status,
                    headers={**SECURITY_HEADERS, **(headers or {})}, media_type="text/html")
