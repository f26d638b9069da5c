"""Texts of a request that reach the audit log or a message outside the prompt and the output.

Stop sequences are client text the detectors never read and that the chained
body (which ``audit prune`` cannot erase) held in clear under every
``prompt_logging`` level, and the erasable payload under ``full``; a refused body's value came back in its ``rejected``
entry through the decoder's message, and an unknown field's name (client text too) as its ``param``; a Redis URL's password was printed by
``govgate up``, ``govgate serve`` and ``govgate keys revoke``.
"""

from __future__ import annotations

import io
import json

import click
import pytest
from hypothesis import given, settings, strategies as st

from gateway.api_errors import ApiError
from gateway.auth import Principal
from gateway.auth.key_changes import KeyChangeAnnouncer
from gateway.policy import Decision
from gateway.requests.audit_records import rejection_record, request_record
from gateway.requests.hidden_models import model_not_found
from gateway.requests.parsing import parse_body
from gateway.requests.schemas import ChatCompletionRequest
from workers.contract.privacy import Digester, split_texts
from workers.contract.sampling import SamplingParams

SECRET = "ZQXSECRET-987-65-4321"
DIGESTER = Digester(b"k" * 32)
PRINCIPAL = Principal(id="hal", team="research", roles=("hasher",), key_id="abc123")


def record(mode: str) -> dict:
    decision = Decision.from_document({"allow": True, "reasons": [], "obligations": {
        "max_tokens": 8, "priority": 5, "prompt_logging": mode, "redact": []}})
    return request_record(endpoint="chat.completions", principal=PRINCIPAL, purpose=None, stream=False,
                          params=SamplingParams(max_tokens=8, stop=(SECRET, "\n\n")), requested_max_tokens=8,
                          decision=decision, admission=None, policy_input={"request": {}},
                          messages=[{"role": "user", "content": "hello"}], prompt=None, digester=DIGESTER)


@pytest.mark.parametrize("mode", ["hash", "redacted", "full"])
def test_stop_sequences_are_kept_as_digests_only_at_every_level(mode: str) -> None:
    # Under full they were kept as sent in the erasable payload: a card number in a stop sequence, which the
    # content rules never read, was kept in clear where one in a message would have been found and masked.
    metadata, texts = split_texts(record(mode))  # what the store chains, and what prune may erase
    assert SECRET not in json.dumps(metadata)
    assert metadata["params"]["stop_hmac_sha256"] == [DIGESTER.hexdigest(SECRET), DIGESTER.hexdigest("\n\n")]
    assert "stop" not in metadata["params"] and "stop" not in metadata
    assert SECRET not in json.dumps(texts) and "stop" not in (texts or {})
    if mode == "full":  # the prompt itself is still kept as sent
        assert texts == {"messages": [{"role": "user", "content": "hello"}]}


def test_no_stop_sequences_leave_no_digests() -> None:
    decision = Decision.from_document({"allow": True, "reasons": [], "obligations": {
        "max_tokens": 8, "priority": 5, "prompt_logging": "full", "redact": []}})
    body = request_record(endpoint="chat.completions", principal=PRINCIPAL, purpose=None, stream=False,
                          params=SamplingParams(max_tokens=8), requested_max_tokens=8, decision=decision,
                          admission=None, policy_input={"request": {}},
                          messages=[{"role": "user", "content": "hello"}], prompt=None, digester=DIGESTER)
    assert "stop" not in body and "stop" not in body["params"] and "stop_hmac_sha256" not in body["params"]


def test_a_rejected_entry_keeps_no_value_the_decoder_quoted() -> None:
    raw = json.dumps({"model": "m", "messages": [{"role": SECRET, "content": "x"}]}).encode()
    with pytest.raises(ApiError) as refused:
        parse_body(raw, ChatCompletionRequest)
    assert SECRET in refused.value.message  # the client is told what it sent
    body = rejection_record("chat.completions", "abc123", refused.value, raw, DIGESTER)
    assert SECRET not in json.dumps(body)
    assert body["error"]["param"] == "messages[0].role" and "Invalid enum value" in body["error"]["message"]


def test_a_rejected_entry_keeps_the_parameter_named() -> None:
    error = ApiError(400, "unsupported_parameter", "Unsupported value of 'messages[0].content[0].type': only text.",
                     param="messages[0].content[0].type")
    record = rejection_record("x", "k", error, b"{}", DIGESTER)["error"]
    assert record["message"] == error.message and record["param"] == error.param


