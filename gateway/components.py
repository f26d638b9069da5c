"""The long-lived parts of a gateway process, built once and closed once.

Built in the app's lifespan (so uvicorn's event loop owns the async Redis
clients) and reached by controllers through ``app.state.components``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator

import redis
import redis.asyncio as aioredis
from sqlalchemy import Engine

from audit import AuditStore
from audit.checkpoint_memory import CheckpointMemory, database_name
from audit.checkpoints import CheckpointStore
from audit.signing import SigningKey, SigningKeyError, load_or_create_signing_key
from gateway.checkpointer import Checkpointer
from gateway.auth import Authenticator, KeyChangeListener, KeyStore, PrincipalCache
from gateway.auth.revocations import AdmittedKeys, revoked_in
from gateway.db_setup import open_database  # noqa: F401  (re-exported: tests and benches import it here)
from gateway.dispatch import Dispatcher, ResultWaiter
from gateway.dispatch.gateway_beat import GatewayBeat
from gateway.dispatch.model_health import ModelHealth
from gateway.limits import UsageCounters
from gateway.policy import PolicyEngine, open_policy_engine
from gateway.policy.reloader import ReloadingPolicyEngine
from gateway.policy.shares import SharePublisher
from gateway.requests.lost_requests import LostRequestSweep, lost_after_s, sweep_lost_requests
from gateway.requests.stale_reservations import end_stale_reservations_forever, stale_after_s
from gateway.requests.unsettled import settle_unsettled_forever
from gateway.requests.output_rules import OutputRules
from gateway.requests.policy_trial import policy_trial
from gateway.requests.service import CompletionService
from gateway.requests.terminal_retry import retry_pending_terminals
from gateway.redis_pool import LeanBlockingConnectionPool
from gateway.resp_pack import fast_packing
from gateway.resp_send import immediate_sending
from gateway.task_stop import stop_tasks
from gateway.settings import Settings
from workers.contract.queue_layout import visibility_timeout_s
from workers.contract.pending_terminals import PendingTerminals
from workers.contract.privacy import Digester
from workers.contract.registry import Registry, load_registry
from workers.contract.sealing import KeyFileError, Sealer, load_or_create_key

log = logging.getLogger(__name__)


@dataclass
class Components:
    settings: Settings
    registry: Registry
    db_engine: Engine
    keys: KeyStore
    audit: AuditStore
    policy: ReloadingPolicyEngine
    redis: aioredis.Redis
    waiter: ResultWaiter
    dispatcher: Dispatcher
    completions: CompletionService
    auth: Authenticator
    #: Also closed by a forced stop, which skips the rest of the shutdown (``gateway/forced_stop.py``).
    checkpointer: Checkpointer | None = None


def warn_if_redelivery_is_late(settings: Settings) -> None:
    """Warn when a dead worker's task would be handed on only after its client stopped waiting."""
    redelivery_s = visibility_timeout_s(settings.generation_time_limit_s, settings.redelivery_margin_s)
    if redelivery_s >= settings.request_timeout_s:
        log.warning("a task redelivered after a worker death comes after the request timeout: it will be "
                    "recorded as expired (keep GOVGATE_GENERATION_TIME_LIMIT_S + 10 s + "
                    "GOVGATE_REDELIVERY_MARGIN_S below GOVGATE_REQUEST_TIMEOUT_S to let it answer)")


def open_keys(settings: Settings) -> tuple[Sealer, Digester, SigningKey]:
    """The gateway's keys (each made if missing); RuntimeError naming the file and what to do otherwise.

    ``govgate serve`` calls it before starting the server too, so a bad key file is one line, not a
    traceback out of the app's startup.
    """
    keys = []
    for variable, path in (("GOVGATE_PAYLOAD_KEY_FILE", settings.effective_payload_key_file),
                           ("GOVGATE_DIGEST_KEY_FILE", settings.effective_digest_key_file)):
        try:
            keys.append(load_or_create_key(path))
        except KeyFileError as exc:
            raise RuntimeError(f"{exc} ({variable}): replace it, or remove it to have a new key made") from None
    sealer, digester = Sealer(keys[0]), Digester(keys[1])
    try:
        signing_key = load_or_create_signing_key(settings.effective_audit_signing_key_file)
    except SigningKeyError as exc:
        raise RuntimeError(f"{exc} (GOVGATE_AUDIT_SIGNING_KEY_FILE): restore the key; a new one cannot vouch "
                           "for the checkpoints already signed") from None
    return sealer, digester, signing_key


