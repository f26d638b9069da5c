"""Turning a raw request body into a validated request, or a designed error.

Not JSON or not an object: 400; a body that breaks the schema (missing
field, wrong type, out-of-range value): 422 naming the parameter; a parameter
or value govgate does not support: 400 ``unsupported_parameter``; ``metadata``
beyond OpenAI's bounds: 422 ``invalid_value``, as any out-of-range value. See
docs/architecture.md, section "The request path", step 2.
"""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import Any, Callable, TypeVar

import msgspec
import msgspec.inspect

from gateway.requests.schemas import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
)
from gateway.api_errors import ApiError

T = TypeVar("T", ChatCompletionRequest, CompletionRequest)
S = TypeVar("S", bound=msgspec.Struct)

_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING_FIELD = re.compile(r"Object missing required field `(?P<field>[^`]+)`")
#: How msgspec begins the refusal of a field no struct has; the name follows in backticks, as the client
#: wrote it (backticks and quote marks included), up to the path's " - at `$…`" or the message's end.
_UNKNOWN_FIELD_START = "Object contains unknown field `"
#: How msgspec begins the refusal of a value outside a ``Literal`` (or a tagged union's tags); the value
#: follows as Python's ``repr`` writes it (in ``"`` when it holds a ``'``), up to the path or the end.
_VALUE_STARTS = ("Invalid enum value ", "Invalid value ")
#: Values of OpenAI's API that the request shapes leave out on purpose, by where they stand: a valid OpenAI
#: request govgate cannot honour is 400 ``unsupported_parameter`` (README), not 422 "Invalid enum value".
_UNSUPPORTED_VALUES: tuple[tuple[re.Pattern[str], frozenset[str], str], ...] = (
    (re.compile(r"messages\[\d+\]\.role"), frozenset({"tool", "function"}),
     "tool and function messages are not supported (tools and function calling are not)"),
    (re.compile(r"messages\[\d+\]\.content\[\d+\]\.type"),
     frozenset({"image_url", "input_audio", "file", "refusal"}), "only text content parts are supported"),
)

#: Deepest nesting of arrays and objects a request body may have. Checked on
#: the raw bytes before decoding: msgspec (like any recursive parser) recurses
#: once per level and raises ``RecursionError`` near Python's limit, so a deeper
#: body is refused as ``invalid_json`` whatever field holds it. No valid request
#: comes near it (the deepest is ``messages[i].content[j]``, four levels).
MAX_JSON_DEPTH = 64
#: A ``\uD800``–``\uDBFF`` escape (an odd run of backslashes before it: an escape, not escaped text)
#: not followed by the escape of its low half: no character. msgspec reports it as "Input data was
#: truncated", which sends a client looking for a cut-off body.
_LONE_HIGH_SURROGATE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")
#: Brackets as +1 (open) / -1 (close) bytes, everything else deleted.
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")


