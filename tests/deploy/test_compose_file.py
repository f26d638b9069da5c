"""compose.yaml, checked without Docker: the Compose Specification's schema, then our own rules.

The schema (``compose-spec.json`` beside this file) is the copy Docker Compose
itself validates with: schema/compose-spec.json of the Go module
github.com/compose-spec/compose-go/v2, version v2.16.2 (Apache-2.0), fetched
with ``go mod download`` (module sum h1:pTp1DqQwJzFd85GzlWsSszKA1ABrV/ySqsClujIcWA8=;
file sha256 f266dcbb043229405d7cedd5aec918f9102c2b3d5e3850808fdd8edd564a43ff).
compose-go adds one format to it, ``duration`` (Go's time.ParseDuration), which
:data:`GO_DURATION` checks here. Refresh both together.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sqlalchemy.engine import make_url

from gateway.settings import Settings
from govgate.redis_server import PACKED_ENTRIES
from workers.contract.registry import load_registry
from tests.deploy.compose_model import (
    GOVGATE_IMAGE, ROOT, Dockerfile, Service, env_files, example_of, interpolate, load_compose,
    read_env_file, services,
)

SCHEMA_FILE = Path(__file__).with_name("compose-spec.json")
#: Go's time.ParseDuration syntax ("1h30m", "2.5s", "300ms").
GO_DURATION = re.compile(r"^[-+]?(\d+(\.\d*)?(ns|us|µs|ms|s|m|h))+$|^0$")
RESTART_POLICIES = {"always", "unless-stopped", "on-failure"}
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|_KEY)$", re.IGNORECASE)
CREDENTIALS_IN_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)


def _validator() -> jsonschema.Validator:
    checker = jsonschema.FormatChecker()
    checker.checks("duration")(lambda value: not isinstance(value, str) or bool(GO_DURATION.match(value)))
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


def _errors(document: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(document)]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def all_services(compose: dict[str, Any]) -> dict[str, Service]:
    return services(compose)


def _govgate_services(all_services: dict[str, Service]) -> dict[str, Service]:
    return {name: s for name, s in all_services.items() if s.runs_govgate}


# -- the Compose Specification ----------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    assert _errors(compose) == []
    assert _errors(interpolate(compose)) == []  # and once the ${...} defaults are in


@pytest.mark.parametrize("break_it", [
    lambda c: c["services"]["gateway"]["depends_on"]["redis"].update(condition="whenever"),
    lambda c: c["services"]["opa"].update(healthckeck={"test": ["CMD", "true"]}),
    lambda c: c["services"]["worker-tiny"].update(pull_policy="sometimes"),
    lambda c: c["services"]["gateway"].update(volumes="govgate-keys:/etc/govgate/keys"),
    lambda c: c.update(servicez={}),
], ids=["depends-on-condition", "unknown-key", "pull-policy", "volumes-type", "top-level-key"])
def test_the_schema_check_rejects_a_broken_compose_file(compose: dict[str, Any], break_it) -> None:
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert _errors(broken), "the vendored schema accepted a broken file: is it really applied?"


# -- our own rules ------------------------------------------------------------


def health_and_restart_problems(compose: dict[str, Any]) -> list[str]:
    """What keeps a service from being watched and brought back: no real health check, no restart policy."""
    problems = []
    for name, service in services(compose).items():
        check = service.spec.get("healthcheck") or {}
        test = list(interpolate(check.get("test", [])))
        if not test or check.get("disable") or test[0] not in {"CMD", "CMD-SHELL"} or len(test) < 2:
            problems.append(f"{name} has no health check")
        elif "version" in test[1:]:
            problems.append(f"{name}: printing a version says nothing about the server")
        if service.spec.get("restart") not in RESTART_POLICIES:
            problems.append(f"{name} has no restart policy")
        for key in ("interval", "timeout", "start_period", "start_interval"):  # the schema leaves them free
            if not GO_DURATION.match(str(check.get(key, "0"))):
                problems.append(f"{name}: healthcheck {key} {check[key]!r} is not a duration")
    return problems


def inline_secrets(compose: dict[str, Any], text: str) -> list[str]:
    """Secrets written in the compose file (``text`` is the file itself) rather than in an env file."""
    problems = ["a URL with a password in the file"] if CREDENTIALS_IN_URL.search(text) else []
    for name, service in services(compose).items():
        raw = interpolate(service.spec.get("environment", {}))
        pairs = raw.items() if isinstance(raw, dict) else (item.split("=", 1) for item in raw)
        for key, value in pairs:
            if SECRET_NAME.search(key) or CREDENTIALS_IN_URL.search(str(value)):
                problems.append(f"{name}: {key} is set in compose.yaml; put it in an env file")
        words = service.command + [str(part) for part in (service.spec.get("healthcheck") or {}).get("test", [])]
        if any(CREDENTIALS_IN_URL.search(word) or re.search(r"--(requirepass|password)\b", word) for word in words):
            problems.append(f"{name}: a secret in a command")
    return problems


def test_every_service_has_a_real_health_check_and_a_restart_policy(compose: dict[str, Any]) -> None:
    assert health_and_restart_problems(compose) == []


def test_no_secret_is_written_in_the_compose_file(compose: dict[str, Any]) -> None:
    assert inline_secrets(compose, (ROOT / "compose.yaml").read_text()) == []


@pytest.mark.parametrize("break_it", [
    lambda c: c["services"]["redis"].pop("healthcheck"),
    lambda c: c["services"]["opa"]["healthcheck"].update(test=["CMD", "/opa", "version"]),
    lambda c: c["services"]["postgres"]["healthcheck"].update(disable=True),
    lambda c: c["services"]["worker-tiny"].pop("restart"),
    lambda c: c["services"]["lb"].update(restart="no"),
    lambda c: c["services"]["gateway"]["healthcheck"].update(interval="10 seconds"),
], ids=["no-check", "opa-version", "disabled", "no-restart", "restart-no", "bad-duration"])
def test_the_health_and_restart_rule_catches_what_it_is_for(compose: dict[str, Any], break_it) -> None:
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert health_and_restart_problems(broken)


@pytest.mark.parametrize("break_it", [
    lambda c: c["services"]["postgres"].update(environment={"POSTGRES_PASSWORD": "hunter2"}),
    lambda c: c["services"]["gateway"]["environment"].update(
        GOVGATE_DATABASE_URL="postgresql+psycopg://govgate:hunter2@postgres:5432/govgate"),
    lambda c: c["services"]["worker-tiny"].update(environment=["OPENAI_API_KEY=sk-123"]),
    lambda c: c["services"]["redis"].update(command=["redis-server", "--requirepass", "hunter2"]),
], ids=["password", "url-credentials", "api-key-list-form", "command"])
def test_the_secret_rule_catches_what_it_is_for(compose: dict[str, Any], break_it) -> None:
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert inline_secrets(broken, "")


def test_env_files_are_private_with_a_committed_example(all_services: dict[str, Service]) -> None:
    used = {path for service in all_services.values() for path in env_files(service.spec)}
    assert used, "the secrets must come from env files"
    for path in used:
        assert example_of(path).is_file(), f"{path.name} has no committed example"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path.relative_to(ROOT))], cwd=ROOT)
        assert ignored.returncode == 0, f"{path.relative_to(ROOT)} is not gitignored"
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path.relative_to(ROOT))], cwd=ROOT,
                                 capture_output=True)
        assert tracked.returncode != 0, f"{path.relative_to(ROOT)} is committed"
        for key, value in read_env_file(example_of(path)).items():
            if SECRET_NAME.search(key) or CREDENTIALS_IN_URL.search(value):
                assert "CHANGE-ME" in value, f"{example_of(path).name}: {key} must be a placeholder"


def test_the_govgate_image_is_built_once_and_reused_by_name(all_services: dict[str, Service]) -> None:
    built = {name: s for name, s in all_services.items() if "build" in s.spec}
    assert list(built) == ["gateway"], f"build: must appear once, in the gateway, not in {sorted(built)}"
    build = built["gateway"].spec["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == ROOT / "Dockerfile"
    assert built["gateway"].spec["image"] == GOVGATE_IMAGE
    runners = _govgate_services(all_services)
    assert {"gateway", "worker-tiny", "worker-gemma"} <= set(runners)
    for name, service in runners.items():
        assert service.spec["image"] == GOVGATE_IMAGE, name
        if "build" not in service.spec:
            # Compose would try to pull govgate:local from a registry before the gateway built it.
            assert service.spec.get("pull_policy") == "never", f"{name} must not pull the local image"


def test_every_govgate_variable_it_sets_is_a_setting(all_services: dict[str, Service]) -> None:
    known = {f"GOVGATE_{name.upper()}" for name in Settings.__dataclass_fields__}
    seen = set()
    for name, service in _govgate_services(all_services).items():
        env = service.environment
        seen |= {key for key in env if key.startswith("GOVGATE_")}
        unknown = {key for key in env if key.startswith("GOVGATE_")} - known
        assert not unknown, f"{name} sets variables govgate does not read: {sorted(unknown)}"
        Settings.from_env(env)  # and each value is one govgate accepts
    assert {"GOVGATE_DATABASE_URL", "GOVGATE_REDIS_URL", "GOVGATE_OPA_URL"} <= seen


def test_every_mounted_file_exists_and_every_volume_is_declared(
        compose: dict[str, Any], all_services: dict[str, Service]) -> None:
    declared = set(compose.get("volumes", {}))
    used = set()
    for name, service in all_services.items():
        for mount in service.mounts:
            if mount.named:
                assert mount.source in declared, f"{name}: volume {mount.source} is not declared"
                used.add(mount.source)
            else:
                assert mount.repo_path.exists(), f"{name} mounts {mount.source}, which is not in the repo"
                assert mount.repo_path.is_relative_to(ROOT), f"{name} mounts {mount.source} from outside the repo"
                assert mount.read_only, f"{name} mounts {mount.source} writable"
    assert used == declared, f"declared but unused volumes: {sorted(declared - used)}"


def test_redis_keeps_queued_work_and_never_evicts(all_services: dict[str, Service]) -> None:
    command = all_services["redis"].command
    options = dict(zip(command[1::2], command[2::2]))
    assert command[0] == "redis-server"
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    # packed only while small, as the embedded Redis (a usage counter read from a packed hash scans it)
    assert options["--hash-max-ziplist-entries"] == options["--zset-max-ziplist-entries"] == PACKED_ENTRIES
    assert any(mount.target == "/data" and mount.named for mount in all_services["redis"].mounts)


def test_the_audit_store_is_the_postgresql_service(all_services: dict[str, Service]) -> None:
    postgres = all_services["postgres"].environment
    for name, service in _govgate_services(all_services).items():
        url = make_url(service.environment["GOVGATE_DATABASE_URL"])
        assert url.drivername == "postgresql+psycopg", name
        assert (url.host, url.port or 5432) == ("postgres", 5432), name
        assert (url.username, url.password, url.database) == (
            postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"]), name
    assert any(m.target == "/var/lib/postgresql/data" and m.named for m in all_services["postgres"].mounts)


def test_one_worker_service_per_model_with_the_models_volume(all_services: dict[str, Service],
                                                             tmp_path: Path) -> None:
    gateway = all_services["gateway"]
    registry_file = gateway.environment["GOVGATE_MODELS_FILE"]
    [source] = [m for m in gateway.mounts if m.target == registry_file]
    registry = load_registry(source.repo_path, tmp_path)
    served: dict[str, str] = {}
    for name, service in _govgate_services(all_services).items():
        command = service.command
        if command[0] != "worker":
            continue
        model = command[command.index("--model") + 1]
        assert model not in served, f"{model} is served by {served[model]} and {name}"
        served[model] = name
        mounts = {m.target: m for m in service.mounts}
        assert registry_file in mounts and mounts[registry_file].source == source.source, name
        folder = str(registry.get(model).path.parent)
        assert folder in mounts and mounts[folder].named, f"{name}: the model's folder {folder} is not a volume"
    assert sorted(served) == registry.names()


def test_gateway_replicas_policy_and_the_load_balancer_agree(all_services: dict[str, Service]) -> None:
    gateway, opa, lb = all_services["gateway"], all_services["opa"], all_services["lb"]
    assert gateway.spec["deploy"]["replicas"] >= 2
    assert "ports" not in gateway.spec, "replicas cannot share a published port: the lb publishes it"
    env = gateway.environment
    port = env["GOVGATE_PORT"]
    health_url = gateway.healthcheck_test[-1]
    assert health_url == f"http://127.0.0.1:{port}/readyz"

    opa_url = make_url(env["GOVGATE_OPA_URL"].replace("http://", "postgresql://"))  # any URL parser will do
    addr = opa.command[opa.command.index("--addr") + 1]
    assert (opa_url.host, str(opa_url.port)) == ("opa", addr.rsplit(":", 1)[1])
    policy_mounts = {m.target: m.source for m in gateway.mounts + opa.mounts if m.target in (
        env["GOVGATE_POLICY_DIR"], opa.command[-1])}
    assert set(policy_mounts.values()) == {"./policies"}, "gateway and OPA must read the same policy folder"

    config = (ROOT / "deploy" / "haproxy.cfg").read_text()
    [template] = re.findall(r"^\s*server-template\s+\S+\s+\d+\s+(\S+)", config, re.MULTILINE)
    assert template == f"gateway:{port}"
    assert re.search(r"^\s*option httpchk GET /readyz\s*$", config, re.MULTILINE)
    [monitor] = re.findall(r"^\s*monitor-uri\s+(\S+)", config, re.MULTILINE)
    assert lb.healthcheck_test[-1].endswith(f":8080{monitor}")
    assert re.search(r"^\s*bind :8080\s*$", config, re.MULTILINE)
    assert [p.split(":")[-1] for p in interpolate(lb.spec["ports"])] == ["8080"]
    assert lb.spec["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_services_wait_for_what_they_need(all_services: dict[str, Service]) -> None:
    needs = {"gateway": {"redis", "postgres", "opa"}, "worker-tiny": {"redis", "postgres"},
             "worker-gemma": {"redis", "postgres"}}
    for name, dependencies in needs.items():
        depends = all_services[name].spec["depends_on"]
        assert {dep for dep, how in depends.items() if how["condition"] == "service_healthy"} == dependencies


# -- the Dockerfile -------------------------------------------------------------


def test_dockerfile_installs_libgomp_and_runs_unprivileged() -> None:
    dockerfile = Dockerfile.read()
    installs = " ".join(dockerfile.all("RUN"))
    assert re.search(r"apt-get install\b[^&;]*\blibgomp1\b", installs), "xllamacpp needs libgomp1"
    users = dockerfile.all("USER")
    assert users and users[-1] not in {"root", "0"}
    assert "VOLUME" not in {word for word, _ in dockerfile.instructions}, "anonymous volumes would split the keys"


def test_dockerfile_copies_files_that_exist_and_the_build_context_keeps() -> None:
    dockerfile = Dockerfile.read()
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    assert ignore[0] == "*", ".dockerignore must start from nothing and admit what the image needs"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for rest in dockerfile.all("COPY"):
        *sources, _ = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert source.rstrip("/") in kept, f"COPY {source}: .dockerignore leaves it out"
    assert not any(k.startswith("deploy/") and k.endswith(".env") for k in kept)


def test_the_image_entrypoint_and_every_service_command_are_real_govgate_commands(
        all_services: dict[str, Service]) -> None:
    from govgate.cli import main

    dockerfile = Dockerfile.read()
    assert dockerfile.exec_form("ENTRYPOINT") == ["govgate"]
    from importlib.metadata import entry_points  # the console script the pip install makes

    [script] = [ep for ep in entry_points(group="console_scripts") if ep.name == "govgate"]
    assert script.value == "govgate.cli:main"
    commands = [dockerfile.exec_form("CMD")] + [s.command for s in _govgate_services(all_services).values()]
    for command in commands:
        assert command[0] in main.commands, f"govgate {command[0]}: no such command"
        options = {opt for param in main.commands[command[0]].params for opt in param.opts}
        assert {word for word in command[1:] if word.startswith("--")} <= options, command
