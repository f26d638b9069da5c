"""Choosing the policy engine: an OPA server when one is configured, else the embedded one.

The one place that reads ``opa_url``, so the gateway, the CLI and tests all
make the same choice from the same :class:`Settings`.
"""

from __future__ import annotations

import asyncio

from gateway.policy.engine import EmbeddedPolicyEngine, PolicyEngine
from gateway.settings import Settings


async def open_policy_engine(settings: Settings, *, load_policy: bool = False) -> PolicyEngine:
    """The engine for ``settings``, with ``settings.policy_dir`` loaded and checked.

    With ``settings.opa_url`` set: an :class:`OpaPolicyEngine` on that server.
    By default OPA is expected to have loaded the same folder itself
    (``opa run --server /policies``, as in production), and the gateway only
    proves that OPA holds the folder's revision: ``policies/`` is several
    modules that use each other's rules, which OPA's REST API cannot take one
    at a time into an empty server. ``load_policy=True`` uploads the folder
    instead (fine for an OPA that already holds a version of it).
    Without ``opa_url``: the embedded engine with ``policy_evaluators``
    evaluators, started on a worker thread so that starting them never stalls
    the event loop.
    Raises ``PolicyLoadError`` when the policy cannot be loaded or proven.
    """
    if settings.opa_url:
        from gateway.policy.opa import OpaPolicyEngine  # aiohttp: only a gateway on OPA pays for it

        return await OpaPolicyEngine.connect(settings.opa_url, settings.policy_dir, settings.policy_timeout_s,
                                             load=load_policy, wait_timeout_s=settings.policy_wait_timeout_s)
    return await asyncio.to_thread(EmbeddedPolicyEngine.load, settings.policy_dir, settings.policy_timeout_s,
                                   evaluators=settings.policy_evaluators,
                                   wait_timeout_s=settings.policy_wait_timeout_s, vm=settings.policy_vm,
                                   vm_check_every=settings.policy_vm_check_every)