def json_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep arrays and objects nest in ``raw`` (0 when it cannot exceed ``limit``).

    Brackets inside strings do not count: escaped backslashes and quotes
    are removed first, then every other quote-delimited run is a string.
    Linear and in C but for one ``accumulate`` over the brackets (a 1 MiB
    body of brackets takes tens of milliseconds). For invalid JSON the
    figure may be off, but then the decoder refuses the body anyway.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return 0
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(unescaped.split(b'"')[::2])
    steps = array("b", outside_strings.translate(_BRACKET_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0)


def parse_body(raw: bytes, kind: type[T]) -> T:
    """Decode and validate ``raw`` as ``kind``; raise :class:`ApiError` on any problem."""
    if not raw.strip():
        raise ApiError(400, "invalid_json", "The request body is empty; send a JSON object.")
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise _too_deep()
    try:
        document = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _out_of_range(raw) or ApiError(
            400, "invalid_json", f"The request body is not valid JSON: {_json_problem(raw, exc)}") from None
    except RecursionError:  # the scan above should make this unreachable; never a 500
        raise _too_deep() from None
    if not isinstance(document, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    _refuse_repeats(raw)
    _check_metadata(document.get("metadata"))
    try:
        request = msgspec.convert(document, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from None
    except RecursionError:
        raise _too_deep() from None
    _check_supported(request)
    return request


def _refuse_repeats(raw: bytes) -> None:
    """400 ``invalid_json`` for a body that gives a name twice in one object, as every body is read.

    msgspec keeps the last value, and a proxy, a log or a firewall before
    the gateway may read the first: ``"model"`` twice was served the second
    model, and ``metadata.purpose`` twice got a purpose past the refusal of a
    header that differs from it. ~3 µs for a usual body (0.5 ms for 500 KB).
    The name is client text: the audit entry keeps ``'…'`` (and ``param``
    as ``logged_param`` keeps it).
    """
    repeated = repeated_name(raw)
    if repeated is not None:
        name, path = repeated
        raise ApiError(400, "invalid_json", f"The request body gives '{name}' more than once.", param=path,
                       logged_message="The request body gives '…' more than once.")


def _check_metadata(metadata: Any) -> None:
    """Refuse ``metadata`` beyond OpenAI's bounds: 422 ``invalid_value``, as any out-of-range value.

    Checked on the decoded document, before msgspec (whose constraints on
    the struct could not say which key's value is too long). A key is never quoted (it is text the client wrote, and the
    message goes to the audit entry); a value's key is named in ``param``,
    which the entry keeps as ``metadata.…`` (``metadata.purpose`` as such).
    Anything but an object of strings is left to msgspec (422, a wrong type).
    """
    if not isinstance(metadata, dict):
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ApiError(422, "invalid_value", f"'metadata' holds {len(metadata)} key-value pairs; at most "
                       f"{MAX_METADATA_PAIRS} are accepted.", param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise ApiError(422, "invalid_value", f"A key of 'metadata' has {len(key)} characters; keys may have "
                           f"at most {MAX_METADATA_KEY_CHARS}.", param="metadata")
        if isinstance(value, str) and len(value) > MAX_METADATA_VALUE_CHARS:
            raise ApiError(422, "invalid_value", f"A value of 'metadata' has {len(value)} characters; values may "
                           f"have at most {MAX_METADATA_VALUE_CHARS}.", param=f"metadata.{key}")


def _json_problem(raw: bytes, exc: Exception) -> str:
    """What is wrong with a body the decoder refused, in its words unless they mislead."""
    if str(exc) == "Input data was truncated" and _LONE_HIGH_SURROGATE.search(raw):
        return ("a \\uD800-\\uDBFF escape must be followed by its low surrogate's (\\uDC00-\\uDFFF); "
                "alone it is no character")
    return str(exc)


def _too_deep() -> ApiError:
    return ApiError(400, "invalid_json",
                    f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.")


def _validation_error(message: str) -> ApiError:
    """msgspec's refusal as the client's :class:`ApiError`.

    Where msgspec quotes the client's text (a made-up field's name, a value
    outside a field's choices), the text is found by position, between
    msgspec's fixed opening words and the path it ends with, not by its
    quote marks, which the text may hold itself; the audit entry's
    ``logged_message`` has ``'…'`` there.
    """
    path_match = _PATH.search(message)
    path = path_match.group("path") if path_match else ""
    quoted_end = path_match.start() if path_match else len(message)
    unknown_at = message.find(_UNKNOWN_FIELD_START)
    if unknown_at >= 0:
        name = message[unknown_at + len(_UNKNOWN_FIELD_START):quoted_end]
        name = name[:-1] if name.endswith("`") else name
        field = f"{path}.{name}" if path else name
        return ApiError(400, "unsupported_parameter",
                        f"Unsupported parameter: '{field}' is not accepted by this gateway.", param=field,
                        logged_message="Unsupported parameter: '…' is not accepted by this gateway.")
    start = next((start for start in _VALUE_STARTS if message.startswith(start)), None)
    if start is not None:
        shown = message[len(start):quoted_end]
        value = shown[1:-1] if len(shown) >= 2 and shown[0] == shown[-1] and shown[0] in "'\"" else shown
        for where, values, why in _UNSUPPORTED_VALUES:
            if value in values and where.fullmatch(path):
                return ApiError(400, "unsupported_parameter", f"Unsupported value '{value}' of '{path}': {why}.",
                                param=path)
        return ApiError(422, "invalid_value", f"Invalid request: {message}", param=path or None,
                        logged_message=f"Invalid request: {start}'…'{message[quoted_end:]}")
    missing = _MISSING_FIELD.search(message)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return ApiError(422, "invalid_value", f"Invalid request: {message}", param=path or None)


def _is(value: Any, default: Any) -> bool:
    """``value`` is ``default`` itself, not just equal to it (``0 == False`` in Python)."""
    return type(value) is type(default) and value == default


#: OpenAI fields accepted only with these values (each asks for what govgate
#: does anyway), and what govgate does instead; any other value is a 400.
_ONLY_DEFAULTS: dict[str, tuple[tuple[Any, ...], str]] = {
    "logit_bias": ((None, {}), "token biases are not supported"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "store": ((None, False), "completions are kept in the audit log only"),
    "top_logprobs": ((None, 0), "log probabilities are not returned"),
    "response_format": ((None, {"type": "text"}), "replies are plain text"),
    "tools": ((None, []), "tools and function calling are not supported"),
    "tool_choice": ((None, "none"), "tools and function calling are not supported"),
    "parallel_tool_calls": ((None,), "tools and function calling are not supported"),
    "functions": ((None, []), "tools and function calling are not supported"),
    "function_call": ((None, "none"), "tools and function calling are not supported"),
    "modalities": ((None, ["text"]), "replies are text only"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "audio": ((None,), "replies are text only"),
    "reasoning_effort": ((None,), "the models served do not reason on request"),
    "echo": ((None, False), "the prompt is not echoed"),
    "best_of": ((None, 1), "one candidate is generated per request"),
    "suffix": ((None,), "suffixes (fill-in-the-middle) are not supported"),
}
#: The same for fields of a chat message (an assistant message echoed back from a response).
_MESSAGE_DEFAULTS: dict[str, tuple[tuple[Any, ...], str]] = {
    "refusal": ((None,), "refusals cannot be replayed"),
    "tool_calls": ((None, []), "tools and function calling are not supported"),
    "function_call": ((None,), "tools and function calling are not supported"),
    "audio": ((None,), "messages are text only"),
    "annotations": ((None, []), "annotations are not supported"),
}
#: The same for ``stream_options``.
_STREAM_OPTION_DEFAULTS: dict[str, tuple[tuple[Any, ...], str]] = {
    "include_obfuscation": ((None, False), "stream chunks are not padded against size side channels"),
}
#: ``logprobs`` is a flag in chat and a count in text completions; only "none" is accepted.
_NO_LOGPROBS = {ChatCompletionRequest: (None, False), CompletionRequest: (None,)}


def _check_defaults(owner: Any, table: dict[str, tuple[tuple[Any, ...], str]], prefix: str = "") -> None:
    for field, (accepted, why) in table.items():
        value = getattr(owner, field, None)
        if value is None and accepted[0] is None:  # left out, as nearly always: no comparison to make
            continue
        if not any(_is(value, default) for default in accepted):
            shown = ", ".join("null" if a is None else msgspec.json.encode(a).decode() for a in accepted)
            raise ApiError(400, "unsupported_parameter",
                           f"Unsupported value of '{prefix}{field}': {why} (accepted: {shown}).",
                           param=f"{prefix}{field}")


def _check_supported(request: ChatCompletionRequest | CompletionRequest) -> None:
    _check_defaults(request, {"logprobs": (_NO_LOGPROBS[type(request)], "log probabilities are not returned")})
    _check_defaults(request, _ONLY_DEFAULTS)
    if request.stream_options is not None:
        _check_defaults(request.stream_options, _STREAM_OPTION_DEFAULTS, "stream_options.")
    if isinstance(request, ChatCompletionRequest):
        for i, message in enumerate(request.messages):
            _check_defaults(message, _MESSAGE_DEFAULTS, f"messages[{i}].")
    if request.n != 1:
        raise ApiError(400, "unsupported_parameter", "Only one choice per request is supported ('n' must be 1).",
                       param="n")
    if isinstance(request, CompletionRequest) and isinstance(request.prompt, list) and len(request.prompt) != 1:
        raise ApiError(400, "unsupported_parameter",
                       "Send one prompt per request; batches of prompts are not supported.", param="prompt")


_UNKNOWN_FIELD = re.compile(r"unknown field `(?P<field>[^`]*)`")
_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING_ANY = re.compile(r"missing required field `(?P<field>[^`]*)`")


#: Longest name (of a key given twice, of an object on the path to a number out of range) an error repeats.
_SHOWN_NAME_CHARS = 64


class _RepeatsName(dict):  # type: ignore[type-arg]
    """An object of the body that gives ``name`` more than once (what :func:`repeated_name`'s reading makes
    of it, so that the walk after the reading can say where it stands)."""

    __slots__ = ("name",)

    def __init__(self, pairs: list[tuple[str, Any]], name: str) -> None:
        super().__init__(pairs)
        self.name = name


def repeated_name(raw: bytes) -> tuple[str, str] | None:
    """The first name an object of ``raw`` (valid JSON) gives twice, and its path (``messages[0].role``), or None.

    Python's ``json`` reads the body again with a hook that sees each
    object's pairs before they become a dict (msgspec keeps the last value
    without a word); the hook marks an object that repeats a name, and
    only when one did is the document walked to say where it stands. Both
    the name and the path's keys are the client's text, cut to 64
    characters each.
    """
    repeats = False

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeats
        made = dict(pairs)
        if len(made) == len(pairs):  # the usual case, decided in C
            return made
        repeats = True
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                return _RepeatsName(pairs, name)
            seen.add(name)
        raise AssertionError("unreachable: fewer names than pairs, yet none repeated")

    try:
        document = json.loads(raw, object_pairs_hook=pairs_hook)
    except ValueError:  # what msgspec read, json may still refuse (lone surrogates): not this check's concern
        return None
    if not repeats:
        return None
    found = _first(document, lambda value: isinstance(value, _RepeatsName))
    if found is None:  # unreachable: a marked object is in the document
        return None
    marked, path = found
    name = marked.name[:_SHOWN_NAME_CHARS]
    return name, f"{path}.{name}" if path else name


def _out_of_range(raw: bytes) -> ApiError | None:
    """422 naming the field, for a body whose only fault is a number msgspec cannot hold; else None.

    msgspec's decoder refuses ``1e400`` (past a double) or an integer of
    thousands of digits with "Number out of range - at `$[...]`", the key
    unnamed: it was answered 400 ``invalid_json`` as if the JSON were
    broken. Python's ``json`` reads the body again, each number handed to
    msgspec alone, so that the one it refuses is found and named, as any
    other value out of its field's range is (422 ``invalid_value``).
    """
    def number(text: str) -> Any:
        try:
            return msgspec.json.decode(text)
        except msgspec.DecodeError:
            return _OUT_OF_RANGE

    try:
        document = json.loads(raw, parse_int=number, parse_float=number, parse_constant=not_json_constant)
    except (ValueError, RecursionError):  # broken in another way: the decoder's own words say how
        return None
    found = _first(document, lambda value: value is _OUT_OF_RANGE) if isinstance(document, dict) else None
    if found is None:  # not an object (the caller's "must be a JSON object" says so) or nothing out of range
        return None
    path = found[1]
    return ApiError(422, "invalid_value", f"Invalid request: Number out of range - at `$.{path}`", param=path,
                    logged_message="Invalid request: Number out of range.")


#: What :func:`_out_of_range`'s reading puts in place of a number msgspec does not read (``1e400``, an integer
#: of thousands of digits).
_OUT_OF_RANGE = object()


def not_json_constant(name: str) -> Any:
    """``json`` reads ``NaN`` and ``Infinity``; JSON (and msgspec) does not."""
    raise ValueError(f"{name} is not JSON")


def _first(document: Any, wanted: Callable[[Any], bool]) -> tuple[Any, str] | None:
    """The first value of ``document`` (depth first, in the body's order) ``wanted`` says yes to, and its path
    as errors name it (``messages[0].content``; keys cut to 64 characters), or None."""
    stack: list[tuple[Any, str]] = [(document, "")]
    while stack:
        value, path = stack.pop()
        if wanted(value):
            return value, path
        if isinstance(value, dict):
            stack.extend((item, f"{path}.{key[:_SHOWN_NAME_CHARS]}" if path else key[:_SHOWN_NAME_CHARS])
                         for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]") for index, item in reversed(list(enumerate(value))))
    return None


def decode_struct(raw: bytes, kind: type[S]) -> S:
    """A small JSON-object body (review actions, key administration) as ``kind``, read strictly.

    One reading for every such body, so each refuses the same way: too deep,
    not JSON or not an object → 400 ``invalid_json``; a field the struct does
    not know → 400 ``unsupported_parameter``; a wrong or missing value → 422
    ``invalid_value`` naming it.
    """
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ApiError(400, "invalid_json", "The request body nests too deep.")
    try:
        document = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise _out_of_range(raw) or ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    repeated = repeated_name(raw)
    if repeated is not None:  # msgspec keeps the last; a reader of the body (or a log of it) may see the first
        name, path = repeated
        raise ApiError(400, "invalid_json", f"The request body gives '{name}' more than once.", param=path)
    try:
        return msgspec.convert(document, kind, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        unknown = _UNKNOWN_FIELD.search(message)
        if unknown:
            field = unknown.group("field")[:64]
            raise ApiError(400, "unsupported_parameter", f"Unsupported parameter: '{field}' is not accepted here.",
                           param=field) from None
        missing, path = _MISSING_ANY.search(message), _AT_PATH.search(message)
        param = missing.group("field") if missing else (path.group("path") if path else None)
        if message.startswith(_ENUM_REFUSAL):  # msgspec quotes the value: say what it may be instead
            message = _not_one_of(kind, param)
        raise ApiError(422, "invalid_value", f"Invalid request: {message}", param=param or None) from None


#: How msgspec begins a refusal of a value outside a ``Literal`` (it goes on to quote the value).
_ENUM_REFUSAL = "Invalid enum value"


def _not_one_of(kind: type, param: str | None) -> str:
    """A refusal of a value outside the field's allowed ones that names the field and those values, never
    the value sent (refusals never quote what was refused: it may be anything, a pasted prompt included)."""
    allowed: list[Any] = []
    try:
        info = msgspec.inspect.type_info(kind)
        for field in getattr(info, "fields", ()):
            if field.name == param:
                allowed = list(getattr(field.type, "values", None) or [])
                if not allowed:  # an optional one: Literal[...] | None
                    for member in getattr(field.type, "types", ()):
                        allowed += list(getattr(member, "values", None) or [])
    except Exception:  # noqa: BLE001 (an odd type: the plainer message)
        allowed = []
    where = f"'{param}'" if param else "a value"
    if allowed:
        return f"{where} must be one of {', '.join(repr(v) for v in allowed)}."
    return f"{where} is not one of the values it may take."
