"""Reading a console form: every field once.

A browser sends each of the console's fields once (the keys form's ``roles``
checkboxes are meant to repeat; its text fields are refused on the form
itself, 422, by ``gateway/console/keys.py``). A post that repeats another
(two ``note`` fields on a flag, two ``form_id`` on the key-create form) was
read as its first value and the rest dropped without a word, where the JSON
review and admin APIs refuse it; such a post comes from a tool or a forged
page, so it is refused as a whole with a 400 page naming the field
(:class:`FieldRepeated`), before anything in it is acted on.
"""

from __future__ import annotations

from typing import Any, Final

from litestar import Request

#: Longest field name quoted back on the refusal page (a tool may send any name).
_NAME_SHOWN: Final = 40


class FieldRepeated(Exception):
    """A form field that must come once came more than once."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name if len(name) <= _NAME_SHOWN else name[:_NAME_SHOWN] + "…"


async def read_form(request: Request, *, may_repeat: tuple[str, ...] = ()) -> Any:
    """The posted form (Litestar's multi-dict); :class:`FieldRepeated` if a field not in ``may_repeat`` came
    twice or more."""
    form = await request.form()
    for name in form:
        if name not in may_repeat and len(form.getall(name)) > 1:
            raise FieldRepeated(name)
    return form
