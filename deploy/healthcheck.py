"""Container health checks for compose.yaml: ``python deploy/healthcheck.py gateway URL | worker MODEL``.

Why a script and not ``curl``: the govgate image is python:slim, which has no
curl or wget, and a check should ask the service itself, not merely see that a
process exists.

- ``gateway URL``: the gateway answers ``URL`` (its ``/readyz``: Redis, the
  database, the policy engine and a worker per model reachable) with 200.
- ``worker MODEL``: a Celery worker *in this container* (its node name is
  ``MODEL.<pid>@<container hostname>``, see workers/runtime.py) is in the
  live-workers set its heartbeat refreshes in Redis every 5 s
  (``workers/contract/liveness.py``), so the check fails when the worker has
  lost Redis or stopped beating, not only when its process is gone. Not a
  Celery ping: a worker on the solo pool (the default) answers none while it
  generates, and a long generation is not ill health (its time limits end a
  stuck one).

Exit status 0 means healthy; anything else is printed in one line (Docker
keeps the last few in ``docker inspect``). Reads ``GOVGATE_REDIS_URL`` like
the worker does; never prints it (it may hold a password).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def check_gateway(url: str) -> str | None:
    """None when ``url`` answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
            return None if reply.status == 200 else f"{url} answered {reply.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except OSError as exc:
        return f"{url} unreachable: {exc}"


def check_worker(model: str) -> str | None:
    """None when a worker for ``model`` on this host is in the live-workers set, else why not."""
    redis_url = os.environ.get("GOVGATE_REDIS_URL", "").strip()
    if not redis_url:
        return "GOVGATE_REDIS_URL is not set"
    import redis

    from workers.contract.liveness import LIVE_SCRIPT, WORKERS_KEY

    host = socket.gethostname()
    client = redis.Redis.from_url(redis_url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
    try:
        live = client.eval(LIVE_SCRIPT, 1, WORKERS_KEY)
    except Exception as exc:  # Redis down or refusing: all mean unhealthy
        return f"redis unreachable: {type(exc).__name__}"
    finally:
        client.close()
    for raw in live or []:
        listed_model, _, name = (raw.decode() if isinstance(raw, bytes) else raw).partition("\n")
        if listed_model == model and name.startswith(f"{model}.") and name.endswith(f"@{host}"):
            return None
    return f"no live worker for {model} on {host} (its heartbeat is missing)"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in {"gateway", "worker"}:
        print("usage: healthcheck.py gateway URL | worker MODEL", file=sys.stderr)
        return 2
    kind, target = argv
    problem = check_gateway(target) if kind == "gateway" else check_worker(target)
    if problem:
        print(f"unhealthy: {problem}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
