"""The official ``openai`` client, unmodified, against ``govgate serve`` (a real uvicorn process)."""

from __future__ import annotations

import openai
import pytest
import redis

from tests.conftest import IDLE_MODEL, policy_copy, serving
from tests.keys_and_limits import limits_for, new_key
from workers.contract.liveness import model_failed_key
from workers.contract.registry import TINY_MODEL_NAME


@pytest.fixture
def sdk(served_api, keyring):
    return lambda role: openai.OpenAI(base_url=f"{served_api}/v1", api_key=keyring[role], max_retries=0)


def test_chat_completion_through_the_sdk(sdk, audit_store):
    client = sdk("analyst")
    completion = client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    again = client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0)
    assert completion.choices[0].message.content == again.choices[0].message.content  # greedy is deterministic
    assert completion.choices[0].message.content.strip()
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    request_id = completion.id.removeprefix("chatcmpl-")
    assert [e.kind for e in audit_store.entries_for(request_id)] == ["request", "completion"]


def test_models_and_completions_through_the_sdk(sdk):
    client = sdk("admin")
    assert TINY_MODEL_NAME in [m.id for m in client.models.list()]
    text = client.completions.create(model=TINY_MODEL_NAME, prompt="Once", max_tokens=4, temperature=0)
    assert text.choices[0].text and text.usage.completion_tokens == 4


def test_sdk_raises_typed_errors(sdk):
    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk("analyst").chat.completions.create(model=TINY_MODEL_NAME,
                                               messages=[{"role": "user", "content": "card 4111 1111 1111 1111"}])
    assert denied.value.code == "policy_denied"
    with pytest.raises(openai.NotFoundError) as hidden:  # a model the viewer may not see: as if it did not exist
        sdk("viewer").chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "x"}])
    assert hidden.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        sdk("admin").chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError):
        sdk("admin").chat.completions.create(model=TINY_MODEL_NAME, messages=[])
    with pytest.raises(openai.AuthenticationError):
        sdk("revoked").models.list()


def test_retrieve_a_model_through_the_sdk(sdk):
    model = sdk("analyst").models.retrieve(TINY_MODEL_NAME)
    assert (model.id, model.object, model.owned_by) == (TINY_MODEL_NAME, "model", "govgate")
    with pytest.raises(openai.NotFoundError) as missing:
        sdk("viewer").models.retrieve(TINY_MODEL_NAME)  # the policy lets viewers use no model
    assert missing.value.code == "model_not_found"
    assert missing.value.response.headers["x-govgate-request-id"]


def test_harmless_defaults_through_the_sdk(sdk):
    """What wrappers around the SDK send by default is served, not refused."""
    completion = sdk("analyst").chat.completions.create(
        model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0,
        logprobs=False, top_logprobs=None, response_format={"type": "text"}, stream_options=None, n=1,
        user="someone", tools=[], tool_choice="none", logit_bias={}, store=False)
    assert completion.choices[0].message.content and completion.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as refused:
        sdk("analyst").chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                               logprobs=True)
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter", "logprobs")
    with pytest.raises(openai.BadRequestError) as image:  # valid OpenAI govgate cannot honour: as for tools
        sdk("analyst").chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]}])
    assert (image.value.code, image.value.param) == ("unsupported_parameter", "messages[0].content[0].type")
    with pytest.raises(openai.UnprocessableEntityError) as out_of_range:  # checked before the policy sees it
        sdk("analyst").chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                               max_tokens=2**53)
    assert (out_of_range.value.code, out_of_range.value.param) == ("invalid_value", "max_tokens")


def test_the_sdk_reads_the_request_id_of_answers_streams_and_errors(sdk, audit_store):
    """OpenAI's clients read a request's id from ``x-request-id`` (a response's ``_request_id``, an error's
    ``request_id``): the gateway sends its id there too, the one its audit entries are filed under."""
    client = sdk("analyst")
    raw = client.chat.completions.with_raw_response.create(
        model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
    completion = raw.parse()
    assert raw.request_id == completion._request_id == completion.id.removeprefix("chatcmpl-")
    assert [e.kind for e in audit_store.entries_for(raw.request_id)] == ["request", "completion"]
    with client.completions.with_streaming_response.create(model=TINY_MODEL_NAME, prompt="Once", max_tokens=2,
                                                           stream=True) as streamed:
        chunks = list(streamed.parse())
    assert streamed.request_id == chunks[0].id.removeprefix("cmpl-")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "x"}], n=2)
    assert refused.value.request_id == refused.value.response.headers["x-govgate-request-id"]
    assert [e.kind for e in audit_store.entries_for(refused.value.request_id)] == ["rejected"]
    with pytest.raises(openai.AuthenticationError) as unknown:  # recorded nowhere, still named in the gateway's log
        sdk("revoked").models.list()
    assert unknown.value.request_id == unknown.value.response.headers["x-govgate-request-id"]