#: The least time an in-flight slot is held by its TTL alone (a request that no gateway settles: its gateway
#: killed); the slot is released when the request ends, long before.
MIN_IN_FLIGHT_TTL_S = 900.0


def in_flight_ttl_s(settings: Settings) -> float:
    """How long an in-flight slot outlives a gateway that never settles it: 15 minutes, or the request
    timeout and a minute when that is longer. A fixed 15 minutes let a request allowed to run longer
    (``GOVGATE_REQUEST_TIMEOUT_S`` over 900) stop counting against ``in_flight`` while it still ran (h8)."""
    return max(MIN_IN_FLIGHT_TTL_S, settings.request_timeout_s + 60.0)


def gateway_redis(settings: Settings) -> aioredis.Redis:
    """The gateway's async Redis client: a bounded pool that waits for a free connection (never fails at the
    limit), lends one without locks when no one waits (``gateway/redis_pool.py``), packs commands in one pass
    (``gateway/resp_pack.py``) and writes them in the step that sends them (``gateway/resp_send.py``)."""
    pool = immediate_sending(fast_packing(LeanBlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_max_connections, timeout=5,
        socket_timeout=settings.redis_timeout_s, socket_connect_timeout=min(5.0, settings.redis_timeout_s))))
    return aioredis.Redis(connection_pool=pool)


