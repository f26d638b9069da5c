"""Who sees model names on ``/readyz`` and ``/metrics``: the operator's credential, not anyone who asks.

Why: both answer without a key (load balancers, Docker health checks and
a Prometheus often ask with none), yet ``GET /v1/models`` shows a key only the
models its policy lets it use, and answers a model it may not use as one that
does not exist. A route listing every model of the registry, or labelling
figures with them, would undo that for anyone who can reach the port. So
without a credential they show no model name: ``/readyz`` keeps its status,
its checks and what is missing (``workers``, how many models lack one), and
``/metrics`` sums every per-model series over the models (the ``model`` label
dropped). The per-model view is for:

- ``Authorization: Bearer <GOVGATE_METRICS_TOKEN>``, a token a Prometheus
  is given (checked without the database, so it works through an outage);
- a key with the ``admin`` role (an operator with ``curl``), which may see
  every model anyway (``/v1/models`` shows an admin every queue).

Any other credential is refused rather than quietly given the view without
names: a scrape configured with a wrong token should fail loudly (401 for a
key that is not one, 403 ``admin_forbidden`` for a key without the role).
An admin key that cannot be checked because the database is down gets the
view without names (``/readyz`` then says the database is down), not a 503 in
place of the readiness answer.
"""

from __future__ import annotations

import hmac

from litestar import Request
from litestar.datastructures import State

from gateway.api.dependencies import provide_principal
from gateway.api_errors import ApiError
from gateway.limits.queue_view import ADMIN_ROLE


async def shows_models(request: Request, state: State) -> bool:
    """True when the caller may see model names (see the module's docstring); raises 401/403 for a
    credential that is neither the metrics token nor a key, or a key without the ``admin`` role."""
    given = request.headers.getall("authorization", [])
    if not given:
        return False
    token = state.components.settings.metrics_token
    if token and len(given) == 1:
        scheme, _, presented = given[0].partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode()):
            return True
    try:
        principal = await provide_principal(request, state)
    except ApiError as exc:
        if exc.status == 503:  # the key store is down: the view without names, the checks say why
            return False
        raise
    if ADMIN_ROLE not in principal.roles:
        raise ApiError(403, "admin_forbidden", "Model names on /readyz and /metrics are shown to keys with the "
                       "'admin' role and to GOVGATE_METRICS_TOKEN; ask without a key for the view without them.")
    return True
