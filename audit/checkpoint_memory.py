"""The last checkpoint a gateway vouched for, kept on its own host across restarts.

A running checkpointer refuses to sign once a checkpoint it signed or
checked is gone from the table or its entry changed
(``Checkpointer._check_vouched``). That memory used to die with the
process: a gateway started afresh trusted whatever the database then held,
so a writer without the signing key (a DBA, a restored backup) could,
while every gateway was down, cut the log back to an older checkpoint
(entries and checkpoints after it deleted: nothing unsigned left to see),
or delete the newest checkpoints and rewrite the entries after an older
one, and the next start signed the result. Only a checkpoint file kept
elsewhere (``GOVGATE_CHECKPOINT_COMMAND``) showed it.

This file keeps that memory beside the gateway instead of in the database:
the checkpoint last vouched for, per database (a file named after a digest
of the database's URL, the password left out, so one var dir serving two
databases keeps two memories). It is a checkpoint file, signed: a forged or
edited one is refused, never trusted. What a start does with it is in
``gateway/checkpointer.py``; ``govgate audit verify`` checks it like a
``--checkpoint`` file. It gains nothing where the writer can reach this
folder too (SQLite's default: the database file, the key and this folder
all sit in ``GOVGATE_VAR_DIR``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Final

from sqlalchemy.engine import make_url

from .checkpoints import Checkpoint, CheckpointFileError
from .chain import canonical_text
from .signing import PublicKey

log = logging.getLogger(__name__)

#: The ``format`` of a memory file; another is not read.
MEMORY_FORMAT: Final = "govgate-checkpoint-memory/1"


def database_name(url: str) -> str:
    """What a memory file is kept for: the database's URL without its password, and without the driver
    (``postgresql+psycopg://`` and ``postgresql://`` name one database)."""
    parsed = make_url(url)
    return parsed.set(drivername=parsed.get_backend_name()).render_as_string(hide_password=True)


class CheckpointMemory:
    """One database's remembered checkpoint in ``folder`` (made on the first write, 0700)."""

    def __init__(self, folder: Path, database: str) -> None:
        self._folder = Path(folder)
        self._database = database
        digest = hashlib.sha256(database.encode("utf-8")).hexdigest()[:24]
        self.path = self._folder / f"{digest}.json"
        self._written: Checkpoint | None = None

    @property
    def database(self) -> str:
        return self._database

    @property
    def kept(self) -> Checkpoint | None:
        """The checkpoint this object last wrote or read (None before either)."""
        return self._written

    def load(self, public_key: PublicKey) -> Checkpoint | None:
        """The remembered checkpoint if there is one signed by ``public_key``; None when there is none.

        A file that is not a memory of this database, or whose checkpoint
        does not verify under the key, raises :class:`CheckpointFileError`:
        the caller says so and goes on as without a memory (its own next
        write replaces the file).
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointFileError(f"cannot read checkpoint memory {self.path}: {exc.strerror or exc}") from None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise CheckpointFileError(f"checkpoint memory {self.path} is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != MEMORY_FORMAT:
            raise CheckpointFileError(f"{self.path} is not a checkpoint memory of format {MEMORY_FORMAT!r}")
        if doc.get("database") != self._database:
            raise CheckpointFileError(f"checkpoint memory {self.path} is for another database "
                                      f"({doc.get('database')!r})")
        checkpoint = Checkpoint.from_document(doc.get("checkpoint"))
        problem = checkpoint.signature_problem(public_key)
        if problem is not None:
            raise CheckpointFileError(f"checkpoint memory {self.path}: {problem}")
        self._written = checkpoint
        return checkpoint

    def remember(self, checkpoint: Checkpoint, public_key: PublicKey) -> None:
        """Keep ``checkpoint`` (atomically: a reader sees the old file or the new one); a no-op when it is
        the one this object last wrote or read. Raises :class:`CheckpointFileError` when it cannot be written."""
        if checkpoint == self._written:
            return
        doc = {"format": MEMORY_FORMAT, "database": self._database,
               "checkpoint": checkpoint.to_document(public_key)}
        temporary = self._folder / f".{self.path.name}.{secrets.token_hex(6)}"
        try:
            self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            # 0600 as every file under var/ (README, "Audit"): it was the umask's 0644 until 2026-12-05 (probe s54)
            with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w",
                           encoding="utf-8") as handle:
                handle.write(canonical_text(doc) + "\n")
                handle.flush()
                os.fsync(handle.fileno())  # a memory emptied by a power cut would forget what it vouched for
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # the folder itself may be what failed
                temporary.unlink(missing_ok=True)
            raise CheckpointFileError(f"cannot write checkpoint memory {self.path}: {exc.strerror or exc}") from None
        self._written = checkpoint
