"""regorus and OPA judge 600 varied output windows alike (the shipped policy's ``output_decision``).

The case table (``tests/policy_cases/outputs.json``) shows intent on a few
outputs; this shows breadth: windows cut at random places out of texts with
and without personal data, cards, IBANs and key headers (so findings are
often cut in two, as a stream's windows cut them), for every role mix, with
malformed fields now and then. The two engines must give equal documents, and
the draw must hold allows, masks and both kinds of stop.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest

from gateway.policy import OUTPUT_DECISION_RULE
from gateway.policy.unittests import build_engine
from gateway.requests.normalize import normalize
from tests.opa_fixtures import POLICY_DIR, OpaServer
from tests.policy.decision_corpus import ROLES, TEXTS

SIZE = 600
SEED = 12
#: How many differing windows a failure shows in full.
SHOWN = 5


def windows() -> list[dict[str, Any]]:
    """The seeded draw of output-decision inputs."""
    rng = random.Random(SEED)
    drawn = []
    for _ in range(SIZE):
        output = " ".join(rng.sample(TEXTS, rng.randint(1, 4)))
        start = rng.randint(0, len(output) // 2) if rng.random() < 0.5 else 0
        end = rng.randint(start, len(output)) if rng.random() < 0.5 else len(output)
        text = output[start:end]
        document: dict[str, Any] = {
            "principal": {"id": "u-1", "team": "research", "roles": rng.choice(ROLES), "key_id": "k"},
            "model": {"name": "govgate-tiny", "family": "llama", "context_length": 256, "tags": []},
            "request": {"endpoint": "chat.completions", "model": "govgate-tiny", "purpose": None, "stream": True,
                        "max_tokens": 100},
            "decision": {"allow": True, "obligations": {"max_tokens": 100, "prompt_logging": "full",
                                                        "redact": []}},
            "output": {"text": text, "normalized_text": normalize(text), "offset": start, "final": end == len(output)},
        }
        if rng.random() < 0.05:
            document["output"][rng.choice(["text", "normalized_text"])] = rng.choice([None, 5, ["x"]])
        if rng.random() < 0.03:
            del document["output"]
        drawn.append(document)
    return drawn


@pytest.fixture(scope="module")
def opa_url(opa_binary: Any, opa_log_dir: Any) -> Any:
    """An OPA server that loaded ``policies/`` itself, as in production."""
    server = OpaServer(opa_binary, opa_log_dir, POLICY_DIR).start()
    yield server.url
    server.stop()


def test_regorus_and_opa_judge_every_window_alike(opa_url: str) -> None:
    engine = build_engine(POLICY_DIR)
    package_path = "/v1/data/" + OUTPUT_DECISION_RULE.removeprefix("data.").replace(".", "/")
    differing, decisions = [], []
    with httpx.Client(base_url=opa_url, timeout=30.0) as client:
        for index, document in enumerate(windows()):
            engine.set_input_json(json.dumps(document))
            mine = json.loads(engine.eval_rule_as_json(OUTPUT_DECISION_RULE))
            theirs = client.post(package_path, json={"input": document}).json().get("result")
            decisions.append(mine)
            if mine != theirs:
                differing.append(f"window {index} {json.dumps(document['output'])[:300]}: regorus {mine}, OPA {theirs}")
    assert differing == [], f"{len(differing)} windows judged differently:\n" + "\n".join(differing[:SHOWN])
    codes = {reason["code"] for d in decisions for reason in d["reasons"]}
    assert codes == {"output_pii_detected", "output_blocked_content", "invalid_input"}
    assert sum(1 for d in decisions if d["allow"] and d["obligations"]["redact"]) >= 30
    assert sum(1 for d in decisions if d["allow"] and not d["obligations"]["redact"]) >= 30
