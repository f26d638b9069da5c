"""``kill -HUP`` makes a served gateway reload its policy, with folder polling turned off."""

from __future__ import annotations

import httpx

from tests.conftest import bearer, policy_copy, serving
from workers.contract.registry import TINY_MODEL_NAME


def test_sighup_reloads_the_policy_of_a_running_gateway(settings, worker, keyring, tmp_path):
    import json
    import signal
    import time

    folder = policy_copy(tmp_path)
    own = settings.with_(policy_dir=folder, policy_reload_interval_s=0)  # no polling: only the signal
    with serving(own, tmp_path / "serve.log") as base:
        first = httpx.get(f"{base}/readyz").json()["policy_revision"]
        data = folder / "data.json"
        document = json.loads(data.read_text())
        document["govgate_config"]["roles"]["analyst"]["max_tokens"] = 7
        data.write_text(json.dumps(document))
        time.sleep(0.5)
        unchanged = httpx.get(f"{base}/readyz").json()["policy_revision"]
        base.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/readyz").json()["policy_revision"] == first:
            assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
            time.sleep(0.1)
        response = httpx.post(f"{base}/v1/completions", headers=bearer(keyring["analyst"]), timeout=60,
                              json={"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 50})
    assert unchanged == first  # nothing reloads without the signal when polling is off
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 7
