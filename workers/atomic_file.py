"""Writing a file so that it appears under its name only once complete.

Why: model files are memory-mapped and trusted by C loaders, and a file
under a model's name is taken for the model. A crash, a full disk or a
reader racing the writer must never meet a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``target``, renamed to ``target`` when the block ends cleanly.

    The caller writes the temporary file (it exists, empty, mode 0600); on a
    clean exit it is synced, renamed over ``target`` and the rename synced. On
    any exception, ``KeyboardInterrupt`` included, it is removed instead.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after must not lose it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the data itself is synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
