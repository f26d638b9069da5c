"""A corpus of 1,200 policy inputs, generated the same way on every run, for decision regression tests.

Rewriting the shipped policy to make it faster must not change one decision.
The bench's 13 inputs (``bench_decisions.json``) and the case tables show
intent; this corpus shows breadth: the bench inputs, every case-table input
that runs on the shipped data, and then inputs drawn at random (seeded)
from small pools of roles, teams, models, purposes, max_tokens, times,
usage counters near and at every limit, prompts with and without personal
data or a private key, and malformed fields of every kind. About half of
the drawn inputs are well formed, so allows, redactions and limits are well
represented, not only ``invalid_input``.

Self-contained on purpose (no ``gateway.requests.normalize``): a change of
the gateway's normalisation must not change the corpus. ``decision_corpus.json``
holds a digest of each decision and model list the shipped policy gave;
``tests/policy/test_decision_corpus.py`` compares. To record a deliberate
change of the policy's answers: ``python -m tests.policy.decision_corpus``
(then review which inputs changed in the test's failure output first).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from bench.policy_inputs import sample_inputs

CASE_DIR = Path(__file__).resolve().parent.parent / "policy_cases"
RECORDED = Path(__file__).resolve().parent / "decision_corpus.json"
SIZE = 1200
SEED = 9

#: Prompts, and their normalised view where the gateway's differs from the text.
TEXTS = [
    "hello", "",
    "Write to jane.doe@example.com or call +44 20 7946 0958; refund to IBAN GB82 WEST 1234 5698 7654 32 today.",
    "Charge card 4111 1111 1111 1111 exp 12/29", "card4111111111111111", "ORD1700000000123", "SSN 123-45-6789",
    "ssn 123 45 6789", "-----BEGIN RSA PRIVATE KEY-----\nMIIEow", "---- begin private key ----",
    "-----BEGIN\nPRIVATE KEY-----", "ip 192.168.100.200 and v1.2.3.4", "call (555) 123-4567 now", "555.123.4567",
    "+15551234567", "4111.1111.1111.1111", "3782.822463.10005", "x@y", "a@b.co and c@d.org and a@b.co",
    "DE89 3704 0044 0532 0130 00 DEUTSCHE", "DE89370400440532013000", "GB82WEST12345698765432x",
    "numbers 1234567890123", "５５５-１２３-４５６７", "tel: 020 7946 0958 and card 5555 5555 5555 4444",
    "mail ops-desk@example.org\nphone 555 123 4567 8", "0000000000000", "12345678901234567890123",
]
NORMALIZED = {"５５５-１２３-４５６７": "555-123-4567"}
CLEAN_TEXTS = TEXTS[:2] + TEXTS[10:13] + ["plain words " * 50]
MODELS: list[Any] = [
    {"name": "govgate-tiny", "family": "llama", "context_length": 256, "tags": []},
    {"name": "big", "family": "llama", "context_length": 8192, "tags": []},
    {"name": "gemma-3-270m", "family": "gemma", "context_length": 8192, "tags": []},
    {"name": "govgate-restricted", "family": "llama", "context_length": 256, "tags": ["restricted"]},
    {"name": "other", "family": "x", "context_length": 1, "tags": ["restricted", "x"]},
    {"name": "big", "tags": "notalist"}, {"name": 5, "tags": []}, {"tags": []},
]
ROLES: list[Any] = [["analyst"], ["admin"], ["viewer"], ["analyst", "admin"], ["bogus"], [], "admin",
                    ["viewer", "analyst"], [5, "analyst"], None]
TEAMS: list[Any] = ["support", "research", "other", None, "", 5]
IDS: list[Any] = ["u-1", "default", None, 7]
PURPOSES: list[Any] = [None, "evaluation", "research", "incident-review", "nope", "", 5]
MAX_TOKENS: list[Any] = [1, 100, 200, 256, 1000, 5000, 0, -1, 1.5, "x", None, 9007199254740993, 128]
TIMES: list[tuple[Any, Any, Any]] = [
    (1699963200000000000, 12, "Tuesday"), (1700000000000000000, 22, "Tuesday"), (1700000000000000000, 5, "Saturday"),
    (1.7e18, 23, "Sunday"), (None, None, None), (1706745599000000000, 23, "Wednesday"),
    (951782400000000000, 0, "Tuesday"), (1700000000000000000, 24, "Funday"), (1700000000000000000, 6.5, "Monday"),
]
COUNTER_VALUES = {
    "requests_last_minute": [3, 119, 120, 599, 600, 0], "tokens_last_minute": [900, 19800, 19999, 99999, 0],
    "tokens_today": [12000, 199900, 199950, 200000, 999999], "tokens_this_month": [150000, 19999999, 20000000],
    "in_flight": [1, 7, 8, 31, 32], "minute_window_frees_in_s": [17, 0, 0.2, 75, -3, "x"],
}
LOW_USAGE = {"requests_last_minute": 3, "tokens_last_minute": 10, "tokens_today": 10, "tokens_this_month": 10,
             "in_flight": 1, "minute_window_frees_in_s": 17}


def _counters(rng: random.Random) -> dict[str, Any]:
    view = {counter: rng.choice(values) for counter, values in COUNTER_VALUES.items()}
    if rng.random() < 0.1:
        view[rng.choice(list(view))] = rng.choice([-1, "7", None, 1e20, 2.5, True])
    if rng.random() < 0.1:
        del view[rng.choice(list(view))]
    return view


def _usage(rng: random.Random) -> Any:
    """A usage snapshot, or "absent", None or a malformed one now and then."""
    roll = rng.random()
    if roll < 0.1:
        return "absent"
    if roll < 0.15:
        return None
    if roll < 0.18:
        return [1]
    usage: dict[str, Any] = {"principal": _counters(rng), "team": _counters(rng)}
    if rng.random() < 0.1:
        usage["team"] = rng.choice([None, "x", {}])
    if rng.random() < 0.05:
        del usage["principal"]
    return usage


def _drawn(rng: random.Random) -> Any:
    """One random input; well formed about half the time."""
    clean = rng.random() < 0.5
    text = rng.choice(TEXTS) if rng.random() < 0.8 else " ".join(rng.sample(TEXTS, 3))
    now, hour, weekday = rng.choice(TIMES[:3] if clean else TIMES)
    principal = {"id": rng.choice(IDS[:2] if clean else IDS), "team": rng.choice(TEAMS[:4] if clean else TEAMS),
                 "roles": rng.choice(ROLES[:4] if clean else ROLES), "key_id": "k"}
    if clean:
        text = rng.choice(CLEAN_TEXTS)
    normalized = " ".join(NORMALIZED.get(part, part) for part in text.split(" "))
    request: dict[str, Any] = {
        "endpoint": "chat.completions", "model": "x", "text": text, "normalized_text": normalized,
        "max_tokens": rng.choice(MAX_TOKENS[:6] if clean else MAX_TOKENS), "stream": False,
        "purpose": rng.choice(PURPOSES[:5] if clean else PURPOSES), "messages": [{"role": "user", "content": text}],
    }
    if rng.random() < 0.05:
        del request["normalized_text"]
    if rng.random() < 0.03:
        request["text"] = 5
    if rng.random() < 0.03:
        request["normalized_text"] = None
    model = copy.deepcopy(rng.choice(MODELS))
    request["model"] = model.get("name")
    document: Any = {"principal": principal, "request": request, "model": model,
                     "time": {"now_ns": now, "hour_utc": hour, "weekday": weekday}}
    if rng.random() < 0.03:
        del document["time"]
    usage = _usage(rng) if not clean else {"principal": dict(LOW_USAGE),
                                            "team": rng.choice([None, dict(LOW_USAGE)])}
    if usage != "absent":
        document["usage"] = usage
    if not clean and rng.random() < 0.02:
        document = rng.choice([{}, {"principal": principal}, {"request": request}, {"principal": 5, "request": "x"}])
    return document


def corpus() -> list[tuple[str, Any]]:
    """(name, input) pairs: the bench inputs, the request cases of the case tables on the shipped data (not the
    output cases: their inputs are output windows), then drawn ones."""
    items: list[tuple[str, Any]] = [(f"bench: {s.name}", s.input) for s in sample_inputs()]
    for path in sorted(CASE_DIR.glob("*.json")):
        items += [(f"case: {path.stem}: {case['name']}", case["input"])
                  for case in json.loads(path.read_text(encoding="utf-8"))
                  if "data" not in case and case.get("entry", "decision") == "decision"]
    rng = random.Random(SEED)
    while len(items) < SIZE:
        items.append((f"drawn: {len(items)}", _drawn(rng)))
    return items


def models_input(document: Any) -> dict[str, Any]:
    """The visible_models input for the same principal, offered every model of the pool."""
    principal = document.get("principal") if isinstance(document, dict) else None
    return {"principal": principal if principal is not None else {}, "models": MODELS}


def digest(value: Any) -> str:
    """A short digest of a JSON value (keys sorted, so engines' key orders do not matter)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record(policy_dir: Path) -> dict[str, dict[str, str]]:
    """Each input's decision and model-list digests on regorus, for ``decision_corpus.json``."""
    from gateway.policy.unittests import build_engine

    engine = build_engine(policy_dir)
    recorded = {}
    for name, document in corpus():
        engine.set_input_json(json.dumps(document))
        decision = json.loads(engine.eval_rule_as_json("data.govgate.decision"))
        engine.set_input_json(json.dumps(models_input(document)))
        models = sorted(json.loads(engine.eval_rule_as_json("data.govgate.visible_models")))
        recorded[name] = {"decision": digest(decision), "visible_models": digest(models)}
    return recorded


if __name__ == "__main__":
    from tests.opa_fixtures import POLICY_DIR

    RECORDED.write_text(json.dumps(record(POLICY_DIR), indent=0, sort_keys=True) + "\n", encoding="utf-8")
    print(f"recorded {SIZE} decisions in {RECORDED}")
