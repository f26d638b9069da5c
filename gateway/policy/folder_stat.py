"""The policy folder's revision, re-read only when the files' metadata says something changed.

The watch asked for the folder's revision at every poll (2 s by default),
and that meant reading, parsing and canonicalising every module and data
file on the gateway's own process: with a 42 MB ``data.json`` each poll
cost about 2 s of CPU and requests stalled behind it (probe h10 F7). Now a
poll first lists the files and ``stat``\\ s them; when every file's
(path, size, mtime_ns, ctime_ns, inode, device) is as it was at the last
read, the last answer (a revision, or the folder's read error) stands.

Assumptions, and what covers each:

- Any write changes a file's ctime (the kernel sets it; ``touch``,
  ``cp -p``, ``rsync -t`` and unpacked archives set mtime back, never
  ctime), and a file replaced by a rename has another inode.
- Timestamps are coarse (ext4 a few ms, FAT 2 s): two same-size writes in
  one tick look alike. So a read is not trusted for the skip while any
  file's mtime or ctime is within :data:`RECENT_S` of the clock when it
  was stat'ed (git's "racily clean" rule): such a folder is read at every
  poll until its files are older than that.
- Clocks can disagree (a network filesystem's server), and metadata can
  lie: the folder is read in full at least every :data:`FULL_READ_EVERY_S`
  whatever the metadata says, and a forced reload (SIGHUP) always reads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from gateway.policy import revision as _revision
from gateway.policy.revision import PolicyFilesError, policy_files

#: A file changed this recently is read again at every poll (coarse timestamps, see the module docstring).
RECENT_S = 3.0
#: The longest the metadata alone is trusted: then the folder is read in full again.
FULL_READ_EVERY_S = 60.0

Fingerprint = tuple[tuple[str, int, int, int, int, int], ...]


def _wall_clock_ns() -> int:
    """The clock file times are compared with (a function so that a test can move it)."""
    return time.time_ns()


class FolderRevisions:
    """``policy_revision(policy_dir)``, skipping the read while the files' metadata is unchanged."""

    def __init__(self, policy_dir: Path) -> None:
        self._policy_dir = Path(policy_dir)
        self._fingerprint: Fingerprint | None = None
        self._answer: str | PolicyFilesError | None = None
        self._read_at = 0.0

    def revision(self, *, fresh: bool = False) -> str:
        """The folder's revision now; raises ``PolicyFilesError`` (or ``OSError``) as ``policy_revision``.

        ``fresh``: read the files whatever their metadata says (a forced reload).
        """
        taken = self._fingerprint_now()
        fingerprint = None if taken is None else taken[0]
        if (not fresh and fingerprint is not None and fingerprint == self._fingerprint
                and time.monotonic() - self._read_at < FULL_READ_EVERY_S):
            answer = self._answer
            if isinstance(answer, PolicyFilesError):
                raise answer
            if answer is not None:
                return answer
        self._fingerprint = None
        read_at = time.monotonic()
        try:
            answer = _revision.read_policy(self._policy_dir).revision
        except PolicyFilesError as exc:  # the folder's own problem: as stable as its files
            self._remember(taken, exc, read_at)
            raise
        self._remember(taken, answer, read_at)
        return answer

    def _remember(self, taken: tuple[Fingerprint, int] | None, answer: str | PolicyFilesError,
                  read_at: float) -> None:
        """Keep ``answer`` for the skip, unless some file is too recent to be told apart from a next write."""
        if taken is None or _too_recent(*taken):
            return
        self._fingerprint, self._answer, self._read_at = taken[0], answer, read_at

    def _fingerprint_now(self) -> tuple[Fingerprint, int] | None:
        """Each file's metadata and the clock when it was taken, before the read (a change during the read
        shows at the next poll); None when it cannot be had (a file gone between listing and stat: read,
        and let the read say)."""
        try:
            entries = []
            for path in policy_files(self._policy_dir):
                st = os.stat(path)
                entries.append((path.relative_to(self._policy_dir).as_posix(), st.st_size, st.st_mtime_ns,
                                st.st_ctime_ns, st.st_ino, st.st_dev))
        except (OSError, PolicyFilesError):
            return None
        return tuple(entries), _wall_clock_ns()


def _too_recent(fingerprint: Fingerprint, stamp_ns: int) -> bool:
    """Whether a file changed within :data:`RECENT_S` of ``stamp_ns`` (or after it: a clock behind)."""
    limit = stamp_ns - int(RECENT_S * 1e9)
    return any(mtime_ns > limit or ctime_ns > limit for _, _, mtime_ns, ctime_ns, _, _ in fingerprint)
