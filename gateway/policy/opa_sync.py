"""Putting a policy folder into OPA, and proving which policy OPA holds.

Called by :mod:`gateway.policy.opa` on connect and on every reload. Modules
go up verbatim (see :func:`_put_in_rounds`) and are read back to prove the
revision, so the gateway never records one OPA is not evaluating; see
docs/architecture.md, "Design notes by package" and "Library facts the code
relies on".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
from opa_client import AsyncOpaClient
from opa_client.errors import ConnectionsError, DeletePolicyError, PolicyNotFoundError, RegoParseError, TypeException

from gateway.policy.config_check import CONFIG_PROBLEMS_RULE, config_refusal
from gateway.policy.engine import DECISION_RULE, VISIBLE_MODELS_RULE, PolicyLoadError
from gateway.policy.revision import PolicyFilesError, PolicySnapshot, compute_revision, module_name, read_policy

log = logging.getLogger("govgate.policy")

_TEST_SUFFIX = "_test.rego"


def read_snapshot(policy_dir: Path) -> PolicySnapshot:
    """The folder's policy; a folder that cannot be read is a ``PolicyLoadError``."""
    try:
        snapshot = read_policy(policy_dir)
        snapshot.base_data()  # a bad data file fails here, not halfway through a load
    except PolicyFilesError as exc:
        raise PolicyLoadError(str(exc)) from None
    return snapshot


async def upload_policy(client: AsyncOpaClient, snapshot: PolicySnapshot) -> None:
    """Make OPA's modules and base data exactly the snapshot's.

    OPA's REST API takes one module at a time and compiles it together with
    the modules it already holds, so the order matters: a module that calls
    another's function is refused until that one is in. Modules are therefore
    put in rounds, each retrying what the last refused, while rounds make
    progress. A module OPA already holds under a longer id (``opa run`` names
    modules by their path, e.g. ``policies/govgate.rego``) is replaced under
    that id, in place. If modules are still refused, an old module may be in
    the way (a renamed file, a rule moved between files): the modules the
    folder no longer has are deleted and the rounds tried once more.

    Modules of one package that use each other's rules both ways cannot be
    put into an OPA that holds none of them, in any order: OPA has to load
    such a folder itself (``opa run --server <folder>``, and ``load=False``).
    The data goes in one request (``PUT /v1/data``), which also drops data
    the policy no longer has.
    """
    existing = set(await client.get_policies_list())
    wanted = {_opa_id(rel, existing): text for rel, text in snapshot.modules}
    stale = existing - wanted.keys()
    refused = await _put_in_rounds(client, wanted)
    if refused and stale:
        log.info("OPA refused %s beside the old modules; deleting %s and trying again",
                 ", ".join(refused), ", ".join(sorted(stale)))
        stale = await _delete_in_rounds(client, stale)
        refused = await _put_in_rounds(client, {pid: wanted[pid] for pid in refused})
    if refused:
        detail = "; ".join(f"{pid}: {error}" for pid, error in refused.items())
        hint = "" if len(refused) < 2 else (
            " (OPA compiles each uploaded module with those it already holds, so modules that use each other's "
            "rules cannot be uploaded one at a time: start OPA with the folder, `opa run --server <folder>`, "
            "and connect with load=False)")
        raise PolicyLoadError(f"OPA refused module {detail}{hint}")
    try:
        await client.update_or_create_data(snapshot.base_data(), "")
    except RegoParseError as exc:
        raise PolicyLoadError(f"OPA refused the policy's data: {describe_error(exc)}") from None
    left = await _delete_in_rounds(client, stale)
    if left:
        raise PolicyLoadError(f"OPA refused to delete modules the folder does not have: {', '.join(sorted(left))}")


def _opa_id(rel: str, existing: set[str]) -> str:
    """The id to put module ``rel`` under: OPA's own id for that file when it has exactly one, else ``rel``."""
    if rel in existing:
        return rel
    same_file = [pid for pid in existing if pid.endswith("/" + rel)]
    return same_file[0] if len(same_file) == 1 else rel


async def _put_in_rounds(client: AsyncOpaClient, modules: dict[str, str]) -> dict[str, str]:
    """Put modules, retrying refused ones while a round makes progress; the refused ones and why."""
    pending = dict(modules)
    refused: dict[str, str] = {}
    while pending:
        refused = {}
        for policy_id, text in pending.items():
            try:
                # rego_compat=False: upload exactly this text or fail. The default
                # (True) rewrites a module OPA refuses with regular expressions and
                # uploads the rewrite silently; update_policy_from_file cannot turn it off.
                await client.update_policy_from_string(text, policy_id, rego_compat=False)
            except (RegoParseError, TypeException) as exc:
                refused[policy_id] = describe_error(exc)
        if len(refused) == len(pending):
            break
        pending = {pid: pending[pid] for pid in refused}
    return refused


