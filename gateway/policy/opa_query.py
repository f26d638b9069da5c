"""One decision query to OPA: strict about builtin errors, and naming what OPA said went wrong.

opa-python-client's ``query_rule`` raises on an error status before reading
the body, so an evaluation error reached the client, the audit and the log
only as "OPA answered HTTP 500": the operator could not tell which rule
failed (the embedded engine names the file and line). Here the error body
is read and summarised by its error codes and locations only
(``eval_conflict_error at custom.rego:12``): OPA's messages may quote the
values a builtin choked on (``to_number: parsing "…"``), which could be a
prompt's text, and an error's summary goes into the audit's reasons.

Every query asks for ``strict-builtin-errors``: by default OPA reads a
builtin error (a division by zero, a type error) as an undefined body, so a
denial rule hitting one did not fire (fail open); strict, OPA answers 500
and the gateway denies, as the embedded interpreter does.
"""

from __future__ import annotations

import json
from typing import Any

from opa_client import AsyncOpaClient

#: Bytes of an error body read at most.
_ERROR_BODY_BYTES = 64 * 1024
#: Errors named in a summary at most.
_ERRORS_NAMED = 3


class OpaQueryError(Exception):
    """OPA answered an error status; ``summary`` its codes and locations ("" when it gave none)."""

    def __init__(self, status: int, summary: str) -> None:
        super().__init__(f"HTTP {status}" + (f": {summary}" if summary else ""))
        self.status = status
        self.summary = summary


async def query_rule(client: AsyncOpaClient, rule: str, input: dict[str, Any]) -> Any:
    """OPA's answer document for ``rule`` (``data.a.b``) on ``input``; raises :class:`OpaQueryError`,
    or aiohttp's errors for a connection that fails."""
    url = f"{client.root_url}/data/{rule.removeprefix('data.').replace('.', '/')}?strict-builtin-errors=true"
    async with client._request("POST", url, json={"input": input}) as response:  # noqa: SLF001 - no public way
        if response.status >= 400:
            raise OpaQueryError(response.status, summary(await response.content.read(_ERROR_BODY_BYTES)))
        return await response.json()


def summary(body: bytes) -> str:
    """``code at file:row`` for each of OPA's errors in an error ``body`` (its top-level code if none)."""
    try:
        document = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(document, dict):
        return ""
    named = []
    errors = document.get("errors")
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict) or not isinstance(error.get("code"), str):
            continue
        location = error.get("location")
        where = ""
        if isinstance(location, dict) and isinstance(location.get("file"), str) and isinstance(location.get("row"), int):
            where = f" at {location['file'].rsplit('/', 1)[-1]}:{location['row']}"
        named.append(_printable(error["code"]) + where)
    if not named and isinstance(document.get("code"), str):
        named.append(_printable(document["code"]))
    more = f" and {len(named) - _ERRORS_NAMED} more" if len(named) > _ERRORS_NAMED else ""
    return "; ".join(named[:_ERRORS_NAMED]) + more


def _printable(code: str) -> str:
    """An error code as a log line may hold it: OPA's are ``snake_case``; anything else is cut short."""
    return "".join(c for c in code[:64] if c.isalnum() or c in "_-.") or "?"
