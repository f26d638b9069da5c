"""The ``rate_limited`` 429's Retry-After for ``tokens_per_minute``: when this request's tokens fit again.

The policy's figure is when the oldest entry leaves the minute window, right
for ``requests_per_minute`` but not for tokens: with 10 tokens leaving in 10 s
and 170 in 55 s, a 40-token request under a limit of 200 fits only after 55 s,
and a client told 10 s was refused again. On a served gateway whose Redis
holds those entries: once for a principal with no earlier decision (the
gateway asks the counters), once for one whose early reservation already
refused (its reply holds the wait).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import redis.asyncio as aioredis

from gateway.limits import UsageCounters
from workers.backends import ensure_model_file
from workers.contract.registry import load_registry
from tests.conftest import bearer, policy_copy, serving
from tests.e2e.test_queued_disconnect import _until, in_flight_of
from tests.keys_and_limits import new_key
from tests.own_redis import own_redis  # noqa: F401  (fixture)
from tests.redis_monitor import CommandLog
from workers.contract.registry import TINY_MODEL_NAME

LIMIT = 200


def _limits(*users: str):
    def change(config: dict) -> None:
        principals = config.setdefault("limits", {}).setdefault("principals", {})
        for user in users:
            principals[user] = {"requests_per_minute": 1000, "tokens_per_minute": LIMIT, "in_flight": 10}
    return change


async def _fill(redis_url: str, user: str, team: str) -> None:
    """10 tokens that leave the minute in 10 s, 170 that leave it in 55 s."""
    client = aioredis.Redis.from_url(redis_url)
    counters = UsageCounters(client)
    try:
        now = time.time()
        for tokens, age_s in ((10, 50), (170, 5)):
            held = await counters.reserve(f"fill-{os.urandom(4).hex()}", user, team,
                                          {"principal": {"tokens_per_minute": 10**9}}, tokens, now=now - age_s)
            await counters.settle(held, tokens, now=now - age_s)
    finally:
        await client.aclose()


def test_the_429_says_when_the_requests_tokens_fit_not_when_the_oldest_entry_leaves(
        own_redis, tmp_path) -> None:  # noqa: F811
    fresh, known, team = (f"mw-{os.urandom(3).hex()}", f"mw-{os.urandom(3).hex()}", "minute-waiters")
    own = own_redis.with_(queue_mode="fifo", request_timeout_s=120,
                          policy_dir=policy_copy(tmp_path, _limits(fresh, known)))
    keys = {user: new_key(own, user, team) for user in (fresh, known)}
    body = {"model": TINY_MODEL_NAME, "prompt": "Count", "max_tokens": 40}
    seen: dict = {}

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            # ``known`` has an allowed decision first (queued, no worker here; given up), so the gateway
            # reserves early under the same limits the next time.
            first = asyncio.create_task(http.post(f"{base}/v1/completions", headers=bearer(keys[known]),
                                                  json={**body, "max_tokens": 1}))

            async def held() -> bool:
                return (await in_flight_of(own.redis_url, known, team))[0] == 1

            await _until(held, "the allowed request to be queued")
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)

            async def freed() -> bool:
                return (await in_flight_of(own.redis_url, known, team))[0] == 0

            await _until(freed, "the allowed request's slot to be freed")
            for user in (fresh, known):
                await _fill(own.redis_url, user, team)
                seen[user] = await http.post(f"{base}/v1/completions", headers=bearer(keys[user]), json=body)

    with serving(own, tmp_path / "serve.log") as base:
        asyncio.run(scenario(base))
    for user in (fresh, known):
        refused = seen[user]
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "rate_limited" and "tokens_per_minute" in error["message"]
        retry = int(refused.headers["Retry-After"])
        # The 170 tokens leave about 55 s after they were put there (less the seconds this test took since);
        # the oldest entry leaves in 10 s, which the policy alone says.
        assert 30 < retry <= 60, (user, refused.headers, error)
        assert [r["retry_after_s"] for r in error["reasons"] if r["code"] == "rate_limited"] == [retry]


#: The clamping role's ``max_tokens`` (mode ``clamp``, the default): a request asking for more gets this.
CAP = 40
#: What the clamped requests ask for: alone, it is over the limit (the prompt too).
ASKED = 1000


def _clamped(*users: str):
    def change(config: dict) -> None:
        _limits(*users)(config)
        config["roles"]["clamped"] = {"models": [TINY_MODEL_NAME], "max_tokens": CAP}
    return change


async def _fill_clamped(redis_url: str, user: str, team: str) -> None:
    """30 tokens that leave the minute in 10 s, 150 that leave it in 55 s: after 10 s a request of
    prompt + CAP tokens fits (150 + 43 <= 200), one of prompt + ASKED never does."""
    client = aioredis.Redis.from_url(redis_url)
    counters = UsageCounters(client)
    try:
        now = time.time()
        for tokens, age_s in ((30, 50), (150, 5)):
            held = await counters.reserve(f"fill-{os.urandom(4).hex()}", user, team,
                                          {"principal": {"tokens_per_minute": 10**9}}, tokens, now=now - age_s)
            await counters.settle(held, tokens, now=now - age_s)
    finally:
        await client.aclose()


def test_the_wait_of_a_clamped_request_is_for_its_clamped_max_tokens(own_redis, tmp_path) -> None:  # noqa: F811
    """Probe p2 #4: a request asking for 1000 tokens that its role clamps to 40 was told to wait 60 s (a
    request of 1000 + prompt tokens never fits the limit of 200), though it fits once 30 tokens leave
    (10 s), as one asking for 40 is told. Both paths: no earlier decision (the gateway asks the counters),
    and an early reservation made with the snapshot. The message says what the counters need: the
    prompt besides max_tokens."""
    fresh, known, team = (f"mc-{os.urandom(3).hex()}", f"mc-{os.urandom(3).hex()}", "minute-clamped")
    own = own_redis.with_(queue_mode="fifo", request_timeout_s=120,
                          policy_dir=policy_copy(tmp_path, _clamped(fresh, known)))
    keys = {user: new_key(own, user, team, roles=("clamped",)) for user in (fresh, known)}
    body = {"model": TINY_MODEL_NAME, "prompt": "Count", "max_tokens": ASKED}
    seen: dict = {}

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            # ``known`` has an allowed (clamped) decision first, so the next one reserves early
            first = asyncio.create_task(http.post(f"{base}/v1/completions", headers=bearer(keys[known]), json=body))

            async def held() -> bool:
                return (await in_flight_of(own.redis_url, known, team))[0] == 1

            await _until(held, "the allowed request to be queued")
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)

            async def freed() -> bool:
                return (await in_flight_of(own.redis_url, known, team))[0] == 0

            await _until(freed, "the allowed request's slot to be freed")
            for user in (fresh, known):
                await _fill_clamped(own.redis_url, user, team)
                seen[user] = await http.post(f"{base}/v1/completions", headers=bearer(keys[user]), json=body)

    with serving(own, tmp_path / "serve.log") as base:
        asyncio.run(scenario(base))
    for user in (fresh, known):
        refused = seen[user]
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "rate_limited" and "tokens_per_minute" in error["message"]
        retry = int(refused.headers["Retry-After"])
        assert 1 <= retry <= 12, (user, refused.headers, error)  # the 30 tokens leave 10 s after the fill
        assert f"{CAP} tokens" in error["message"] and "prompt" in error["message"], error["message"]


def test_an_allowed_clamped_request_reserves_in_one_call(own_redis, tmp_path) -> None:  # noqa: F811
    """The early reservation was made for the requested max_tokens, so every clamped request's was refused
    (or held too much) and made again for the clamped one: a second call. With the role's cap learnt from
    the principal's last allowed decision, the early one is the reservation."""
    user, team = f"mr-{os.urandom(3).hex()}", "minute-clamped"
    own = own_redis.with_(queue_mode="fifo", request_timeout_s=2,
                          policy_dir=policy_copy(tmp_path, _clamped(user)))
    key = new_key(own, user, team, roles=("clamped",))
    body = {"model": TINY_MODEL_NAME, "prompt": "Count", "max_tokens": ASKED}
    with serving(own, tmp_path / "serve.log") as base:
        first = httpx.post(f"{base}/v1/completions", headers=bearer(key), json=body, timeout=60)
        assert first.status_code == 504, first.text  # admitted, queued, no worker: timed out
        with CommandLog(own.redis_url) as log:
            second = httpx.post(f"{base}/v1/completions", headers=bearer(key), json=body, timeout=60)
    assert second.status_code == 504, second.text
    request_id = second.headers["x-govgate-request-id"]
    # the admit script: its first key is the request's reservation record, and it is asked to "reserve"
    reserving = [words for words in log.sent if words[0] in ("evalsha", "eval") and len(words) > 3
                 and words[3].endswith(f":r:{request_id}") and any(w.strip('"') == "reserve" for w in words)]
    assert len(reserving) == 1, [[w[:40] for w in words] for words in log.sent if words[0] == "evalsha"]


