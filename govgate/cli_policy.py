"""``govgate policy``: explain, check, test and replay the Rego policy."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from gateway.settings import Settings
from govgate.cli_common import audit_engine, load_settings, one_line

#: ``policy explain``'s exit status on a deny, or on an output the output rules stop (1 is an error,
#: 2 a usage error: click's).
EXIT_DENIED = 3


@click.group()
def policy() -> None:
    """Explain, check, test and replay the Rego policy."""


@policy.command("explain")
@click.option("--input", "input_file", type=click.File("r"), required=True,
              help="A policy input document (JSON), as described in the README; '-' for stdin.")
@click.option("--output", "output_file", type=click.File("r", encoding="utf-8"), default=None,
              help="A file holding a model's output: also judge it with the output rules (output_decision), "
                   "as one whole output of the request the input describes.")
@click.option("--policy-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Policy folder (default: GOVGATE_POLICY_DIR).")
def policy_explain(input_file, output_file, policy_dir: Path | None) -> None:
    """Print the decision, reasons and obligations for one input (and with --output the output decision on
    a text); exit 0 on allow, 3 on deny or a stopped output (1 on an error, 2 on a wrong option or argument)."""
    import asyncio

    try:
        document = _strict_json(input_file.read())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: nesting
        raise click.ClickException(f"the input is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise click.ClickException("the input must be a JSON object")
    from gateway.requests.policy_input import with_normalized_text

    document = with_normalized_text(document)
    try:
        output = output_file.read() if output_file is not None else None
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"the output file is not UTF-8 text: {exc}") from None
    settings = load_settings()

    async def explain() -> tuple[dict, dict | None, str]:
        from gateway.requests.output_input import output_policy_input

        engine = await _open_engine(settings, policy_dir)
        try:
            decision = await engine.decide(document)
            judged = None
            if output is not None:  # in the request's context, as the gateway would after an allow
                judged = await engine.decide_output(output_policy_input(document, decision, output))
            return decision.to_document(), None if judged is None else judged.to_document(), engine.revision
        finally:
            await engine.aclose()

    decision, output_decision, revision = asyncio.run(explain())
    shown = {"revision": revision, **decision}
    if output_decision is not None:
        shown["output_decision"] = output_decision
    click.echo(json.dumps(shown, indent=2, sort_keys=True))
    if not decision["allow"]:
        for reason in decision["reasons"]:
            retry = f" (retry after {reason['retry_after_s']}s)" if reason.get("retry_after_s") else ""
            click.echo(f"denied: {reason['code']}: {reason['message']}{retry}", err=True)
    if output_decision is not None and not output_decision["allow"]:
        for reason in output_decision["reasons"]:
            click.echo(f"output stopped: {reason['code']}: {reason['message']}", err=True)
    if not decision["allow"] or (output_decision is not None and not output_decision["allow"]):
        sys.exit(EXIT_DENIED)


@policy.command("test")
@click.option("--policy-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Policy folder (default: GOVGATE_POLICY_DIR).")
@click.option("--engine", type=click.Choice(["auto", "opa", "embedded"]), default="auto", show_default=True,
              help="auto: 'opa test' when an opa binary is found, else the embedded engine.")
def policy_test(policy_dir: Path | None, engine: str) -> None:
    """Run the Rego unit tests (*_test.rego) beside the policies."""
    import subprocess

    from gateway.policy.opa_binary import find_opa
    from gateway.policy.unittests import run_all, test_files

    folder = policy_dir or load_settings().policy_dir
    opa = find_opa()
    if engine == "opa" and not opa:
        raise click.ClickException("no opa binary found (build one with 'make opa')")
    if not test_files(folder):  # 'opa test' passes a folder with nothing to test: exit 0, not a word (probe s56 C)
        raise click.ClickException(f"no Rego unit tests (*_test.rego) in {folder}: nothing was tested")
    if engine != "embedded" and opa:
        sys.exit(subprocess.run([opa, "test", str(folder), "-v"]).returncode)
    try:
        results = run_all(folder)
    except (ValueError, RuntimeError, OSError) as exc:  # no module, not UTF-8, a module that does not compile
        raise click.ClickException(f"the policy in {folder} cannot be tested: {exc}") from None
    failed = [r for r in results if not r.passed]
    for result in results:
        mark = "PASS" if result.passed else "FAIL"
        click.echo(f"{mark} {result.test.file}::{result.test.rule}{': ' + result.detail if result.detail else ''}")
    click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed or not results:
        sys.exit(1)


@policy.command("check")
@click.option("--policy-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Policy folder (default: GOVGATE_POLICY_DIR).")
def policy_check(policy_dir: Path | None) -> None:
    """Load a policy folder and run the trial a gateway runs before serving it (at start and at every reload).

    Exits 0 when a gateway would serve the folder, 1 with the one line a gateway would refuse it with (2 when an
    option is wrong, such as a --policy-dir that is not a folder).
    Needs neither Redis nor the database, so a folder can be checked before it is deployed (probe q3 F5:
    `policy replay`, the check the README recommends, reported normally on folders the gateway refuses)."""
    from workers.contract.registry import RegistryError, load_registry

    settings = load_settings()
    folder = policy_dir or settings.policy_dir
    try:
        registry = load_registry(settings.models_file, settings.var_dir)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    from govgate.cli import _check_policy

    # On the embedded engine, whatever GOVGATE_OPA_URL says: an OPA server holds its own folder, not this one.
    _check_policy(settings.with_(policy_dir=folder, opa_url=""), registry)
    click.echo(f"{folder}: the policy loads and passes its trial (a gateway would serve it)")


#: The longest integer an input may hold (Python's own limit on reading one; its message named an API to raise it).
_MAX_DIGITS = 4300


def _strict_json(text: str) -> object:
    """``text`` as JSON as the API reads a body (``gateway/requests/parsing.py``): ``NaN`` and ``Infinity`` are
    not JSON (one became a ``policy_error`` deny, exit 3), a name given twice is refused (the last one won), and
    a 5,000-digit number is named as such (probe s56)."""
    from gateway.requests.parsing import not_json_constant, repeated_name

    def whole(digits: str) -> int:
        if len(digits.lstrip("-")) > _MAX_DIGITS:
            raise ValueError(f"a number has {len(digits.lstrip('-'))} digits (at most {_MAX_DIGITS})")
        return int(digits)

    document = json.loads(text, parse_constant=not_json_constant, parse_int=whole)
    repeated = repeated_name(text.encode("utf-8", "surrogatepass"))
    if repeated is not None:
        name, path = repeated
        raise ValueError(f"the name {name!r} is given twice in one object (at {path})")
    return document


@policy.command("replay")
@click.option("--candidate", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The policy folder to try.")
@click.option("--since", default="7d", show_default=True, help="Period: 7d, 12h, 30m, 2w, or an ISO date.")
@click.option("--examples", default=3, show_default=True, type=click.IntRange(min=0),
              help="Examples shown per kind of change.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def policy_replay(candidate: Path, since: str, examples: int, as_json: bool) -> None:
    """Re-decide audited requests under a candidate policy and report what would change; judge the outputs
    the log kept in full with the candidate's output rules too."""
    import asyncio

    from audit import AuditStore
    from gateway.policy import EmbeddedPolicyEngine, PolicyLoadError
    from gateway.replay import parse_since, replay

    try:
        start = parse_since(since)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    settings = load_settings()

    async def run():
        try:
            engine = EmbeddedPolicyEngine.load(candidate, settings.policy_timeout_s, vm=settings.policy_vm,
                                               vm_check_every=settings.policy_vm_check_every)
        except PolicyLoadError as exc:
            raise click.ClickException(f"the candidate policy does not load: {one_line(str(exc))}") from None
        try:  # the store once the candidate loads: a folder that does not compile is said first
            store = AuditStore(audit_engine())
            return await replay(store.iter_entries(), engine, start, examples_per_change=examples)
        finally:
            await engine.aclose()

    report = asyncio.run(run())
    if as_json:
        click.echo(json.dumps(report.to_document(), indent=2, sort_keys=True))
        return
    click.echo(f"replayed {report.evaluated} requests since {report.since:%Y-%m-%d %H:%M} UTC "
               f"under candidate revision {report.candidate_revision}")
    if report.skipped:
        click.echo(f"  {report.skipped} could not be replayed (no recorded policy input)")
    click.echo(f"  with their prompt kept in full: {report.evaluated - report.partial}")
    click.echo(f"  unchanged: {report.unchanged}   would change: {report.changed}")
    _print_changes(report.transitions, report.examples)
    if report.partial:
        partial = report.partial_changes
        click.echo(f"\n  without their full prompt (prompt_logging hash or redacted, or erased by prune): "
                   f"{report.partial}, decided on what was kept, so content rules saw no text: a difference "
                   "may be the candidate's or only the missing text's")
        click.echo(f"  same decision: {partial.unchanged}   differ: {partial.differ}")
        _print_changes(partial.transitions, partial.examples)
    outputs = report.outputs
    click.echo(f"\noutputs: judged {outputs.evaluated} completions under the candidate's output rules")
    if outputs.not_judged:
        click.echo(f"  {outputs.not_judged} not judged (output kept only as a digest or masked)")
    if outputs.skipped:
        click.echo(f"  {outputs.skipped} skipped (their request entry is outside the period or has no policy input)")
    click.echo(f"  unchanged: {outputs.unchanged}   would change: {outputs.changed}")
    _print_changes(outputs.transitions, outputs.examples)


def _print_changes(transitions: Counter, examples: dict[str, list[Any]]) -> None:
    """Each kind of change, most frequent first, with its examples."""
    for transition, count in transitions.most_common():
        click.echo(f"\n  {count:>6}  {transition}")
        for change in examples[transition]:
            detail = f"  [{change.detail}]" if change.detail else ""
            click.echo(f"          e.g. seq {change.seq} {change.at} {change.principal or '-'} "
                       f"{change.model or '-'} {change.request_id}{detail}")


async def _open_engine(settings: Settings, policy_dir: Path | None):
    """The engine the gateway would use (OPA when GOVGATE_OPA_URL is set), on ``policy_dir``."""
    from gateway.policy import PolicyLoadError, open_policy_engine

    try:
        return await open_policy_engine(settings.with_(policy_dir=policy_dir or settings.policy_dir))
    except PolicyLoadError as exc:
        raise click.ClickException(str(exc)) from None