@contextlib.asynccontextmanager
async def build_components(settings: Settings, *, policy: PolicyEngine | None = None) -> AsyncIterator[Components]:
    """Open everything a gateway needs; ``policy`` lets tests bring another engine."""
    if not settings.redis_url:
        raise RuntimeError("GOVGATE_REDIS_URL is not set: run 'govgate up', or point the gateway at a Redis")
    sealer, digester, signing_key = open_keys(settings)
    registry = load_registry(settings.models_file, settings.var_dir)
    db_engine = open_database(settings)

    async def open_engine() -> PolicyEngine:
        # An OPA server loads the folder itself (opa run --watch); the engine proves it holds the same revision.
        return await open_policy_engine(settings)

    policy = ReloadingPolicyEngine(policy or await open_engine(), open_engine, policy_dir=settings.policy_dir,
                                   interval_s=settings.policy_reload_interval_s, trial=policy_trial(registry))
    client = gateway_redis(settings)
    audit_store = AuditStore(db_engine)

    async def recorded_ends(request_ids: list[str]) -> set[str]:
        def ended() -> set[str]:
            return {request_id for request_id in request_ids if audit_store.terminal_for(request_id) is not None}
        return await asyncio.to_thread(ended)

    waiter = ResultWaiter(client, sealer, recorded_ends=recorded_ends)
    warn_if_redelivery_is_late(settings)
    dispatcher = Dispatcher(client, expires_s=settings.request_timeout_s, sealer=sealer, mode=settings.queue_mode)
    stale_after = stale_after_s(policy_wait_timeout_s=settings.policy_wait_timeout_s,
                                policy_timeout_s=settings.policy_timeout_s,
                                database_busy_timeout_s=settings.database_busy_timeout_s)
    counters = UsageCounters(client, in_flight_ttl_s=in_flight_ttl_s(settings), record_wait_s=stale_after)
    pending_client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    pending = PendingTerminals(pending_client, horizon_s=settings.terminal_retry_horizon_s,
                               seal=sealer.seal, unseal=sealer.unseal)
    model_health = ModelHealth(client, registry.names())
    keys = KeyStore(db_engine)
    lost_after = lost_after_s(settings.request_timeout_s, settings.generation_time_limit_s,
                              settings.redelivery_margin_s)
    admitted_keys = AdmittedKeys(revoked_in(keys))
    completions = CompletionService(
        registry=registry, policy=policy, audit=audit_store, dispatcher=dispatcher, waiter=waiter,
        redis=client, counters=counters, default_max_tokens=settings.default_max_tokens,
        request_timeout_s=settings.request_timeout_s, max_queued_per_model=settings.max_queued_per_model,
        digester=digester, pending=pending, queue_mode=settings.queue_mode,
        admission_concurrency=settings.admission_concurrency, admission_wait_s=settings.policy_wait_timeout_s,
        output_rules=OutputRules(policy=policy, redis=client, sealer=sealer,
                                 holdback_chars=settings.output_holdback_chars) if settings.output_rules else None,
        model_health=model_health, timeout_grace_s=settings.timeout_grace_s,
        end_retry_interval_s=settings.terminal_retry_interval_s, end_retry_horizon_s=settings.terminal_retry_horizon_s,
        admitted_keys=admitted_keys, lost_after_s=lost_after)
    retrier = asyncio.create_task(retry_pending_terminals(pending, audit_store,
                                                          interval_s=settings.terminal_retry_interval_s),
                                  name="govgate-terminal-retry")
    lost = LostRequestSweep(audit_store, pending, lookback_s=settings.terminal_retry_horizon_s,
                            lost_after_s=lost_after)
    sweeper = asyncio.create_task(sweep_lost_requests(lost, counters), name="govgate-lost-requests")
    settler = asyncio.create_task(settle_unsettled_forever(client, counters, audit_store), name="govgate-unsettled")
    stale = asyncio.create_task(end_stale_reservations_forever(client, counters, audit_store, after_s=stale_after),
                                name="govgate-stale-reservations")
    shares = SharePublisher(client, policy, tick_s=settings.policy_reload_interval_s or 2.0)
    policy.on_reload(shares.poke)
    principals = PrincipalCache(ttl_s=settings.auth_cache_ttl_s, max_entries=settings.auth_cache_size)
    key_changes = KeyChangeListener(client, principals, on_change=admitted_keys.changed,
                                    on_resumed=admitted_keys.resumed)
    memory_dir = settings.effective_checkpoint_memory_dir
    memory = CheckpointMemory(memory_dir, database_name(settings.effective_database_url)) if memory_dir else None
    checkpointer = Checkpointer(CheckpointStore(db_engine), audit_store, signing_key,
                                every_entries=settings.checkpoint_every_entries,
                                interval_s=settings.checkpoint_interval_s, command=settings.checkpoint_command,
                                memory=memory)
    # Its own connection: a burst that holds every connection of the shared pool (which waits up to 5 s for
    # one) must not silence the heartbeat for 20 s and have workers take this gateway for gone.
    beat_client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    beat = GatewayBeat(beat_client, waiter.reply_channel)
    try:
        await checkpointer.start()
        await key_changes.start()
        await waiter.start()
        await beat.start()
        await policy.start()
        await shares.start()
        await model_health.start()
        yield Components(
            settings=settings, registry=registry, db_engine=db_engine, keys=keys,
            audit=audit_store, policy=policy, redis=client, waiter=waiter, dispatcher=dispatcher,
            completions=completions, auth=Authenticator(keys, principals), checkpointer=checkpointer,
        )
    finally:
        await stop_tasks([retrier, sweeper, settler, stale])
        await model_health.aclose()
        await shares.aclose()
        pending_client.close()
        await key_changes.aclose()
        await admitted_keys.aclose()
        await completions.aclose()
        await beat.aclose()  # after the drain: nothing this gateway queued waits for it now
        await beat_client.aclose()
        await counters.aclose()
        await waiter.aclose()
        await client.aclose()
        await client.connection_pool.disconnect()
        await policy.aclose()
        await checkpointer.aclose()  # last: the closing checkpoint covers every entry this process wrote
        db_engine.dispose()
