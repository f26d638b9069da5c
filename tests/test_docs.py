"""The docs cannot drift from the code: settings, error codes, reason codes and file names.

Settings are read in one module (``gateway/settings.py``) and refusals are
``ApiError``s with a literal code; a new one that the README does not list
fails here, so an operator never meets a knob or a code the docs do not name.
The same holds for the reason codes the policies in ``policies/`` can return
(the README's "Reason codes" table), and for the files ``docs/architecture.md``
and ``docs/performance.md`` name: a module that moves or goes must take its
line in the design with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pytest

from gateway.settings import Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _configuration_rows() -> set[str]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(GOVGATE_[A-Z_]+)` \|", section, flags=re.M))


def _error_codes() -> set[str]:
    codes: set[str] = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        codes.update(re.findall(r'ApiError\(\s*\d{3},\s*"([a-z_]+)"', path.read_text(encoding="utf-8")))
    return codes


@pytest.mark.parametrize("variable", sorted(f"GOVGATE_{name.upper()}" for name in Settings.__dataclass_fields__))
def test_every_setting_has_a_row_in_the_configuration_table(variable: str) -> None:
    assert variable in _configuration_rows(), f"{variable} is read by gateway/settings.py but not documented"


def test_the_configuration_table_lists_only_real_settings() -> None:
    known = {f"GOVGATE_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert _configuration_rows() - known == set()


def test_every_error_code_the_gateway_raises_is_in_the_readme() -> None:
    codes = _error_codes()
    assert {"invalid_json", "model_not_found", "invalid_value"} <= codes  # the scan finds the refusals
    missing = sorted(code for code in codes if f"`{code}`" not in README)
    assert missing == [], f"error codes the README does not document: {missing}"


# -- reason codes the policies can return -------------------------------------

#: Reason fields that are not a literal code, and where their codes are written
#: instead (as literal ``"code": "…"`` entries of a table the scan also reads).
INDIRECT_CODES = {"check.code": "the usage_checks table of policies/limits.rego"}


def policy_reason_codes(modules: Iterable[str]) -> set[str]:
    """Every ``"code": "…"`` the given Rego sources spell out.

    A reason whose code is an expression rather than a literal must be listed
    in :data:`INDIRECT_CODES` (its table's literal codes are found anyway);
    any other expression is an error, so a code built in a new way cannot
    slip past this scan.
    """
    codes: set[str] = set()
    for text in modules:
        for value in re.findall(r'"code"\s*:\s*([^,}\s]+)', text):
            literal = re.fullmatch(r'"([a-z_]+)"', value)
            if literal:
                codes.add(literal.group(1))
            elif value not in INDIRECT_CODES:
                raise ValueError(f"a reason code built from {value}: teach tests/test_docs.py where its codes are")
    return codes


def _policy_modules() -> list[str]:
    return [path.read_text(encoding="utf-8") for path in sorted((ROOT / "policies").rglob("*.rego"))
            if not path.name.endswith("_test.rego")]


def _reason_code_rows() -> set[str]:
    section = README.split("### Reason codes", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))


def test_the_reason_code_scan_reads_literals_and_tables() -> None:
    sample = ('denials contains {"code": "outside_hours", "message": msg} if { true }\n'
              'usage_checks := [{"limit": "in_flight", "code" : "too_many_in_flight", "window": "in_flight"}]\n'
              'denials contains {"code": check.code, "message": msg} if { some check in usage_checks }\n')
    assert policy_reason_codes([sample]) == {"outside_hours", "too_many_in_flight"}
    with pytest.raises(ValueError, match="codes_by_rule"):
        policy_reason_codes(['denials contains {"code": codes_by_rule[r], "message": m} if { true }'])


def test_every_reason_code_the_policies_return_is_in_the_readme() -> None:
    codes = policy_reason_codes(_policy_modules())
    assert {"unknown_role", "rate_limited", "denied"} <= codes  # the scan finds literals, tables and the default
    missing = sorted(codes - _reason_code_rows())
    assert missing == [], f"reason codes policies/ can return that README's 'Reason codes' table lacks: {missing}"


# -- files docs/architecture.md names ----------------------------------------

#: Top-level folders whose backticked paths are checked; other paths (``var/models/``,
#: a route like ``/v1/models``) are not files of the repository.
TOP_FOLDERS = ("gateway", "workers", "audit", "govgate", "policies", "tests", "docs", "bench", ".ci")
#: A backticked name without a folder is a file when it ends like one of these.
FILE_SUFFIXES = (".py", ".rego", ".json", ".toml", ".yaml", ".md", ".mako")


def named_paths(markdown: str) -> list[str]:
    """The repository paths a Markdown text names in inline code (fenced blocks are diagrams: skipped).

    A path starts with one of :data:`TOP_FOLDERS` and a slash, or is a bare
    file name with one of :data:`FILE_SUFFIXES`; it may hold a glob (``*``)
    or a placeholder (``<name>``).
    """
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    paths = []
    for span in re.findall(r"`([^`\s]+)`", text):
        if "/" in span:
            if span.split("/", 1)[0] in TOP_FOLDERS:
                paths.append(span)
        elif span.endswith(FILE_SUFFIXES):
            paths.append(span)
    return paths


def _exists(path: str, root: Path) -> bool:
    if "<" in path:  # a file still to be written: its folder must exist
        path = path.split("<", 1)[0].rsplit("/", 1)[0] + "/"
    if "/" not in path:  # a bare file name: somewhere in the repository
        return any(not any(part.startswith(".") for part in found.relative_to(root).parts)
                   for found in root.rglob(path))
    matches = list(root.glob(path.rstrip("/")))
    if path.endswith("/"):
        matches = [found for found in matches if found.is_dir()]
    return bool(matches)


def missing_paths(markdown: str, root: Path = ROOT) -> list[str]:
    """The paths :func:`named_paths` finds that do not exist under ``root``, sorted, once each."""
    return sorted({path for path in named_paths(markdown) if not _exists(path, root)})


def test_the_path_check_reports_what_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "gateway" / "api").mkdir(parents=True)
    (tmp_path / "gateway" / "app.py").write_text("")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "limits_test.rego").write_text("")
    sample = ("`gateway/app.py`, `gateway/api/`, `gateway/api/<name>.py`, `policies/*.rego`, `*_test.rego`;\n"
              "`gateway/gone.py`, `gateway/app.py/`, `workers/contract/`, `workers/backends/<name>.py`, "
              "`catalogue.py`;\n"
              "not paths: `model.<name>`, `/v1/models`, `var/models/`, `data.govgate.decision`, `POST /v1/x`\n"
              "```\n`gateway/in_a_diagram.py`\n```\n")
    assert missing_paths(sample, tmp_path) == ["catalogue.py", "gateway/app.py/", "gateway/gone.py",
                                               "workers/backends/<name>.py", "workers/contract/"]


def test_architecture_names_only_files_that_exist() -> None:
    markdown = ARCHITECTURE.read_text(encoding="utf-8")
    assert len(named_paths(markdown)) > 50  # the scan finds the document's paths
    missing = missing_paths(markdown)
    assert missing == [], f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_readme_points_to_the_architecture() -> None:
    assert "(docs/architecture.md)" in README.split("## Architecture", 1)[1].split("\n## ", 1)[0]


def test_the_performance_record_names_only_files_that_exist() -> None:
    """docs/performance.md quotes benches and modules by path: one that moves or goes must be followed there too."""
    markdown = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert len(named_paths(markdown)) > 50  # the scan finds the record's paths
    missing = missing_paths(markdown)
    assert missing == [], f"docs/performance.md names paths that do not exist: {missing}"


def test_the_readme_performance_points_to_the_record() -> None:
    assert "(docs/performance.md)" in README.split("## Performance", 1)[1].split("\n## ", 1)[0]


def packaged_folders() -> list[str]:
    """The top-level packages ``pyproject.toml`` installs (its ``packages.find`` include list)."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "packages"]["find"]["include"]
    return sorted(pattern.rstrip("*") for pattern in include)


def test_the_image_copies_every_package_the_project_installs() -> None:
    """A package added to pyproject.toml but not copied into the image would make ``pip install .`` miss it."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    copied = set(re.findall(r"^COPY (\S+) \./", dockerfile, flags=re.M))
    packages = packaged_folders()
    assert "govgate" in packages and "gateway" in packages  # the include list was read
    assert [name for name in packages if name not in copied] == []