async def _delete_in_rounds(client: AsyncOpaClient, ids: set[str]) -> set[str]:
    """Delete modules (a module others use is refused until they are gone); the ones left."""
    pending = set(ids)
    while pending:
        left = set()
        for policy_id in sorted(pending):
            try:
                await client.delete_policy(policy_id)
            except DeletePolicyError as exc:
                if exc.expression != "resource_not_found":
                    left.add(policy_id)
        if len(left) == len(pending):
            break
        pending = left
    return pending


async def read_back(client: AsyncOpaClient, data_keys: Any) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """OPA's modules (tests excluded, as locally) and its data under the policy's top-level keys.

    Only the keys the local policy has are read: ``GET /v1/data`` would also
    evaluate every rule of every package. Data OPA holds under other keys is
    not seen (no rule of this policy can read it unless the folder has it).
    """
    modules = []
    for policy_id in await client.get_policies_list():
        if module_name(policy_id).endswith(_TEST_SUFFIX):
            continue
        raw = (await client.get_policy(policy_id)).get("result", {}).get("raw")
        if not isinstance(raw, str):
            raise PolicyLoadError(f"OPA gave no text for module {policy_id}")
        modules.append((policy_id, raw))
    data = {}
    for key in data_keys:
        try:
            data[key] = (await client.get_data(key))["result"]
        except PolicyNotFoundError:
            continue  # absent on OPA: the revision will differ
    return modules, data


async def verify_policy(client: AsyncOpaClient, snapshot: PolicySnapshot, url: str, folder: Path) -> None:
    """Raise ``PolicyLoadError`` unless OPA holds exactly the snapshot's policy."""
    local_data = snapshot.base_data()
    modules, data = await read_back(client, local_data.keys())
    remote = compute_revision(modules, data)
    if remote != snapshot.revision:
        raise PolicyLoadError(
            f"OPA at {url} holds policy revision {remote}, but {folder} is revision {snapshot.revision} "
            f"({_difference(snapshot.module_entries(), modules, local_data, data)})"
        )
    # As the embedded engine refuses at load a policy without its entry points:
    # on OPA a missing rule would only show as every request denied.
    info = await client.get_policies_info()
    defined = {rule_url.removeprefix(client.root_url + "/") for policy in info.values() for rule_url in policy["rules"]}
    for rule in (DECISION_RULE, VISIBLE_MODELS_RULE):
        if rule.replace(".", "/") not in defined:
            raise PolicyLoadError(f"the policy in {folder} defines no rule {rule}")


async def check_config(client: AsyncOpaClient, folder: Path) -> None:
    """Raise ``PolicyLoadError`` when the policy OPA holds finds problems in its own data.

    The decision rules rely on data that passed this check, which no decision
    repeats (:mod:`gateway.policy.config_check`); run it once OPA is proven to
    hold the folder's revision.
    """
    package, _, name = CONFIG_PROBLEMS_RULE.removeprefix("data.").rpartition(".")
    body = await client.query_rule({}, package, name)
    problems = body.get("result") if isinstance(body, dict) else body
    refusal = config_refusal(problems)
    if refusal is not None:
        raise PolicyLoadError(f"the policy in {folder} is refused: {refusal}")


def _difference(local_modules: list[tuple[str, str]], remote_modules: list[tuple[str, str]],
                local_data: dict[str, Any], remote_data: dict[str, Any]) -> str:
    """Which modules and data keys differ, for the operator reading the error."""
    local = {module_name(n): t for n, t in local_modules}
    remote: dict[str, str | None] = {}
    for name, text in remote_modules:
        # Two OPA modules with one file name cannot both match one local file.
        remote[module_name(name)] = None if module_name(name) in remote else text
    parts = []
    only_opa = sorted(remote.keys() - local.keys())
    only_local = sorted(local.keys() - remote.keys())
    changed = sorted(n for n in local.keys() & remote.keys() if local[n] != remote[n])
    changed_data = sorted(k for k in local_data if local_data[k] != remote_data.get(k, _MISSING))
    if only_opa:
        parts.append(f"modules only on OPA: {', '.join(only_opa)}")
    if only_local:
        parts.append(f"modules missing on OPA: {', '.join(only_local)}")
    if changed:
        parts.append(f"modules that differ: {', '.join(changed)}")
    if changed_data:
        parts.append(f"data that differs: {', '.join('data.' + k for k in changed_data)}")
    return "; ".join(parts) or "the same files, different content"


_MISSING = object()


def describe_error(exc: BaseException) -> str:
    """One line for an error from the client, aiohttp or OPA (the client's errors have no useful str)."""
    if isinstance(exc, RegoParseError):
        return str(exc).strip("()")
    if isinstance(exc, (ConnectionsError, DeletePolicyError, PolicyNotFoundError)):
        return f"{exc.expression}: {exc.message}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