async def _fill_for_a_raised_cap(redis_url: str, user: str, team: str) -> None:
    """35 tokens that leave the minute in 10 s, 105 that leave it in 55 s: prompt + the old cap (40) fits
    now (the tiny model's prompt holds nothing here), prompt + the raised cap (RAISED) only once the 105 have
    left (about 55 s)."""
    client = aioredis.Redis.from_url(redis_url)
    counters = UsageCounters(client)
    try:
        now = time.time()
        for tokens, age_s in ((35, 50), (105, 5)):
            held = await counters.reserve(f"fill-{os.urandom(4).hex()}", user, team,
                                          {"principal": {"tokens_per_minute": 10**9}}, tokens, now=now - age_s)
            await counters.settle(held, tokens, now=now - age_s)
    finally:
        await client.aclose()


#: The clamping role's cap after the reload.
RAISED = 100


def test_the_wait_after_a_reload_raised_the_cap_is_for_the_new_cap(own_redis, tmp_path) -> None:  # noqa: F811
    """Probe q2 F1: the early reservation is made with the cap and limits of the key's last allowed decision.
    After a reload raising the cap it fit (prompt + 40) while the policy denied the request (prompt + 100),
    and the early reservation's fit was taken as "room now": the client was told the policy's figure (10 s,
    the oldest entry's) and refused again when it came back. The wait is the counters' for the new cap."""
    user, team = f"mq-{os.urandom(3).hex()}", "minute-raised"
    folder = policy_copy(tmp_path, _clamped(user))
    own = own_redis.with_(queue_mode="fifo", request_timeout_s=2, policy_dir=folder, policy_reload_interval_s=0.1)
    key = new_key(own, user, team, roles=("clamped",))
    body = {"model": TINY_MODEL_NAME, "prompt": "Count", "max_tokens": ASKED}
    with serving(own, tmp_path / "serve.log") as base:
        first = httpx.post(f"{base}/v1/completions", headers=bearer(key), json=body, timeout=60)
        assert first.status_code == 504, first.text  # allowed (clamped to 40), queued, no worker: timed out
        before = httpx.get(f"{base}/readyz", timeout=30).json()["policy_revision"]
        data_file = folder / "data.json"
        document = json.loads(data_file.read_text())
        document["govgate_config"]["roles"]["clamped"]["max_tokens"] = RAISED
        staged = folder / "data.json.new"
        staged.write_text(json.dumps(document, indent=2))
        staged.replace(data_file)
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/readyz", timeout=30).json()["policy_revision"] == before:
            assert time.monotonic() < deadline, "the raised cap was never loaded"
            time.sleep(0.1)
        asyncio.run(_fill_for_a_raised_cap(own.redis_url, user, team))
        refused = httpx.post(f"{base}/v1/completions", headers=bearer(key), json=body, timeout=60)
        in_flight = asyncio.run(in_flight_of(own.redis_url, user, team))[0]
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "rate_limited" and f"{RAISED} tokens" in error["message"], error
    retry = int(refused.headers["Retry-After"])
    assert 30 < retry <= 60, (refused.headers, error)  # the 105 tokens leave ~55 s after the fill; not 10 s
    assert in_flight == 0  # the early reservation was undone once, nothing left held