def test_parameters_the_sdk_sends_as_null_mean_their_defaults(sdk):
    """OpenAI's fields are nullable, null meaning the default; the SDK sends ``None`` as null (a wrapper that
    passes ``temperature=settings.get("temperature")``), and such requests were refused 422."""
    client = sdk("analyst")
    hello = [{"role": "user", "content": "Hello"}]
    nulls = client.chat.completions.create(model=TINY_MODEL_NAME, messages=hello, max_tokens=8, seed=7,
                                           temperature=None, top_p=None, n=None, presence_penalty=None,
                                           frequency_penalty=None, stream=None)
    defaults = client.chat.completions.create(model=TINY_MODEL_NAME, messages=hello, max_tokens=8, seed=7,
                                              temperature=1.0, top_p=1.0, n=1, presence_penalty=0,
                                              frequency_penalty=0, stream=False)
    assert nulls.choices[0].message.content == defaults.choices[0].message.content  # sampled alike (seeded)
    assert nulls.usage.completion_tokens == 8
    text = client.completions.create(model=TINY_MODEL_NAME, prompt="Once", max_tokens=2, temperature=None,
                                     top_p=None, n=None, presence_penalty=None, frequency_penalty=None)
    assert text.usage.completion_tokens == 2
    chunks = list(client.chat.completions.create(model=TINY_MODEL_NAME, messages=hello, max_tokens=2,
                                                 stream=True, stream_options={"include_usage": None}))
    assert [c.usage for c in chunks] == [None] * len(chunks)  # null is include_usage's default: false
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


@pytest.mark.parametrize(("user", "max_tokens"), [("outsize", 1), ("outsize-max", 20)],
                         ids=["prompt-and-max-tokens-at-the-reservation", "max-tokens-at-the-policy"])
def test_a_request_over_a_limit_on_its_own_is_not_retried(settings, worker, audit_store, tmp_path, user, max_tokens):
    """A request whose tokens alone exceed a token limit is refused whatever the wait: its prompt and max_tokens
    (refused by the reservation), or its max_tokens alone (refused by the policy). Its 429 said ``Retry-After``,
    and the SDK waited and asked twice more for the same refusal. It now says ``x-should-retry: false`` and no
    ``Retry-After``: the SDK raises at once, one request asked."""
    own = settings.with_(policy_dir=policy_copy(tmp_path, limits_for("principal", user, tokens_per_minute=10)))
    key = new_key(own, user, None)
    with serving(own, tmp_path / "serve.log") as base:
        before = audit_store.head().seq
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key)  # the SDK's default retries
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=TINY_MODEL_NAME, max_tokens=max_tokens,  # the prompt alone is > 10
                                           messages=[{"role": "user", "content": "Hello there, how are you?"}])
        client.close()
    response = refused.value.response
    assert refused.value.code == "rate_limited"
    assert "No wait lets this request pass" in refused.value.message and "fewer tokens" in refused.value.message
    assert "tokens_per_minute is 10" in refused.value.message
    assert response.headers["x-should-retry"] == "false" and "retry-after" not in response.headers
    assert "retry_after_s" not in refused.value.body["reasons"][0]
    asked = [e for e in audit_store.tail(20) if e.seq > before and e.principal == user]
    assert [(e.kind, e.request_id) for e in asked] == [("request", refused.value.request_id)], [
        (e.body.get("admission"), e.body.get("decision")) for e in asked]


def test_stream_options_asking_for_no_obfuscation_are_served(sdk):
    """The SDK's ``stream_options.include_obfuscation``: false asks for what govgate does (no padding) and is
    served (it was a 400); true would ask for padding govgate does not add, and is refused naming it."""
    client = sdk("analyst")
    chunks = list(client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=2, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False}))
    assert chunks[-1].usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "Hello"}],
                                       stream=True, stream_options={"include_obfuscation": True})
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter",
                                                        "stream_options.include_obfuscation")


def test_a_model_only_an_operator_can_mend_is_not_retried(settings, worker, audit_store, tmp_path):
    """Its last worker could not load the model and none lives: 503 ``model_unavailable``. Its ``Retry-After: 60``
    made the SDK wait a minute and ask again, twice: two minutes for a model that nothing but an operator mends.
    It now says ``x-should-retry: false`` too: the SDK raises at once, one request asked."""
    raw = redis.Redis.from_url(settings.redis_url)
    key = new_key(settings, "unmendable", None, roles=("admin",))
    try:
        raw.set(model_failed_key(IDLE_MODEL), "model file /srv/m.gguf is not a valid GGUF file; is it truncated?")
        with serving(settings, tmp_path / "serve.log") as base:  # started after the failure: refuses at once
            before = audit_store.head().seq
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=key)  # the SDK's default retries
            with pytest.raises(openai.InternalServerError) as refused:
                client.chat.completions.create(model=IDLE_MODEL, max_tokens=2,
                                               messages=[{"role": "user", "content": "Hello"}])
            client.close()
    finally:
        raw.delete(model_failed_key(IDLE_MODEL))
        raw.close()
    response = refused.value.response
    assert response.status_code == 503 and refused.value.code == "model_unavailable"
    assert response.headers["x-should-retry"] == "false" and response.headers["retry-after"] == "60"
    asked = [e for e in audit_store.tail(20) if e.seq > before and e.principal == "unmendable"]
    assert [(e.kind, e.request_id) for e in asked] == [("request", refused.value.request_id)]
