"""Which files make up the policy, and the revision that names them.

The revision covers exactly what the engines load and is defined over what
an OPA server can give back, so the gateway can prove OPA evaluates the
policy it records; see docs/architecture.md, "Design notes by package"
(gateway/policy).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

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
                doc = json.loads(text, parse_constant=_refuse_constant)
            except ValueError as exc:  # JSONDecodeError, or NaN/Infinity, which JSON (and OPA) lack
                raise PolicyFilesError(f"data document {rel} is not valid JSON: {exc}") from None
            if not isinstance(doc, dict):
                raise PolicyFilesError(f"data document {rel} must hold a JSON object")
            for folder in reversed(Path(rel).parent.parts):
                doc = {folder: doc}
            documents.append((rel, doc))
        return documents

    def defines_rule(self, package: str, rule: str) -> bool:
        """Whether a module of ``package`` has a rule head named ``rule`` (read from the text, not evaluated).

        The gateway asked the policy for its output rule on a probe input and took "undefined" for "no
        rule": an operator's rule that needs the output's text (``if { is_string(input.output.text) }``)
        is undefined there, and every output went unjudged (probe h10). A rule head starts its line
        (``rule :=``, ``rule if``, ``rule contains``, ``default rule``), as ``opa fmt`` writes it.

        A module of package ``package.rule`` (or one below it) defines the rule's document too, out of
        its own rules (``package govgate.output_decision`` with ``allow :=``, ``reasons :=``); such a
        module counts whatever its rules are named. In doubt this says "defined": an output is then
        stopped where the rule gives no answer, never let through unjudged.
        """
        head = re.compile(rf"^(?:default\s+)?{re.escape(rule)}\s*(?::=|=|if\b|contains\b|\{{|\[|$)", re.MULTILINE)
        of_package = re.compile(rf"^package\s+{re.escape(package)}\s*(?:#.*)?$", re.MULTILINE)
        rule_package = re.compile(rf"^package\s+{re.escape(package)}\.{re.escape(rule)}(?:\.[^\s#]+)?\s*(?:#.*)?$",
                                  re.MULTILINE)
        return any((of_package.search(text) and head.search(text)) or rule_package.search(text)
                   for _, text in self.modules)

    def module_entries(self) -> list[tuple[str, str]]:
        """``(file name, text)`` of each module: the module half of the revision."""
        return [(module_name(rel), text) for rel, text in self.modules]

    def base_data(self) -> dict[str, Any]:
        """All data documents merged into one ``data`` tree, as OPA mounts a folder.

        Raises ``PolicyFilesError`` on a file that is not a JSON object, or
        when two files give different values for the same path.
        """
        return merge_documents(self.data_documents())


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
    snapshot = PolicySnapshot(modules=tuple(modules), data=tuple(data), revision="")
    base = snapshot.base_data()
    _refuse_data_under_packages(base, snapshot.modules)
    revision = compute_revision(snapshot.module_entries(), base)
    return PolicySnapshot(modules=snapshot.modules, data=snapshot.data, revision=revision)


_PACKAGE_LINE = re.compile(r"^package\s+([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)", re.MULTILINE)


def _refuse_data_under_packages(base: Mapping[str, Any], modules: Iterable[tuple[str, str]]) -> None:
    """Refuse data that sets a path under a module's package (``data.govgate.decision``).

    On regorus's interpreter such a document replaced the rule of that name:
    one key in ``data.json`` turned the whole decision into "allow, no
    limits, no content rules" (probe p3), and OPA refuses the same folder
    ("conflicting rule for data path"), so the engines disagreed. Any data
    under a package, or a non-object on the way to one, is refused here, for
    both engines, at every read of the folder.
    """
    for rel, text in modules:
        for match in _PACKAGE_LINE.finditer(text):
            node: Any = base
            path = ["data"]
            for segment in match.group(1).split("."):
                if not isinstance(node, Mapping):
                    raise PolicyFilesError(f"the data sets {'.'.join(path)}, on the path of package "
                                           f"{match.group(1)} ({rel}): data may not take a package's place")
                if segment not in node:
                    break
                node, path = node[segment], [*path, segment]
            else:
                raise PolicyFilesError(f"the data sets {'.'.join(path)}, the path of package {match.group(1)} "
                                       f"({rel}): data under a package would replace its rules on the embedded "
                                       "engine (OPA refuses it); keep data under govgate_config")


def module_name(path_or_id: str) -> str:
    """The file name of a module path or an OPA policy id (``a/b/govgate.rego`` → ``govgate.rego``)."""
    return path_or_id.rsplit("/", 1)[-1]


def canonical_json(value: Any) -> bytes:
    """One JSON text per value: sorted keys, no spaces, UTF-8 (not ASCII escapes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def compute_revision(modules: Iterable[tuple[str, str]], data: Mapping[str, Any]) -> str:
    """The revision of a policy given as modules and its base ``data`` tree.

    ``modules`` are ``(path or OPA id, raw text)`` pairs (only the file name
    counts); ``data`` is the merged tree, hashed one top-level key at a time.
    The engines' own rules are never part of ``data``: callers pass base
    documents only. Every field is framed (a tag, then length-prefixed name
    and content) so that no two different policies hash the same byte stream.
    """
    digest = hashlib.sha256()

    def frame(tag: bytes, name: str, content: bytes) -> None:
        encoded = name.encode("utf-8")
        digest.update(tag + len(encoded).to_bytes(8, "big") + encoded + len(content).to_bytes(8, "big") + content)

    for name, text in sorted((module_name(name), text) for name, text in modules):
        frame(b"M", name, text.encode("utf-8"))
    for key in sorted(data):
        frame(b"D", key, canonical_json(data[key]))
    return digest.hexdigest()[:REVISION_LENGTH]


def merge_documents(documents: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Merge ``(file, document)`` pairs into one tree; objects merge, nothing else may meet.

    OPA refuses a folder whose data files set the same non-object path (even
    to equal values); refusing here too keeps the two engines on the same data.
    """
    merged: dict[str, Any] = {}
    for rel, doc in documents:
        _merge_into(merged, doc, rel, ())
    return merged


def _merge_into(target: dict[str, Any], doc: Mapping[str, Any], rel: str, where: tuple[str, ...]) -> None:
    for key, value in doc.items():
        if key not in target:
            target[key] = value
        elif isinstance(target[key], dict) and isinstance(value, dict):
            target[key] = dict(target[key])
            _merge_into(target[key], value, rel, (*where, key))
        else:
            path = ".".join(("data", *where, key))
            raise PolicyFilesError(f"data document {rel} sets {path}, which another data file already sets")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _is_module(name: str) -> bool:
    return name.endswith(_MODULE_SUFFIX) and not name.endswith(_TEST_SUFFIX)