@pytest.mark.parametrize("name,kept", [("logit_bias_x", "…"), (SECRET, "…"), (f"messages[3].{SECRET}", "messages[3].…"),
                                       (f"model.{SECRET}", "model.…"), ("messages[0].x", "messages[0].…")])
def test_a_rejected_entry_keeps_no_name_the_client_made_up(name: str, kept: str) -> None:
    # An unknown field's name was kept as the entry's param and in its message: a key of the body is client text.
    error = ApiError(400, "unsupported_parameter", f"Unsupported parameter: '{name}' is not accepted.", param=name)
    record = rejection_record("x", "k", error, b"{}", DIGESTER)["error"]
    assert record == {"code": "unsupported_parameter", "param": kept,
                      "message": "Unsupported parameter: '…' is not accepted."}


#: Client text that holds every quote mark a message might quote it with, and msgspec's own words.
_AROUND = st.text(alphabet="'\"`\\ -$.[]{}:abx", max_size=6)
_SECRET_TEXT = st.builds(lambda a, b: f"{a}ZQXM{b}", _AROUND, _AROUND)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | _SECRET_TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_SECRET_TEXT, inner, max_size=3),
                     max_leaves=6)


def _bodies() -> st.SearchStrategy[dict]:
    """A chat request with client text (quote marks around a marker) where the decoder refuses it by name
    or value: a made-up field at each level, a role or a part's type outside their choices."""
    def chat(top: dict, message: dict, part: dict) -> dict:
        return {"model": "m", "messages": [{"role": "user", "content": "hi", **message},
                                           {"role": "user", "content": [{"type": "text", "text": "x", **part}]}],
                **top}
    extra = st.dictionaries(_SECRET_TEXT, _JSON, max_size=2)
    return st.one_of(
        st.builds(chat, extra, extra, extra),
        st.builds(lambda role: chat({}, {"role": role}, {}), _SECRET_TEXT),
        st.builds(lambda kind: chat({}, {}, {"type": kind}), _SECRET_TEXT),
        st.builds(lambda options: chat({"stream_options": options}, {}, {}), extra),
        st.builds(lambda metadata: chat({"metadata": metadata}, {}, {}), extra),
    )


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(_bodies())
def test_no_client_text_reaches_a_rejected_entry_whatever_quote_marks_it_holds(document: dict) -> None:
    # The entry elided the client's text by the quote marks around it, so a name or value holding a quote
    # mark itself ("x' card 4539 …", msgspec's "Invalid enum value \"x' …\"") came through in clear.
    raw = json.dumps(document).encode()
    try:
        parse_body(raw, ChatCompletionRequest)
    except ApiError as refused:
        body = rejection_record("chat.completions", "abc123", refused, raw, DIGESTER)
        assert "ZQXM" not in json.dumps(body, ensure_ascii=False), (refused.message, body["error"])


@pytest.mark.parametrize("model", ["x' ZQXM card 4539 1488 0343 6467", "'ZQXM'", "a`ZQXM", '"ZQXM" \\'])
def test_an_unknown_models_name_does_not_reach_its_rejected_entry(model: str) -> None:
    error = model_not_found(model)
    assert model in error.message  # the client is told the name it sent
    body = rejection_record("chat.completions", "abc123", error, b"{}", DIGESTER)
    assert "ZQXM" not in json.dumps(body, ensure_ascii=False)
    assert body["error"]["message"].startswith("The model '…' does not exist")


PASSWORD_URL = "redis://:ZQXPASSWORD@127.0.0.1:1/0"


def test_a_key_change_not_told_does_not_show_the_redis_password() -> None:
    announcer = KeyChangeAnnouncer(PASSWORD_URL)
    announcer("abc123")
    assert announcer.failure is not None and "ZQXPASSWORD" not in announcer.failure


def test_serve_and_up_do_not_show_the_redis_password(settings, tmp_path) -> None:
    from govgate.cli import _check_serve_settings
    from govgate.supervisor import run_up

    own = settings.with_(redis_url=PASSWORD_URL, var_dir=tmp_path / "var")
    with pytest.raises(click.ClickException) as refused:
        _check_serve_settings(own)
    assert "does not answer" in refused.value.message and "ZQXPASSWORD" not in refused.value.message
    out = io.StringIO()
    assert run_up(own, out=out) != 0
    assert "does not answer" in out.getvalue() and "ZQXPASSWORD" not in out.getvalue()