#: A role whose cap lets a request ask for more than the model's context (the test registry's 4096).
WIDE = 8000


def _never_limits(user: str, limits: dict):
    def change(config: dict) -> None:
        config.setdefault("limits", {}).setdefault("principals", {})[user] = limits
        config["roles"]["wide"] = {"models": [TINY_MODEL_NAME], "max_tokens": WIDE}
    return change


async def _fill_usage(redis_url: str, user: str, team: str, tokens: int) -> None:
    """One request of ``tokens`` a few seconds ago: in the minute, the day and the month."""
    client = aioredis.Redis.from_url(redis_url)
    counters = UsageCounters(client)
    try:
        now = time.time()
        held = await counters.reserve(f"fill-{os.urandom(4).hex()}", user, team,
                                      {"principal": {"tokens_per_minute": 10**9}}, tokens, now=now - 5)
        await counters.settle(held, tokens, now=now - 5)
    finally:
        await client.aclose()


def test_a_denied_request_that_never_fits_is_told_not_to_retry_and_one_too_long_for_the_model_gets_its_400(
        own_redis, tmp_path) -> None:  # noqa: F811
    """Probe s59 H1: a request whose prompt and max_tokens together exceed a token limit (max_tokens alone does
    not) was denied by the policy from its snapshot with a plain 429 (Retry-After 60 for the minute, until
    midnight for the day), then refused for good after the wait. H3: one whose tokens exceed the model's
    context was told to retry after the minute, then got its 400. Both now get their final answer at once."""
    team = "never-fits"
    minute, day, wide = (f"nf-{os.urandom(3).hex()}" for _ in range(3))
    own = own_redis.with_(queue_mode="fifo", request_timeout_s=120, policy_dir=policy_copy(tmp_path, lambda c: [
        _never_limits(minute, {"tokens_per_minute": 200, "requests_per_minute": 1000})(c),
        _never_limits(day, {"tokens_per_day": 200, "requests_per_minute": 1000})(c),
        _never_limits(wide, {"requests_per_minute": 1, "tokens_per_minute": 10**6})(c)]))
    keys = {user: new_key(own, user, team, roles=("wide",)) for user in (minute, day, wide)}
    spec = load_registry(own.models_file, own.var_dir).get(TINY_MODEL_NAME)
    assert spec is not None
    ensure_model_file(spec)  # the gateway counts prompts with the model's own tokenizer (no worker runs here)
    prompt = " ".join(["word"] * 400)  # some tokens: with max_tokens 195, more than 200 together
    seen: dict = {}

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            for user, used in ((minute, 150), (day, 150), (wide, 1)):
                await _fill_usage(own.redis_url, user, team, used)
            for user in (minute, day):
                seen[user] = await http.post(f"{base}/v1/completions", headers=bearer(keys[user]), json={
                    "model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": 195})
            seen[wide] = await http.post(f"{base}/v1/completions", headers=bearer(keys[wide]), json={
                "model": TINY_MODEL_NAME, "prompt": "Count", "max_tokens": 5000})

    with serving(own, tmp_path / "serve.log") as base:
        asyncio.run(scenario(base))
    for user, code, limit in ((minute, "rate_limited", "tokens_per_minute"), (day, "budget_exceeded",
                                                                              "tokens_per_day")):
        refused = seen[user]
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == code and "No wait lets this request pass" in error["message"], error
        assert f"its principal limit {limit} is 200 and the request alone costs" in error["message"]
        assert refused.headers.get("x-should-retry") == "false" and "retry-after" not in refused.headers
        assert all("retry_after_s" not in reason for reason in error["reasons"])
    too_long = seen[wide]
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens", error
    assert "4096" in error["message"]
