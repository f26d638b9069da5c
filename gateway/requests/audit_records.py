"""What a request's audit entry records of its prompt and its decision.

Rules about the log, not about serving, hence apart from the request service:
``prompt_logging`` decides how much of the prompt is stored, texts the
policy's detectors found are never stored in clear, a request refused before
any decision keeps no text, and every digest is keyed
(:class:`workers.contract.privacy.Digester`). The texts kept here
(``messages``/``prompt``) are moved into the entry's erasable payload when it
is written (:func:`workers.contract.privacy.split_texts` in the request log),
so the chained body holds only metadata and digests.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec.inspect

from gateway.auth import Principal
from gateway.api_errors import ApiError
from gateway.policy import Decision
from gateway.requests.normalize import normalized_text
from gateway.requests.policy_input import prompt_text, without_prompt
from gateway.requests.purpose import METADATA_PURPOSE
from gateway.requests.schemas import ChatCompletionRequest, CompletionRequest
from gateway.urls import PURPOSE_HEADER
from workers.contract.privacy import HASH, REDACTED, Digester, mask
from workers.contract.sampling import SamplingParams


def decision_for_audit(decision: Decision, digester: Digester) -> dict[str, Any]:
    """The decision as recorded: the texts the detectors found are replaced by their keyed digest.

    The ``redact`` obligation names what must not be stored in clear; storing
    it verbatim beside the redacted prompt would undo the redaction.
    """
    document = decision.to_document()
    redact = document.get("obligations", {}).get("redact")
    if redact:
        document["obligations"]["redact"] = [
            {"detector": item["detector"], "hmac_sha256": digester.hexdigest(item["text"])} for item in redact]
    return document


def logged_prompt(messages: list[dict[str, str]] | None, prompt: str | None, mode: str,
                  redact: list[dict[str, str]], digester: Digester) -> dict[str, Any]:
    """The prompt as the ``prompt_logging`` obligation allows it to be stored.

    ``full`` stores it; ``redacted`` stores it with every text the policy's
    detectors found (the ``redact`` obligation) replaced by
    ``[REDACTED:<detector>]``; ``hash`` stores only a keyed digest of its text.
    The detectors look at the normalised view of the prompt, so a finding
    may be spelt differently in what was sent (a zero-width space inside a
    card number, a number split across messages); when a finding is still
    there after the replacements, the prompt is withheld (only its keyed
    digest is stored), never stored with the finding in it.
    """
    text = prompt_text(messages, prompt)
    if mode == HASH:
        return {"prompt_logging": mode, "prompt_hmac_sha256": digester.hexdigest(text)}
    if mode == REDACTED:
        found = sorted({item.get("detector", "pii") for item in redact})
        masked_messages = [{**m, "content": mask(m["content"], redact)} for m in messages] \
            if messages is not None else None
        masked_prompt = mask(prompt or "", redact) if messages is None else None
        view = normalized_text(masked_messages, masked_prompt)
        if any(item.get("text") and item["text"] in view for item in redact):
            return {"prompt_logging": mode, "redacted": found, "prompt_withheld": True,
                    "prompt_hmac_sha256": digester.hexdigest(text)}
        if masked_messages is not None:
            return {"prompt_logging": mode, "redacted": found, "messages": masked_messages}
        return {"prompt_logging": mode, "redacted": found, "prompt": masked_prompt}
    return {"prompt_logging": mode, **({"messages": messages} if messages is not None else {"prompt": prompt})}


def logged_params(params: SamplingParams, digester: Digester) -> dict[str, Any]:
    """The sampling parameters as the chained body keeps them: the stop sequences as keyed digests.

    Stop sequences are text the client wrote, which ``govgate audit prune``
    could not erase from the chained body and which the policy's content
    rules do not read (they never reach the model): they are kept only as
    their digests, whatever ``prompt_logging`` says. Under ``full`` they were
    also kept as sent in the erasable payload, so a card number written into
    one was kept in clear where the same number in a message would have made
    the level ``redacted`` and been masked: the content rules are the only
    way client text is kept, and they never saw it.
    """
    document = params.to_payload()
    stop = document.pop("stop")
    if stop:
        document["stop_hmac_sha256"] = [digester.hexdigest(text) for text in stop]
    return document


def request_record(*, endpoint: str, principal: Principal, purpose: str | None, stream: bool,
                   params: SamplingParams, requested_max_tokens: int, decision: Decision,
                   admission: dict[str, Any] | None, policy_input: dict[str, Any],
                   messages: list[dict[str, str]] | None, prompt: str | None, digester: Digester) -> dict[str, Any]:
    """The request entry: who asked what of which endpoint, the decision and admission, the prompt as allowed.

    ``admission`` is what the checks after an allow found (None for a
    denied request); ``policy_input`` is stored without its prompt text.
    """
    obligations = decision.obligations
    return {
        "endpoint": endpoint,
        "key_id": principal.key_id,
        "roles": list(principal.roles),
        "purpose": purpose,
        "stream": stream,
        "params": logged_params(params, digester),
        "requested_max_tokens": requested_max_tokens,
        "decision": decision_for_audit(decision, digester),
        "admission": admission,
        "policy_input": without_prompt(policy_input),
        **logged_prompt(messages, prompt, obligations.prompt_logging,
                        [item.to_document() for item in obligations.redact or ()], digester),
    }


#: A quoted value in an error message ('…'): the decoder's messages quote values of the body they refused.
_QUOTED = re.compile(r"'([^']+)'")
#: msgspec's refusal of a value outside a Literal: the value is quoted as is (it may hold a ' itself).
_ENUM_VALUE = re.compile(r"Invalid enum value '.*'(?= - at `|$)", re.DOTALL)


def _field_names(*types: type) -> frozenset[str]:
    """Every field name of ``types`` and of the structs inside them, at any depth."""
    names: set[str] = set()
    pending: list[Any] = list(msgspec.inspect.multi_type_info(types))
    while pending:
        info = pending.pop()
        if isinstance(info, msgspec.inspect.StructType):
            names.update(f.encode_name for f in info.fields)
            pending.extend(f.type for f in info.fields)
        elif isinstance(info, msgspec.inspect.UnionType):
            pending.extend(info.types)
        elif isinstance(info, msgspec.inspect.ListType):
            pending.append(info.item_type)
        elif isinstance(info, msgspec.inspect.DictType):
            pending.append(info.value_type)
        elif isinstance(info, msgspec.inspect.Metadata):
            pending.append(info.type)
    return frozenset(names)


#: The names a completion request's fields have: a ``param`` made of these (and indexes) is the
#: gateway's vocabulary; any other name in it is a key the client wrote, that is text of the body.
KNOWN_FIELDS = _field_names(ChatCompletionRequest, CompletionRequest)
#: A parameter's path: names joined by dots, each name followed by any list indexes (or msgspec's
#: ``[...]``, which stands for a dict's key without naming it).
_PARAM_PATH = re.compile(r"[A-Za-z_]+(?:\[(?:\d+|\.\.\.)\])*(?:\.[A-Za-z_]+(?:\[(?:\d+|\.\.\.)\])*)*")


#: Parameters named by the gateway's own refusals that are not struct fields: the declared purpose's two
#: places (``gateway/requests/purpose.py``). Names, not text of the body: kept as they are.
_GATEWAY_PARAMS = frozenset({METADATA_PURPOSE, PURPOSE_HEADER})


def _known_path(path: str) -> bool:
    return path in _GATEWAY_PARAMS or _PARAM_PATH.fullmatch(path) is not None and all(
        name in KNOWN_FIELDS for name in re.findall(r"[A-Za-z_]+", path))


def logged_param(param: str | None) -> str | None:
    """``param`` as an audit entry keeps it: a name the client made up (an unknown field) becomes ``…``.

    An unknown field's name is a key of the refused body, free text like any
    value in it (``{"my SSN is 123-45-6789": 1}`` is refused naming it): it is
    kept as ``…``, after the known path to it (``messages[0].…``).
    """
    if param is None or _known_path(param):
        return param
    head, _, _ = param.rpartition(".")
    return f"{head}.…" if head and _known_path(head) else "…"


def _without_body_values(error: ApiError, param: str | None) -> str:
    """The error's message with every quoted value elided (``'…'``) but the name of the parameter it is about.

    Messages of the body's decoder quote what they refused ("Invalid enum
    value '…' - at `$.messages[0].role`", "The model '…' does not exist"):
    text of the body, which the client may see and the audit entry must not
    keep. Field names the gateway knows (``param`` as :func:`logged_param`
    keeps it) stay: they say what was wrong.
    """
    if error.logged_message is not None:  # where the message was made, its client text was known
        return error.logged_message
    names = set(re.split(r"[.\[\]]+", param or "")) | {param or ""} | _GATEWAY_PARAMS
    message = _ENUM_VALUE.sub("Invalid enum value '…'", error.message)
    return _QUOTED.sub(lambda m: m.group(0) if m.group(1) in names else "'…'", message)


def rejection_record(endpoint: str, key_id: str, error: ApiError, raw: bytes,
                     digester: Digester) -> dict[str, Any]:
    """The entry of a request refused before a decision: what was wrong, never what was asked.

    No policy has said how much of this body may be kept, so none of it is:
    its size and a keyed digest (to match a client's retries) stand for it.
    """
    return {
        "endpoint": endpoint,
        "key_id": key_id,
        "status": error.status,
        "error": logged_error(error),
        "body_bytes": len(raw),
        "body_hmac_sha256": digester.hexdigest(raw),
    }


def logged_error(error: ApiError) -> dict[str, Any]:
    """A rejection's ``error`` as its entry keeps it: code, the message without the body's values, ``param``."""
    param = logged_param(error.param)
    return {"code": error.code, "message": _without_body_values(error, param), "param": param}
