"""compose.yaml and the Dockerfile read the way Docker would, for the deploy tests.

Docker cannot run here, so the tests read the files themselves: the YAML
(merge keys resolved by the loader, as Compose does), ``${VAR:-default}``
interpolation with the defaults (no variable is set), the environment each
service's container would get (the image's ``ENV``, then its ``env_file`` —
read from the committed ``.example`` copy, since the real file is private —
then its ``environment``), and its mounts. The topology test starts the
processes from exactly this environment, with container names and paths
mapped onto the loopback machine.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
#: The image compose.yaml builds from the Dockerfile (one build, reused by name).
GOVGATE_IMAGE = "govgate:local"

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}"
                       r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class InterpolationError(ValueError):
    """A ``${VAR}`` without a default: the file would depend on the operator's shell."""


def interpolate(value: Any) -> Any:
    """``value`` with Compose's interpolation applied, no variable being set (defaults only)."""
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("default") is None:
            raise InterpolationError(f"{match.group(0)} has no default")
        return match.group("default")

    return _VARIABLE.sub(one, value)


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as Compose sees it before interpolation (YAML merge keys resolved)."""
    return yaml.safe_load(path.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (comments and blank lines skipped), as Compose's env_file reads them."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value.strip()
    return values


def env_files(service: dict[str, Any]) -> list[Path]:
    """The service's env files, as paths in the repo (short and long syntax)."""
    raw = service.get("env_file", [])
    items = [raw] if isinstance(raw, (str, dict)) else raw
    return [ROOT / (item["path"] if isinstance(item, dict) else item) for item in items]


def example_of(path: Path) -> Path:
    """The committed example of a private env file."""
    return path.with_name(path.name + ".example")


@dataclass(frozen=True)
class Dockerfile:
    """The instructions of the Dockerfile that matter to the tests."""

    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path = DOCKERFILE) -> "Dockerfile":
        text = re.sub(r"\\\n", " ", path.read_text())
        instructions = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                word, _, rest = line.partition(" ")
                instructions.append((word.upper(), rest.strip()))
        return cls(instructions)

    def all(self, word: str) -> list[str]:
        return [rest for name, rest in self.instructions if name == word]

    @property
    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for rest in self.all("ENV"):
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {rest!r}: only the KEY=VALUE form is read here"
                values[key] = value
        return values

    def exec_form(self, word: str) -> list[str]:
        """The last ``ENTRYPOINT``/``CMD`` in exec form (JSON), as Docker keeps only the last."""
        import json

        found = self.all(word)
        assert found, f"the Dockerfile has no {word}"
        value = json.loads(found[-1])
        assert isinstance(value, list), f"{word} must be in exec form (a JSON list)"
        return value


@dataclass
class Mount:
    """A volume of a service: a named volume or a bind of a repo path, at ``target``."""

    source: str
    target: str
    read_only: bool
    named: bool

    @classmethod
    def parse(cls, spec: str | dict[str, Any]) -> "Mount":
        if isinstance(spec, dict):
            return cls(spec["source"], spec["target"], bool(spec.get("read_only")), spec.get("type") == "volume")
        parts = spec.split(":")
        source, target = parts[0], parts[1]
        options = parts[2].split(",") if len(parts) > 2 else []
        return cls(source, target, "ro" in options, not source.startswith((".", "/")))

    @property
    def repo_path(self) -> Path:
        assert not self.named
        return (ROOT / self.source).resolve()


@dataclass
class Service:
    """One service of the compose file, with what its container would see."""

    name: str
    spec: dict[str, Any]
    image_env: dict[str, str] = field(default_factory=dict)

    @property
    def runs_govgate(self) -> bool:
        return self.spec.get("image") == GOVGATE_IMAGE or "build" in self.spec

    @property
    def mounts(self) -> list[Mount]:
        return [Mount.parse(item) for item in interpolate(self.spec.get("volumes", []))]

    @property
    def command(self) -> list[str]:
        command = interpolate(self.spec.get("command", []))
        return shlex.split(command) if isinstance(command, str) else list(command)

    @property
    def environment(self) -> dict[str, str]:
        """Image ENV, then env files (their examples), then ``environment``: later wins, as in Docker."""
        env = dict(self.image_env) if self.runs_govgate else {}
        for path in env_files(self.spec):
            env.update(read_env_file(example_of(path)))
        raw = interpolate(self.spec.get("environment", {}))
        if isinstance(raw, list):
            raw = dict(item.split("=", 1) for item in raw)
        env.update({key: "" if value is None else str(value) for key, value in raw.items()})
        return env

    @property
    def healthcheck_test(self) -> list[str]:
        return list(interpolate(self.spec["healthcheck"]["test"]))


def services(compose: dict[str, Any] | None = None) -> dict[str, Service]:
    compose = load_compose() if compose is None else compose
    image_env = Dockerfile.read().env
    return {name: Service(name, spec, image_env) for name, spec in compose["services"].items()}
