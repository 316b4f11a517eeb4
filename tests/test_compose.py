"""deploy/compose.yaml, checked statically (no Docker here): the Compose schema, and the code it runs.

The file is interpolated with deploy/compose.env.example as `docker compose` would with deploy/.env,
validated against the Compose Specification's JSON schema (deploy/schemas/compose/), and then held
to what tests/test_deploy.py holds the Kubernetes manifests to: every CRD_* variable a Settings
field and every environment valid Settings, every command line one `crd` accepts, images built
from the Dockerfiles that define their entry points, ports and health checks where the processes
listen, Redis users from users.acl, secrets (passwords, the dashboard token) never written into the file.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path

import pytest

from crd_model.stream.settings import Settings
from tests.test_deploy import SUBCOMMANDS, _acl_users, _assert_cli_accepts, _clean_env, _entrypoint, _setting_exists

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "compose.env.example"
SCHEMA = DEPLOY / "schemas" / "compose" / "compose-spec.json"
DOCKERFILES = {
    "crd-inspect-worker": "deploy/Dockerfile.worker",
    "crd-inspect-producer": "deploy/Dockerfile.producer",
    "crd-inspect-plc": "deploy/Dockerfile.plc",
    "crd-inspect-dashboard": "deploy/Dockerfile.dashboard",
}
REDIS_CONF = DEPLOY / "redis" / "redis.conf"


def dotenv(path: Path) -> dict[str, str]:
    """KEY=value lines; '...' keeps the value literal, as in Compose's .env files."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value[1:-1] if value[:1] == value[-1:] == "'" and len(value) > 1 else value
    return env


_VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, in every string of the document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        have = env.get(name)
        if op in (":-", "-") and not (have if op == ":-" else have is not None):
            return arg
        if op in (":?", "?") and not (have if op == ":?" else have is not None):
            raise KeyError(f"compose would refuse to start: {name}: {arg}")
        return have or ""

    return _VARIABLE.sub(one, value)


@functools.cache
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # anchors and `<<` merges resolved, as Compose does


def compose() -> dict:
    return interpolate(raw(), dotenv(ENV_EXAMPLE))


def services(include_profiles: bool = True) -> dict[str, dict]:
    return {n: s for n, s in compose()["services"].items() if include_profiles or not s.get("profiles")}


def crd_services() -> dict[str, dict]:
    return {n: s for n, s in services().items() if s["image"].split(":")[0] in DOCKERFILES}


def argv(service: dict) -> list[str]:
    """The process a service runs: its entrypoint (or its image's ENTRYPOINT), then its command."""
    entrypoint = service.get("entrypoint") or _entrypoint(Path(DOCKERFILES[service["image"].split(":")[0]]).name)
    if entrypoint[:2] == ["tini", "--"]:
        entrypoint = entrypoint[2:]
    command = service.get("command", [])
    return [*entrypoint, *(shlex.split(command) if isinstance(command, str) else command)]


# ---- the file itself ---------------------------------------------------------------------------
def test_compose_file_validates_against_the_compose_schema():
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)
    assert {"redis", "worker", "producer-cam1", "results", "plc", "dashboard"} <= set(services())


def test_the_schema_check_catches_a_broken_file():
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    for what, change in {
        "misspelled key": lambda d: d["services"]["worker"].update(enviroment={}),
        "list where a map is expected": lambda d: d["services"]["worker"].update(deploy=["gpu"]),
        "unknown restart policy type": lambda d: d["services"]["redis"].update(stop_grace_period=30),
    }.items():
        doc = compose()
        change(doc)
        assert list(validator.iter_errors(doc)), f"not caught: {what}"


def test_every_variable_compose_needs_is_in_the_env_example():
    def strings(value: object) -> list[str]:
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else [str(value)]

    used = {m.group(1) or m.group(4) for s in strings(raw()) for m in _VARIABLE.finditer(s) if m.group(0) != "$$"}
    example = dotenv(ENV_EXAMPLE)
    assert used <= set(example), f"missing from compose.env.example: {used - set(example)}"
    assert not [k for k in example if k.startswith("CRD_")], "those belong in compose.yaml, checked as settings"
    with pytest.raises(KeyError, match="WORKER_MODELS"):
        interpolate(raw(), {k: v for k, v in example.items() if k != "WORKER_MODELS"})


