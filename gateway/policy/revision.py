"""Which files make up the policy, and the revision that names them.

Every audit entry records the policy revision that decided it, so a reviewer
can tell which rules were in force. The revision therefore covers exactly what
the engines load (Rego modules and data documents, by relative path and
content) and nothing else: editing a ``*_test.rego`` file or a README beside
the policy changes no decision, so it must not change the revision either.

The engines read the files once into a :class:`PolicySnapshot` and hash those
same bytes, so the revision always matches what was loaded even if an operator
edits a file while the gateway starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

#: Length of the revision string (hex digits of SHA-256); 64 bits is plenty to
#: tell policy versions apart and short enough to read in a log line.
REVISION_LENGTH = 16

_MODULE_SUFFIX = ".rego"
_TEST_SUFFIX = "_test.rego"
_DATA_SUFFIX = ".json"


class PolicyFilesError(ValueError):
    """The policy folder is missing, empty or holds a file that cannot be read."""


@dataclass(frozen=True)
class PolicySnapshot:
    """The policy's modules and data documents as read at one moment.

    ``modules`` and ``data`` hold ``(relative path, text)`` pairs in path order.
    """

    modules: tuple[tuple[str, str], ...]
    data: tuple[tuple[str, str], ...]
    revision: str

    def data_documents(self) -> list[tuple[str, dict[str, Any]]]:
        """Each data file as the document OPA would mount it at.

        OPA places a data file found in folder ``a/b`` under ``data.a.b``; the
        same nesting is applied here so that both engines see the same ``data``.
        Raises ``PolicyFilesError`` on a file that is not a JSON object.
        """
        documents = []
        for rel, text in self.data:
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PolicyFilesError(f"data document {rel} is not valid JSON: {exc}") from None
            if not isinstance(doc, dict):
                raise PolicyFilesError(f"data document {rel} must hold a JSON object")
            for folder in reversed(Path(rel).parent.parts):
                doc = {folder: doc}
            documents.append((rel, doc))
        return documents


def policy_files(policy_dir: Path) -> list[Path]:
    """The modules (``*.rego`` but not ``*_test.rego``) and data (``*.json``) to load.

    Hidden files and folders (editor swap files, linter settings) are skipped.
    """
    root = Path(policy_dir)
    if not root.is_dir():
        raise PolicyFilesError(f"policy folder {root} does not exist")
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if _is_module(path.name) or path.name.endswith(_DATA_SUFFIX):
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def policy_revision(policy_dir: Path) -> str:
    """The revision of the policy in ``policy_dir`` as it is on disk now."""
    return read_policy(policy_dir).revision


def read_policy(policy_dir: Path) -> PolicySnapshot:
    """Read the policy's files once; the snapshot's revision hashes these bytes."""
    root = Path(policy_dir)
    contents: list[tuple[str, bytes]] = []
    for path in policy_files(root):
        try:
            contents.append((path.relative_to(root).as_posix(), path.read_bytes()))
        except OSError as exc:
            raise PolicyFilesError(f"cannot read {path}: {exc}") from None
    modules, data = [], []
    for rel, raw in contents:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyFilesError(f"{root / rel} is not UTF-8 text") from None
        (modules if _is_module(rel) else data).append((rel, text))
    if not modules:
        raise PolicyFilesError(f"policy folder {root} holds no Rego module")
    return PolicySnapshot(modules=tuple(modules), data=tuple(data), revision=revision_of(contents))


def revision_of(contents: Iterable[tuple[str, bytes]]) -> str:
    """Hash ``(relative path, content)`` pairs, in path order, into a revision.

    Each path and content is length-prefixed so that no two different sets of
    files can be framed into the same byte stream.
    """
    digest = hashlib.sha256()
    for rel, raw in sorted(contents):
        name = rel.encode("utf-8")
        digest.update(len(name).to_bytes(8, "big") + name)
        digest.update(len(raw).to_bytes(8, "big") + raw)
    return digest.hexdigest()[:REVISION_LENGTH]


def _is_module(name: str) -> bool:
    return name.endswith(_MODULE_SUFFIX) and not name.endswith(_TEST_SUFFIX)
