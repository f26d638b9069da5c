"""Container health checks for compose.yaml: ``python deploy/healthcheck.py gateway URL | worker MODEL``.

Why a script and not ``curl``: the govgate image is python:slim, which has no
curl or wget, and a check should ask the service itself, not merely see that a
process exists.

- ``gateway URL``: the gateway answers ``URL`` (its ``/readyz``: Redis, the
  database, the policy engine and a worker per model reachable) with 200.
- ``worker MODEL``: a Celery worker *in this container* (its hostname is
  ``MODEL.<pid>@<container hostname>``, see workers/runtime.py) answers a
  ping through the broker, so the check fails when the worker is wedged or has
  lost Redis, not only when its process is gone.

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
    """None when a worker for ``model`` on this host answers a Celery ping, else why not."""
    redis_url = os.environ.get("GOVGATE_REDIS_URL", "").strip()
    if not redis_url:
        return "GOVGATE_REDIS_URL is not set"
    from workers.contract.celery_config import make_celery

    host = socket.gethostname()
    app = make_celery(redis_url)
    try:
        replies = app.control.ping(timeout=TIMEOUT_S) or []
    except Exception as exc:  # broker down: kombu/redis raise many kinds; all mean unhealthy
        return f"broker unreachable: {type(exc).__name__}"
    finally:
        app.close()
    for reply in replies:
        for name in reply:
            if name.startswith(f"{model}.") and name.endswith(f"@{host}"):
                return None
    return f"no worker for {model} on {host} answered a ping"


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
