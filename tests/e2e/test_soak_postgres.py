"""A short run of ``bench/soak.py --database postgres``: the audit store's own faults while requests run.

The soak starts its own stack (Redis, two workers, two gateways) with the
audit store on a PostgreSQL server of its own (``bench/soak_database.py``),
then terminates every session on the store's database (under the gateways'
pooled and the workers' kept connections), restarts the server (a fast
shutdown, down a few seconds) and crashes it (SIGQUIT, recovered from the
WAL), while ~16 requests are in flight. Meanwhile requests are refused with
503 ``audit_unavailable`` (fail closed), and every promise the soak checks
must hold once it is back: nothing served unaudited, each served output
equal to the audited one, exactly one terminal entry per accepted request, a
chain that verifies, every error OpenAI-shaped and none a 500, no process
dying that the soak did not kill.
"""

from __future__ import annotations

import os

import pytest

from bench.soak import DB_FAULT_KINDS, run_soak
from tests.postgres_server import REQUIRE_ENV, PostgresUnavailable

#: As in tests/e2e/test_soak.py: a request recorded but never queued counts as lost sooner.
REDELIVERY_MARGIN_S = 5.0


@pytest.mark.timeout(480)
def test_a_short_soak_through_the_databases_faults_keeps_every_audit_promise():
    try:
        report = run_soak(requests=300, concurrency=16, faults=DB_FAULT_KINDS, duration_s=180,
                          redelivery_margin_s=REDELIVERY_MARGIN_S, database="postgres")
    except PostgresUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{exc}; {REQUIRE_ENV}=1 requires PostgreSQL")
        pytest.skip(str(exc))
    assert [fault.kind for fault in report.faults] == list(DB_FAULT_KINDS)
    assert report.outcomes["200"] > 0 and report.outcomes["200 stream [DONE]"] > 0
    failed = {name: check.examples for name, check in report.checks.items() if not check.ok}
    assert not failed, report.render()
    assert report.ok
    # the server was away: some requests were refused for it, each recovery ended in a success
    assert report.outcomes["503 audit_unavailable"] > 0, report.outcomes
    assert all(fault.recovery_s is not None for fault in report.faults), report.render()
