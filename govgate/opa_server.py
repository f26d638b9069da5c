"""A private ``opa run --server`` child on loopback, for the test fixtures and the policy bench.

In production the operator runs OPA and the gateway only connects to it;
tests and ``bench/policy.py`` start their own, the same way, so they share
this launcher. The server runs with ``--skip-version-check`` (OPA otherwise
asks GitHub for its latest release), logs to a file, sits in its own session
(a Ctrl-C reaches only the parent, which stops it in order) and receives
SIGTERM if the parent dies (:func:`~govgate.processes.child_preexec`).
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from govgate.processes import child_preexec, free_port, stop_process

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
#: A port taken between choosing it and OPA binding it is retried this often.
_PORT_ATTEMPTS = 3


class OpaServer:
    """One ``opa run --server`` child loading ``paths`` (policy folders or files), if any."""

    def __init__(self, binary: Path, log_dir: Path, *paths: Path, watch: bool = False) -> None:
        self.binary = binary
        self.paths = paths
        self.watch = watch
        self.log_path = log_dir / f"opa-{id(self):x}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> OpaServer:
        """Start and wait for ``/health``; ``RuntimeError`` with the log's end if it does not come up."""
        for _ in range(_PORT_ATTEMPTS):
            self.port = free_port(HOST)
            command = [str(self.binary), "run", "--server", "--addr", f"{HOST}:{self.port}",
                       "--log-level", "error", "--skip-version-check", *(["--watch"] if self.watch else []),
                       *map(str, self.paths)]
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                start_new_session=True, preexec_fn=child_preexec())
            if self._wait_healthy():
                return self
            self.stop()
            if "address already in use" not in self.log():
                break
        raise RuntimeError(f"OPA did not start ({' '.join(command)}):\n{self.log()[-2000:]}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and reap it."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, timeout_s=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False
