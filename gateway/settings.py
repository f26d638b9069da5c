"""All of govgate's configuration, read from ``GOVGATE_*`` environment variables.

This is the one module that reads the environment. Everything else receives a
:class:`Settings` (or the values it needs from one), which keeps tests able to
build any configuration without touching ``os.environ`` and keeps the list of
knobs in one place that the README mirrors.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

_CHECKOUT = Path(__file__).resolve().parent.parent


def _default_policy_dir() -> Path:
    """``./policies`` when run from a checkout, else the one beside the package."""
    local = Path.cwd() / "policies"
    return local if local.is_dir() else _CHECKOUT / "policies"


#: The most policy evaluator processes a gateway starts (``GOVGATE_POLICY_EVALUATORS``).
MAX_POLICY_EVALUATORS = 256
#: The longest GOVGATE_TIMEOUT_GRACE_S: the in-flight slot outlives the request timeout by 60 s
#: (gateway/components.py ``in_flight_ttl_s``), and a request still in its grace must keep its slot.
MAX_TIMEOUT_GRACE_S = 50.0


def _cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class SettingsError(ValueError):
    """A ``GOVGATE_*`` variable holds a value govgate cannot use."""


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Field docs are the README's configuration table."""

    #: Where the API listens.
    host: str = "127.0.0.1"
    port: int = 8080
    #: Working directory for the embedded default: database, Redis, models.
    var_dir: Path = field(default_factory=lambda: Path.cwd() / "var")
    #: SQLAlchemy URL of the audit/key store; empty means SQLite in ``var_dir``.
    database_url: str = ""
    #: How long a SQLite write waits for a locked database (and a request for its process's other audit
    #: appends) before it fails closed: the request is refused with 503 ``audit_unavailable``.
    database_busy_timeout_s: float = 30.0
    #: Redis for queue, results and counters; empty means ``govgate up`` starts one.
    redis_url: str = ""
    #: Folder of Rego modules and data documents.
    policy_dir: Path = field(default_factory=_default_policy_dir)
    #: Longest one policy evaluation may take (waiting for an evaluator not counted); past it 503.
    policy_timeout_s: float = 0.5
    #: Embedded engine: evaluator processes deciding at once.
    policy_evaluators: int = field(default_factory=_cores)
    #: Longest a request waits for a free policy evaluator (or OPA connection); past it 503 ``policy_unavailable``.
    policy_wait_timeout_s: float = 5.0
    #: Embedded engine: ``auto`` answers on regorus's compiled VM where it compiles the policy and agrees with
    #: the interpreter (gateway/policy/vm.py) and the modules are the shipped ones (gateway/policy/vm_trust.py),
    #: ``on`` for any policy, ``off`` only interprets.
    policy_vm: str = "auto"
    #: With the compiled VM: one answer in this many is also asked of the interpreter (0: only the first ones).
    policy_vm_check_every: int = 100
    #: Requests admitted at once (counters, decision, reservation, request entry); more wait in a line served by
    #: team share (gateway/requests/admission_gate.py). 0: no gate.
    admission_concurrency: int = 16
    #: OPA server to evaluate policies on; empty means the embedded engine.
    opa_url: str = ""
    #: How often the gateway looks for changed policy files (0 turns polling off; SIGHUP still reloads).
    policy_reload_interval_s: float = 2.0
    #: TOML model registry; empty means the built-in tiny model.
    models_file: str = ""
    #: Longest a request waits for its completion before a 504.
    request_timeout_s: float = 120.0
    #: Once a request's timeout ran out, how long the gateway waits for the worker that began its job to stop
    #: and report what it generated before charging the whole reservation (gateway/requests/timeouts.py); at
    #: most 50 s, inside the in-flight slot's 60 s margin past the request timeout.
    timeout_grace_s: float = 10.0
    #: A stopping gateway: how long the requests in flight may still run (new ones are refused 503) before
    #: those left are ended with an answer (gateway/drain.py).
    drain_s: float = 20.0
    #: Soft time limit of one generation in a worker (a hard limit 10 s later kills the pool process).
    #: With the broker's visibility timeout (hard limit + ``redelivery_margin_s``) it stays below the request timeout,
    #: so a task redelivered after a whole worker died can still answer its client.
    generation_time_limit_s: float = 60.0
    #: Longest a worker's new pool process may take to load its model before Celery kills it and starts another
    #: (Celery's own default, 4 s, is shorter than loading many models takes: a pool process replaced after a
    #: crash was then killed over and over, and the worker never served again).
    worker_start_timeout_s: float = 300.0
    #: The broker's visibility timeout is the hard limit + this: a whole worker's death hands its task to
    #: another worker this long after the hard limit. Shorter rescues sooner; too short, and a task that
    #: waited in a live worker before it began is run a second time (one terminal entry wins; work wasted).
    redelivery_margin_s: float = 30.0
    #: How long a terminal entry the database refused is kept (in Redis) and retried before it is given up.
    terminal_retry_horizon_s: float = 86400.0
    #: Seconds between two looks for kept terminal entries that are due (every gateway's retry loop, a thread
    #: in every pool process): how soon after the database is back, or a dead gateway's handed-over output's
    #: fallback is due, the entry is written.
    terminal_retry_interval_s: float = 5.0
    #: Judge outputs with the policy's output rules (off: outputs are served unjudged, as before the rules).
    output_rules: bool = True
    #: Longest a worker waits for its gateway's verdict on an output before it records ``output_unchecked``.
    output_verdict_timeout_s: float = 10.0
    #: Streaming under output rules: the characters held back until the text after them was checked
    #: (the client sees text about this many characters, roughly a quarter as many tokens, late).
    output_holdback_chars: int = 64
    #: Workers: least time between two pieces of a stream; tokens made meanwhile travel as one piece (0: each
    #: token on its own). Relaying a piece costs more than a fast model takes to make a token.
    stream_flush_interval_ms: float = 10.0
    #: Requests that may wait in one model's queue; beyond it the gateway answers 429.
    max_queued_per_model: int = 64
    #: How gateways queue jobs: ``fair`` (a queue per model, team and principal, served by weighted fair share)
    #: or ``fifo`` (one queue per model, first come first served within a priority). Workers serve both.
    queue_mode: str = "fair"
    #: Celery's pool in each worker: ``solo`` (the job in the worker's own process: no IPC between two jobs, one
    #: process per model) or ``prefork`` (the job in a pool process the worker forks and watches; ``--concurrency``).
    worker_pool: str = "solo"
    #: Solo-pool workers: carry a finished output's hand-over (fallback + report) on the take the ack sends, one
    #: send between two jobs instead of two (about one Redis command less a request; CPU alike). On by default
    #: since session 38: off until then because a light team's longest waits behind another team's burst grew;
    #: with the start that gives way they no longer do (docs/architecture.md, "Between two jobs on the solo pool").
    handover_on_take: bool = True
    #: Solo-pool workers in fair mode: a fair job's start gives way to a job of a team further below its share
    #: that arrived after the take (workers/contract/repick.py). On by default: a light team's waits behind
    #: another team's burst lose the slot of a job taken just before them; costs a look (two Redis commands)
    #: only at a start a gateway's push marked.
    fair_give_way: bool = True
    #: Largest request body accepted (413 above it).
    max_body_bytes: int = 1024 * 1024
    #: ``max_tokens`` used when a request does not give one (policy may clamp it).
    default_max_tokens: int = 128
    #: Size of the gateway's Redis connection pool (a blocking pool: waits, never raises).
    redis_max_connections: int = 64
    #: Longest the gateway waits for Redis to answer one call (its socket timeout) before the request is refused
    #: 503 (fail closed); also caps the wait for a new connection's handshake. A frozen Redis holds every request
    #: this long, so shorter fails faster, but a Redis busy past it (a slow save, a long script) refuses requests.
    redis_timeout_s: float = 10.0
    #: Log level for gateway and workers.
    log_level: str = "INFO"
    #: ``text`` (one readable line per record) or ``json`` (one JSON object per line, for log shippers).
    log_format: str = "text"
    #: One ``govgate.access`` log line per HTTP request (route, status, model, error code, duration, id).
    access_log: bool = False
    #: Serve ``GET /metrics`` (Prometheus text format, no key needed).
    metrics_enabled: bool = True
    #: The bearer token that shows the model names and per-model figures of ``/metrics`` and ``/readyz`` (as an
    #: ``admin`` key does); without either they show none (``gateway/api/operator_view.py``). Empty: admin keys only.
    metrics_token: str = field(default="", repr=False)
    #: How long a gateway keeps a key's principal without asking the database (0 turns the cache off).
    #: Revocation does not wait for it (a Redis signal drops the key at once); it bounds changes made
    #: where no signal reaches the gateways.
    auth_cache_ttl_s: float = 10.0
    #: Most principals a gateway process keeps (least recently used leave first).
    auth_cache_size: int = 10000
    #: AES-GCM key sealing job payloads and results in Redis; empty means ``var_dir/keys/payload.key``.
    payload_key_file: str = ""
    #: HMAC key of the audit log's digests; empty means ``var_dir/keys/digest.key``.
    digest_key_file: str = ""
    #: Ed25519 key (PEM PKCS #8) signing the audit checkpoints; empty means ``var_dir/audit-signing.key``.
    audit_signing_key_file: str = ""
    #: A checkpoint is written once this many entries follow the last one (checked every second) ...
    checkpoint_every_entries: int = 1000
    #: ... or this many seconds after it, if the head moved.
    checkpoint_interval_s: float = 10.0
    #: Shell command (``sh -c``) each new checkpoint file is piped to, e.g. to copy it off this host.
    checkpoint_command: str = ""
    #: Folder keeping the newest checkpoint this host's gateways vouched for, per database
    #: (``audit/checkpoint_memory.py``); empty means ``var_dir/checkpoint-memory``, ``off`` keeps none.
    checkpoint_memory_dir: str = ""
    #: A review console session ends after this many seconds without a request (re-signing in is cheap).
    console_idle_timeout_s: float = 900.0
    #: Mark the console's cookies ``Secure`` (set it when the gateway is reached over https, even
    #: through a TLS-terminating proxy; a request that arrives as https gets them anyway).
    console_secure_cookies: bool = False
    #: The proxies whose ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed (comma-separated addresses or
    #: networks, ``*`` for any peer); empty believes none. uvicorn's own default believes any local peer, which
    #: let every client of a gateway on 127.0.0.1 choose the address a refused key is logged under (probe s56).
    forwarded_allow_ips: str = ""

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir / 'govgate.db'}"

    @property
    def effective_payload_key_file(self) -> Path:
        return Path(self.payload_key_file) if self.payload_key_file else self.var_dir / "keys" / "payload.key"

    @property
    def effective_digest_key_file(self) -> Path:
        return Path(self.digest_key_file) if self.digest_key_file else self.var_dir / "keys" / "digest.key"

    @property
    def effective_audit_signing_key_file(self) -> Path:
        return Path(self.audit_signing_key_file) if self.audit_signing_key_file else self.var_dir / "audit-signing.key"

    @property
    def effective_checkpoint_memory_dir(self) -> Path | None:
        if self.checkpoint_memory_dir == "off":
            return None
        return Path(self.checkpoint_memory_dir) if self.checkpoint_memory_dir else self.var_dir / "checkpoint-memory"

    def to_env(self) -> dict[str, str]:
        """These settings as ``GOVGATE_*`` variables, so a child process reads back the same."""
        env = {f"GOVGATE_{name.upper()}": str(getattr(self, name)) for name in self.__dataclass_fields__}
        env["GOVGATE_DATABASE_URL"] = self.effective_database_url
        env["GOVGATE_PAYLOAD_KEY_FILE"] = str(self.effective_payload_key_file)
        env["GOVGATE_DIGEST_KEY_FILE"] = str(self.effective_digest_key_file)
        env["GOVGATE_AUDIT_SIGNING_KEY_FILE"] = str(self.effective_audit_signing_key_file)
        return {key: value for key, value in env.items() if value != ""}

    def with_(self, **changes: object) -> "Settings":
        """A copy with some fields replaced (tests and the supervisor use this)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``GOVGATE_*`` variables, validating each."""
        env = os.environ if env is None else env
        defaults = cls()

        def text(name: str, default: str) -> str:
            return env.get(f"GOVGATE_{name}", default).strip() or default

        def number(name: str, default: float, kind: type, minimum: float,
                   maximum: float | None = None, *, bounded_by_caller: bool = False) -> float | int:
            raw = env.get(f"GOVGATE_{name}", "").strip()
            if not raw:
                return default
            noun = "whole number" if kind is int else "number"
            # int() and float() also read other scripts' digits ('١٢') and Python's '1_000': plain numbers only
            if not (_WHOLE if kind is int else _DECIMAL).fullmatch(raw):
                raise SettingsError(f"GOVGATE_{name}={raw!r} is not a {noun}")
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"GOVGATE_{name}={raw!r} is not a {noun}") from None
            if bounded_by_caller:  # the caller's own range check refuses NaN and inf with its message
                return value
            if kind is float and not math.isfinite(value):  # NaN passes every comparison below, inf overflows
                raise SettingsError(f"GOVGATE_{name}={raw!r} must be a finite number")
            if value < minimum:
                raise SettingsError(f"GOVGATE_{name}={raw!r} must be at least {minimum}")
            top = maximum if maximum is not None else (_MAX_COUNT if kind is int else _MAX_SECONDS)
            if value > top:
                raise SettingsError(f"GOVGATE_{name}={raw!r} must be at most {top:g}" if kind is float
                                    else f"GOVGATE_{name}={raw!r} must be at most {top}")
            return value

        def seconds_up_to_a_day(name: str, default: float) -> float:
            """More than 0 and at most a day (``number``'s minimum is inclusive and lets inf and NaN by)."""
            value = number(name, default, float, -math.inf, bounded_by_caller=True)
            if not 0 < value <= 86400:  # NaN fails both
                raw = env.get(f"GOVGATE_{name}", "").strip()
                raise SettingsError(f"GOVGATE_{name}={raw!r} must be more than 0 and at most 86400 seconds")
            return value

        def milliseconds_up_to_a_second(name: str, default: float) -> float:
            """0 to 1000 (a piece held longer than a second would no longer read as a stream)."""
            value = number(name, default, float, -math.inf, bounded_by_caller=True)
            if not 0 <= value <= 1000:  # NaN fails both
                raw = env.get(f"GOVGATE_{name}", "").strip()
                raise SettingsError(f"GOVGATE_{name}={raw!r} must be between 0 and 1000 milliseconds")
            return value

        var_dir = Path(text("VAR_DIR", str(defaults.var_dir))).expanduser().resolve()
        return cls(
            host=text("HOST", defaults.host),
            port=int(number("PORT", defaults.port, int, 1, 65535)),
            var_dir=var_dir,
            database_url=_stored_database(text("DATABASE_URL", "")),
            database_busy_timeout_s=seconds_up_to_a_day("DATABASE_BUSY_TIMEOUT_S", defaults.database_busy_timeout_s),
            redis_url=_url(text("REDIS_URL", ""), "REDIS_URL", ("redis://", "rediss://", "unix://")),
            # absolute, not resolved: a symlink switched to a new release folder is followed at the next read
            # (resolved once, the gateway read the old target for ever)
            policy_dir=Path(os.path.abspath(Path(text("POLICY_DIR", str(defaults.policy_dir))).expanduser())),
            policy_timeout_s=float(number("POLICY_TIMEOUT_S", defaults.policy_timeout_s, float, 0.001)),
            # each is a process holding the compiled policy (tens of MB): a typo's 2^31 - 1 would fork until
            # the machine gave out
            policy_evaluators=int(number("POLICY_EVALUATORS", defaults.policy_evaluators, int, 1,
                                         MAX_POLICY_EVALUATORS)),
            policy_wait_timeout_s=float(number("POLICY_WAIT_TIMEOUT_S", defaults.policy_wait_timeout_s, float, 0.0)),
            policy_vm=_choice(text("POLICY_VM", defaults.policy_vm).lower(), "POLICY_VM", ("auto", "on", "off")),
            policy_vm_check_every=int(number("POLICY_VM_CHECK_EVERY", defaults.policy_vm_check_every, int, 0)),
            admission_concurrency=int(number("ADMISSION_CONCURRENCY", defaults.admission_concurrency, int, 0)),
            opa_url=_url(text("OPA_URL", "").rstrip("/"), "OPA_URL", ("http://", "https://")),
            policy_reload_interval_s=float(number("POLICY_RELOAD_INTERVAL_S", defaults.policy_reload_interval_s,
                                                  float, 0.0)),
            models_file=text("MODELS_FILE", ""),
            request_timeout_s=float(number("REQUEST_TIMEOUT_S", defaults.request_timeout_s, float, 0.01)),
            drain_s=float(number("DRAIN_S", defaults.drain_s, float, 0.0)),
            timeout_grace_s=float(number("TIMEOUT_GRACE_S", defaults.timeout_grace_s, float, 0.1,
                                         MAX_TIMEOUT_GRACE_S)),
            generation_time_limit_s=float(number("GENERATION_TIME_LIMIT_S", defaults.generation_time_limit_s,
                                                 float, 0.1)),
            worker_start_timeout_s=seconds_up_to_a_day("WORKER_START_TIMEOUT_S", defaults.worker_start_timeout_s),
            redelivery_margin_s=seconds_up_to_a_day("REDELIVERY_MARGIN_S", defaults.redelivery_margin_s),
            terminal_retry_horizon_s=float(number("TERMINAL_RETRY_HORIZON_S", defaults.terminal_retry_horizon_s,
                                                  float, 1.0)),
            terminal_retry_interval_s=float(number("TERMINAL_RETRY_INTERVAL_S", defaults.terminal_retry_interval_s,
                                                   float, 0.01)),
            output_rules=_flag(text("OUTPUT_RULES", ""), "OUTPUT_RULES", defaults.output_rules),
            output_verdict_timeout_s=float(number("OUTPUT_VERDICT_TIMEOUT_S", defaults.output_verdict_timeout_s,
                                                  float, 0.1)),
            output_holdback_chars=int(number("OUTPUT_HOLDBACK_CHARS", defaults.output_holdback_chars, int, 1)),
            stream_flush_interval_ms=milliseconds_up_to_a_second("STREAM_FLUSH_INTERVAL_MS",
                                                                 defaults.stream_flush_interval_ms),
            max_queued_per_model=int(number("MAX_QUEUED_PER_MODEL", defaults.max_queued_per_model, int, 1)),
            queue_mode=_choice(text("QUEUE_MODE", defaults.queue_mode).lower(), "QUEUE_MODE", ("fifo", "fair")),
            worker_pool=_choice(text("WORKER_POOL", defaults.worker_pool).lower(), "WORKER_POOL",
                                ("prefork", "solo")),
            handover_on_take=_flag(text("HANDOVER_ON_TAKE", ""), "HANDOVER_ON_TAKE", defaults.handover_on_take),
            fair_give_way=_flag(text("FAIR_GIVE_WAY", ""), "FAIR_GIVE_WAY", defaults.fair_give_way),
            max_body_bytes=int(number("MAX_BODY_BYTES", defaults.max_body_bytes, int, 1024)),
            default_max_tokens=int(number("DEFAULT_MAX_TOKENS", defaults.default_max_tokens, int, 1)),
            redis_max_connections=int(number("REDIS_MAX_CONNECTIONS", defaults.redis_max_connections, int, 2)),
            redis_timeout_s=seconds_up_to_a_day("REDIS_TIMEOUT_S", defaults.redis_timeout_s),
            log_level=_choice(text("LOG_LEVEL", defaults.log_level).upper(), "LOG_LEVEL",
                              ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
            log_format=_choice(text("LOG_FORMAT", defaults.log_format).lower(), "LOG_FORMAT", ("text", "json")),
            access_log=_flag(text("ACCESS_LOG", ""), "ACCESS_LOG", defaults.access_log),
            metrics_enabled=_flag(text("METRICS_ENABLED", ""), "METRICS_ENABLED", defaults.metrics_enabled),
            metrics_token=_token(text("METRICS_TOKEN", ""), "METRICS_TOKEN"),
            auth_cache_ttl_s=float(number("AUTH_CACHE_TTL_S", defaults.auth_cache_ttl_s, float, 0.0)),
            auth_cache_size=int(number("AUTH_CACHE_SIZE", defaults.auth_cache_size, int, 1)),
            payload_key_file=_path_text(text("PAYLOAD_KEY_FILE", "")),
            digest_key_file=_path_text(text("DIGEST_KEY_FILE", "")),
            audit_signing_key_file=_path_text(text("AUDIT_SIGNING_KEY_FILE", "")),
            checkpoint_every_entries=int(number("CHECKPOINT_EVERY_ENTRIES", defaults.checkpoint_every_entries,
                                                int, 1)),
            checkpoint_interval_s=float(number("CHECKPOINT_INTERVAL_S", defaults.checkpoint_interval_s, float, 0.1)),
            checkpoint_command=env.get("GOVGATE_CHECKPOINT_COMMAND", "").strip(),
            checkpoint_memory_dir=_off_or_path(text("CHECKPOINT_MEMORY_DIR", "")),
            console_idle_timeout_s=float(number("CONSOLE_IDLE_TIMEOUT_S", defaults.console_idle_timeout_s, float,
                                                10.0)),
            console_secure_cookies=_boolean(env, "CONSOLE_SECURE_COOKIES", defaults.console_secure_cookies),
            forwarded_allow_ips=_proxies(text("FORWARDED_ALLOW_IPS", ""), "FORWARDED_ALLOW_IPS"),
        )


#: Largest whole-number setting: the API's own cap on counts (2^31 - 1), far above any sane value.
_MAX_COUNT = 2**31 - 1
#: Largest number of seconds (or milliseconds) a setting may hold: about 31 years, well inside what
#: ``timedelta``, Redis expiries and the event loop's timers can hold (1e30 made the gateway's startup overflow).
_MAX_SECONDS = 1e9


#: Shortest bearer token a setting may hold (a guessable one would give the model names to anyone).
_MIN_TOKEN_CHARS = 24


def _token(value: str, name: str) -> str:
    """An empty setting, or a bearer token long enough not to be guessed, printable ASCII without spaces (what
    an ``Authorization`` header carries as is). The value is never echoed in the error."""
    if value and (len(value) < _MIN_TOKEN_CHARS or not value.isascii() or not value.isprintable()
                  or any(c.isspace() for c in value)):
        raise SettingsError(f"GOVGATE_{name} must be at least {_MIN_TOKEN_CHARS} printable ASCII characters "
                            "without spaces (e.g. the output of 'openssl rand -hex 32')")
    return value


def _url(value: str, name: str, schemes: tuple[str, ...]) -> str:
    """An empty setting, or a URL with one of ``schemes`` (anything else fails later with a traceback)."""
    if value and not value.lower().startswith(schemes):
        # Not the value: a malformed URL ('redis:/u:secret@host') is no URL without_password can read.
        found = value.partition(":")[0][:20] if ":" in value else ""
        raise SettingsError(f"GOVGATE_{name} must start with one of: {', '.join(schemes)}"
                            + (f" (it starts {found + ':'!r})" if found else ""))
    return value


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(f"GOVGATE_{name}", "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"GOVGATE_{name}={raw!r} must be true or false")


def _path_text(raw: str) -> str:
    """An absolute path for a non-empty setting, so child processes agree on it."""
    return str(Path(raw).expanduser().resolve()) if raw else ""


def _off_or_path(raw: str) -> str:
    """``off`` as it is (case aside), any other non-empty value an absolute path (:func:`_path_text`)."""
    return "off" if raw.lower() == "off" else _path_text(raw)


def _choice(value: str, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SettingsError(f"GOVGATE_{name}={value!r} must be one of: {', '.join(allowed)}")
    return value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

#: A whole number as a setting is written: ASCII digits, an optional sign.
_WHOLE = re.compile(r"[+-]?[0-9]+")
#: A number: digits with an optional fraction and exponent, or nan/inf (refused later, by name).
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)


def _stored_database(url: str) -> str:
    """An empty setting or a database URL, not an in-memory SQLite one (``sqlite://``, ``sqlite:///``,
    ``:memory:``, ``mode=memory``): each process would get its own, empty, and lose it at its exit. ``keys
    create`` printed a secret stored nowhere, ``up`` an admin key that lived in a child's memory, and a gateway
    served while logging "no such table" every second (probe s56). Read from the string: the worker's main
    process does not load SQLAlchemy."""
    if url.lower().startswith("sqlite"):
        path = url.split("://", 1)[1].split("?", 1)[0] if "://" in url else ""
        if path in ("", "/") or path.endswith(":memory:") or "mode=memory" in url:
            raise SettingsError("GOVGATE_DATABASE_URL names an in-memory SQLite database: every process would "
                                "have its own, empty, gone at its exit; name a file (sqlite:///path/to/govgate.db) "
                                "or leave it empty for $GOVGATE_VAR_DIR/govgate.db")
    return url


def _proxies(raw: str, name: str) -> str:
    """Empty, ``*``, or comma-separated IP addresses and networks (``10.0.0.0/8``), as uvicorn reads them."""
    items = [item.strip() for item in raw.split(",")] if raw else []
    for item in items:
        if item == "*":
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise SettingsError(f"GOVGATE_{name}: {item[:60]!r} is not an IP address, a network (10.0.0.0/8) "
                                "or '*'") from None
    return ",".join(items)


def _flag(raw: str, name: str, default: bool) -> bool:
    """A yes/no setting: 1/true/yes/on or 0/false/no/off (empty: ``default``)."""
    value = raw.lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"GOVGATE_{name}={raw!r} is not a yes/no value (use 1 or 0)")


def without_password(url: str) -> str:
    """A database or Redis URL as a message may show it: the password between ``user:`` and ``@`` hidden."""
    return re.sub(r"(//[^:/@]*:)[^/]*@", r"\1***@", url)  # to the last @ of the authority


#: ``GOVGATE_*`` names that are not settings: the test suite's switches (README, "Tests").
_NOT_SETTINGS_PREFIX = "GOVGATE_TEST_"
_NOT_SETTINGS = frozenset({"GOVGATE_RUN_SLOW"})


class _AskedNames(dict):
    """An empty environment that records every name :meth:`Settings.from_env` asks of it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return super().get(key, default)


@functools.cache
def setting_names() -> frozenset[str]:
    """Every ``GOVGATE_*`` variable a setting is read from (asked of an empty environment, so it cannot drift
    from :meth:`Settings.from_env`)."""
    asked = _AskedNames()
    Settings.from_env(asked)
    return frozenset(asked.asked)


def unknown_settings(env: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Each ``GOVGATE_*`` variable of ``env`` no setting reads, with the known name it most resembles (or None).

    A misspelt one (``GOVGATE_REQEST_TIMEOUT_S``) is otherwise ignored in
    silence and its setting keeps its default; the commands warn about each.
    """
    env = os.environ if env is None else env
    known = setting_names()
    found = []
    for name in sorted(env):
        if (not name.startswith("GOVGATE_") or name in known or name in _NOT_SETTINGS
                or name.startswith(_NOT_SETTINGS_PREFIX)):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        found.append((name, close[0] if close else None))
    return found
