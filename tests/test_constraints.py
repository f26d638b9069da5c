"""constraints.txt is the set of versions the suite runs on, and fits pyproject.toml's ranges.

`make up`, `make test` and the image install with ``-c constraints.txt`` (.ci/lock.py
says why). These tests hold the file to what it claims: every requirement of the
project (its dependencies and the ``dev`` and ``client`` extras) is pinned, each pin
is inside the range pyproject.toml allows, and the environment running the suite
holds exactly the pinned versions, so a green run is a run on the locked set.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("dev", "client")


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}; every line a comment or ``name==version``."""
    found: dict[str, str] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        name, separator, version = line.partition("==")
        assert separator and name and version and " " not in line, f"constraints.txt:{number}: not name==version: {line!r}"
        assert name == canonicalize_name(name), f"constraints.txt:{number}: {name!r} is not in its normal form"
        assert name not in found, f"constraints.txt:{number}: {name} pinned twice"
        Version(version)  # raises on a version pip could not read either
        found[name] = version
    return found


def requirements() -> list[Requirement]:
    """The project's requirements that apply here: dependencies and the extras `make lock` resolves."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    listed = list(project["dependencies"])
    for extra in EXTRAS:
        listed += project["optional-dependencies"][extra]
    parsed = [Requirement(text) for text in listed]
    return [requirement for requirement in parsed
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""})]


def test_the_file_is_sorted_by_name_as_make_lock_writes_it() -> None:
    names = list(pins())
    assert len(names) > 50  # the file was read (the resolution is ~115 packages)
    assert names == sorted(names)


@pytest.mark.parametrize("requirement", requirements(), ids=lambda requirement: requirement.name)
def test_every_requirement_is_pinned_inside_its_range(requirement: Requirement) -> None:
    pinned = pins()
    name = canonicalize_name(requirement.name)
    assert name in pinned, f"{name} is required by pyproject.toml but not in constraints.txt: run `make lock`"
    assert requirement.specifier.contains(pinned[name], prereleases=True), (
        f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's {requirement.specifier}: "
        "run `make lock`")
    for extra in sorted(requirement.extras):  # redis[hiredis], celery[redis], psycopg[binary]: what the extra adds
        added = [Requirement(text) for text in metadata.requires(requirement.name) or ()
                 if Requirement(text).marker is not None
                 and Requirement(text).marker.evaluate({"extra": extra})
                 and not Requirement(text).marker.evaluate({"extra": ""})]
        assert added, f"{requirement.name}[{extra}] adds nothing here: the extra was read wrong"
        for inner in added:
            assert canonicalize_name(inner.name) in pinned, f"{inner.name} (from {requirement}) is not pinned"


def test_the_suite_runs_on_the_pinned_versions() -> None:
    """A venv installed before the last `make lock` (or by hand) would test another set than the one shipped."""
    pinned = pins()
    installed = {canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    assert "pytest" in installed and "litestar" in installed  # the environment was read
    differ = {name: (installed[name], version) for name, version in pinned.items()
              if name in installed and installed[name] != version}
    assert differ == {}, f"installed versions differ from constraints.txt (installed, pinned): {differ}; run `make test`"
    required = {canonicalize_name(requirement.name) for requirement in requirements()}
    assert sorted(required - set(installed)) == []