# ---- against the code --------------------------------------------------------------------------
def test_every_environment_is_valid_settings(monkeypatch):
    n = 0
    for name, service in crd_services().items():
        env = {k: str(v) for k, v in service["environment"].items()}
        unknown = [k for k in env if k.startswith("CRD_") and not _setting_exists(k)]
        assert not unknown, f"{name}: not fields of Settings: {unknown}"
        _clean_env(monkeypatch)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s = Settings()  # raises on a value of the wrong type or shape
        assert s.redis.username in _acl_users(), f"{name}: {s.redis.username} is no user of users.acl"
        assert s.redis.password is not None
        assert s.redis.url == "redis://redis:6379/0"
        n += 1
    assert n >= 3


def test_secrets_come_from_the_env_file_never_from_compose_yaml():
    for name, service in raw()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "TOKEN" in key:
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}: {key} must be ${{VAR:?...}}"


def test_every_command_line_is_accepted_by_the_cli():
    seen = set()
    for name, service in crd_services().items():
        _assert_cli_accepts(argv(service), f"compose service {name}")
        seen.add(argv(service)[1])
    assert seen == set(SUBCOMMANDS)  # every daemon the CLI has runs here


def test_images_are_built_from_the_dockerfiles_of_their_entry_points():
    for name, service in crd_services().items():
        image = service["image"].split(":")[0]
        if "build" in service:
            assert service["build"]["dockerfile"] == DOCKERFILES[image], name
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == ROOT and (context / service["build"]["dockerfile"]).is_file(), name
        else:
            assert any(s.get("image") == service["image"] and "build" in s for s in services().values()), (
                f"{name}: image {service['image']} is built by no service"
            )


def _listen_ports(service: dict) -> tuple[int, set[int]]:
    """(the metrics port, every port the process listens on: metrics, and the dashboard's page)."""
    env = service["environment"]
    metrics = int(env.get("CRD_OBSERVABILITY__HTTP_PORT") or 9102)
    return metrics, {metrics} | ({int(env["CRD_DASHBOARD__PORT"])} if "CRD_DASHBOARD__PORT" in env else set())


def test_published_ports_and_health_checks_reach_the_processes():
    for name, service in crd_services().items():
        metrics, listening = _listen_ports(service)
        for mapping in service.get("ports", []):
            host_ip, _, container_port = str(mapping).split(":")
            assert host_ip == "127.0.0.1", f"{name}: published on the host's loopback only"
            assert int(container_port) in listening, f"{name}: nothing listens on {container_port}"
        check = " ".join(service.get("healthcheck", {}).get("test", []))
        if check:
            assert f"127.0.0.1:{metrics}/healthz" in check, name
    host_ports = [str(m).split(":")[1] for s in services().values() for m in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), f"two services on one host port: {host_ports}"
    worker = services()["worker"]
    assert worker["stop_grace_period"] == "60s"  # the drain, as terminationGracePeriodSeconds


def test_the_worker_gets_a_gpu_and_reads_its_models_read_only(monkeypatch):
    worker = services()["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    mounts = {v.split(":")[1]: v for v in worker["volumes"]}
    assert mounts["/models"].endswith(":ro")
    models = json.loads(worker["environment"]["CRD_WORKER__MODELS"])
    assert all(p.startswith("/models/") for p in models.values())


def test_redis_runs_the_repository_config_and_acl_file():
    redis = services()["redis"]
    volumes = {v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve() for v in redis["volumes"] if v.startswith("./")}
    command = redis["command"]
    conf_path = command[1]
    assert volumes[conf_path] == REDIS_CONF.resolve()
    aclfile = re.search(r"^aclfile (\S+)", REDIS_CONF.read_text(), re.M).group(1)
    assert volumes[aclfile] == (DEPLOY / "redis" / "users.acl").resolve()
    assert "/data" in {v.split(":")[1] for v in redis["volumes"]}  # the AOF survives a re-create
    options = dict(zip(command[2::2], command[3::2], strict=True))
    assert options["--port"] == "6379" and options["--tls-port"] == "0"
    assert "ports" not in redis, "Redis stays on the project network"
    assert re.fullmatch(r"redis:7\.[2-9]\S*|valkey/valkey:\S+", redis["image"]), "users.acl needs Redis >= 7.2"
