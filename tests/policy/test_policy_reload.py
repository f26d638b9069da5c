"""A running gateway takes a changed policy folder and keeps its policy when the new one is broken.

The real app in-process, polling the folder; the reload a signal asks for is
in ``tests/e2e/test_policy_reload_on_sighup.py``.
"""

from __future__ import annotations

import anyio
import pytest
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from tests.conftest import bearer, policy_copy
from workers.contract.registry import TINY_MODEL_NAME

pytestmark = pytest.mark.anyio


def _reloads(result: str) -> float:
    """``govgate_policy_reloads_total{result}`` of this process's registry (the in-process app's)."""
    from gateway.observability.metrics import REGISTRY

    return REGISTRY.get_sample_value("govgate_policy_reloads_total", {"result": result}) or 0.0


async def test_policy_hot_reload_applies_new_rules_and_rejects_broken_ones(settings, worker, keyring, audit_store,
                                                                          tmp_path):
    folder = policy_copy(tmp_path)
    own = settings.with_(policy_dir=folder, policy_reload_interval_s=0.1)
    request = {"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 1}
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        before = await client.post("/v1/completions", headers=bearer(keyring["analyst"]), json=request)
        old_revision = audit_store.entries_for(before.headers["x-govgate-request-id"])[0].policy_revision

        data = folder / "data.json"
        import json
        document = json.loads(data.read_text())
        document["govgate_config"]["roles"]["analyst"]["models"] = []
        data.write_text(json.dumps(document))
        with anyio.fail_after(15):
            while (await client.get("/readyz")).json()["policy_revision"] == old_revision:
                await anyio.sleep(0.1)
        after = await client.post("/v1/completions", headers=bearer(keyring["analyst"]), json=request)
        new_revision = (await client.get("/readyz")).json()["policy_revision"]

        good_text = (folder / "govgate.rego").read_text()
        rejected_before = _reloads("rejected")
        assert (await client.get("/readyz")).json()["policy_rejected_revision"] is None
        (folder / "govgate.rego").write_text(good_text + "\nthis is not rego\n")
        await anyio.sleep(1.0)  # several reload intervals
        still = await client.post("/v1/completions", headers=bearer(keyring["analyst"]), json=request)
        ready = (await client.get("/readyz")).json()
        kept_revision = ready["policy_revision"]
        # probe q3 F3: the refusal is visible beyond the log: ready (the old revision serves), the folder's
        # revision named as rejected (a restart would refuse it), and counted
        assert ready["checks"]["policy"] == "ok" and ready["policy_rejected_revision"] not in (None, kept_revision)
        assert _reloads("rejected") >= rejected_before + 1
        (folder / "govgate.rego").write_text(good_text)  # the folder holds the running revision again
        with anyio.fail_after(15):
            while (await client.get("/readyz")).json()["policy_rejected_revision"] is not None:
                await anyio.sleep(0.1)
    assert before.status_code == 200
    assert after.status_code == 404  # no longer a model the analyst may see: answered as an unknown one
    assert [r["code"] for r in audit_store.entries_for(after.headers["x-govgate-request-id"])[0]
            .body["decision"]["reasons"]] == ["model_not_allowed"]
    denied_entry = audit_store.tail(5)
    assert any(e.policy_revision == new_revision for e in denied_entry) and new_revision != old_revision
    assert still.status_code == 404 and kept_revision == new_revision  # the broken policy was not taken


async def test_a_policy_folder_that_cannot_be_read_is_named_in_readyz_and_counted(settings, worker, keyring,
                                                                                   tmp_path):
    """A ``data.json`` that is not JSON has no revision; a restart would refuse it (probe s54 F2: log only)."""
    folder = policy_copy(tmp_path)
    own = settings.with_(policy_dir=folder, policy_reload_interval_s=0.1)
    request = {"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": 1}
    data = folder / "data.json"
    good = data.read_text()
    async with AsyncTestClient(create_app(own), timeout=60) as client:
        serving = (await client.get("/readyz")).json()["policy_revision"]
        rejected_before = _reloads("rejected")
        data.write_text('{"govgate_config": ')
        with anyio.fail_after(15):
            while (ready := (await client.get("/readyz")).json())["policy_rejected_revision"] is None:
                await anyio.sleep(0.1)
        still = await client.post("/v1/completions", headers=bearer(keyring["analyst"]), json=request)
        assert ready["policy_rejected_revision"] == "unreadable"
        assert ready["checks"]["policy"] == "ok" and ready["policy_revision"] == serving  # the running revision serves
        assert _reloads("rejected") == rejected_before + 1  # once: the same problem is not counted at every poll
        await anyio.sleep(0.5)  # five more polls of the same broken file
        assert _reloads("rejected") == rejected_before + 1
        data.write_text(good)
        with anyio.fail_after(15):
            while (await client.get("/readyz")).json()["policy_rejected_revision"] is not None:
                await anyio.sleep(0.1)
        assert (await client.get("/readyz")).json()["policy_revision"] == serving
    assert still.status_code == 200
