"""Every manifest in deploy/k8s against its API schema, offline.

Kubernetes objects: the OpenAPI schemas bundled by PyPI `kubernetes-validate`, in strict mode (an
unknown field is an error, as `kubectl apply` reports it), for the oldest Kubernetes this deployment
supports and the newest the pinned package bundles. KEDA objects: KEDA's own CRDs, copied into
deploy/schemas/keda/, made strict the same way, their CEL rules checked, metadata checked against
Kubernetes' ObjectMeta. Kinds with no schema offline are listed, so none goes unchecked unnoticed.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KEDA_SCHEMAS = ROOT / "deploy" / "schemas" / "keda"
SHARED_KEDA = ROOT.parent / "shared" / "schemas" / "keda"

# The oldest Kubernetes this deployment supports (docs/deploy.md) and the newest the pinned
# kubernetes-validate bundles: a field too new for the one or removed by the other fails.
KUBERNETES_VERSIONS = ("1.31", "1.37")
# Documents with no schema available offline, and why.
NO_SCHEMA = {
    "Kustomization": "kustomize's own file, not an API object",
    "ServiceMonitor": "Prometheus Operator CRD, no schema in the repository",
    "PodMonitor": "Prometheus Operator CRD, no schema in the repository",
    "PrometheusRule": "Prometheus Operator CRD, no schema in the repository",
}


def _documents() -> Iterator[tuple[str, dict]]:
    for path in sorted(K8S.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield f"{path.name}#{i}", doc


# ---- Kubernetes --------------------------------------------------------------------------------
def kubernetes_errors(doc: dict, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path)) or '(root)'}: {exc.message}"]
    return []


def has_kubernetes_schema(doc: dict) -> bool:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        pass
    return True


@functools.cache
def _object_meta_validator() -> jsonschema.protocols.Validator:
    """Kubernetes' ObjectMeta (strict), for the metadata of custom resources (their CRDs leave it open)."""
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    defs = json.loads((root / f"v{KUBERNETES_VERSIONS[-1]}.0-local-strict" / "_definitions.json").read_text())
    schema = {"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", "$defs": defs["$defs"]}
    return jsonschema.Draft202012Validator(schema)


# ---- KEDA --------------------------------------------------------------------------------------
# The CEL rules (x-kubernetes-validations) of KEDA's CRDs, as Python. A rule not listed here fails
# test_every_cel_rule_of_the_keda_schemas_is_checked: a new KEDA schema must be taught its rules.
CEL_RULES: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)": (
        "minReplicaCount must be less than or equal to maxReplicaCount",
        lambda spec: "minReplicaCount" not in spec or spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100),
    ),
}


def _strict(schema: object) -> object:
    """Unknown fields become errors (additionalProperties: false) where the CRD lists the fields,
    except where it says to keep unknown ones: what `kubectl apply --validate=strict` reports."""
    if isinstance(schema, dict):
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for v in schema.values():
            _strict(v)
    elif isinstance(schema, list):
        for v in schema:
            _strict(v)
    return schema


_formats = jsonschema.FormatChecker()


@_formats.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_formats.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@functools.cache
def keda_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the CRD's openAPIV3Schema, for every served version."""
    out = {}
    for path in sorted(KEDA_SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                out[key] = version["schema"]["openAPIV3Schema"]
    return out


def _cel_rules(schema: dict, instance: object, path: str = "") -> Iterator[tuple[str, str, object]]:
    """(path, rule, the value it applies to) for every x-kubernetes-validations rule that applies."""
    for v in schema.get("x-kubernetes-validations", []):
        yield path, v["rule"], instance
    if isinstance(instance, dict):
        for key, value in instance.items():
            if key in schema.get("properties", {}):
                yield from _cel_rules(schema["properties"][key], value, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                yield from _cel_rules(schema["additionalProperties"], value, f"{path}.{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(instance):
            yield from _cel_rules(schema["items"], value, f"{path}[{i}]")


def keda_errors(doc: dict) -> list[str]:
    schema = keda_schemas()[(doc["apiVersion"], doc["kind"])]
    # OpenAPI 3.0 schemas are closest to JSON Schema draft 4 (e.g. a boolean exclusiveMinimum).
    validator = jsonschema.Draft4Validator(_strict(copy.deepcopy(schema)), format_checker=_formats)
    errors = [f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in validator.iter_errors(doc)]
    errors += [f"metadata.{'.'.join(map(str, e.path))}: {e.message}" for e in _object_meta_validator().iter_errors(
        doc.get("metadata", {}))]  # fmt: skip
    for path, rule, value in _cel_rules(schema, doc):
        message, check = CEL_RULES.get(rule, ("unknown rule", lambda _: False))
        if not check(value):
            errors.append(f"{path}: {message} ({rule})")
    return errors


def schema_errors(doc: dict) -> list[str]:
    """Every error of one manifest, against every schema that applies to it."""
    if (doc.get("apiVersion"), doc.get("kind")) in keda_schemas():
        return keda_errors(doc)
    return [f"Kubernetes {v}: {e}" for v in KUBERNETES_VERSIONS for e in kubernetes_errors(doc, v)]


# ---- tests -------------------------------------------------------------------------------------
def test_every_manifest_validates_against_its_api_schema():
    checked: dict[str, int] = {}
    failures = []
    for where, doc in _documents():
        kind = doc["kind"]
        if kind in NO_SCHEMA:
            assert not has_kubernetes_schema(doc) and (doc["apiVersion"], kind) not in keda_schemas(), (
                f"{where}: {kind} has a schema now; validate it"
            )
            continue
        assert (doc["apiVersion"], kind) in keda_schemas() or has_kubernetes_schema(doc), (
            f"{where}: no schema for {doc['apiVersion']} {kind}: add one, or list it in NO_SCHEMA with the reason"
        )
        failures += [f"{where} ({kind} {doc['metadata']['name']}): {e}" for e in schema_errors(doc)]
        checked[kind] = checked.get(kind, 0) + 1
    assert not failures, "\n".join(failures)
    assert {"Deployment", "ScaledObject", "TriggerAuthentication", "NetworkPolicy", "ConfigMap"} <= set(checked)
    assert sum(checked.values()) >= 15


def _manifest(kind: str, name: str | None = None) -> dict:
    for _, doc in _documents():
        if doc["kind"] == kind and name in (None, doc["metadata"]["name"]):
            return copy.deepcopy(doc)
    raise AssertionError(f"no {kind} {name or ''} in deploy/k8s")


def _broken(doc: dict, change: Callable[[dict], object]) -> dict:
    change(doc)
    return doc


def test_the_validation_catches_what_kubectl_would_refuse():
    """The check itself: typical mistakes in the real manifests are reported, the originals are not."""
    deployment = _manifest("Deployment", "crd-worker")
    scaled = _manifest("ScaledObject")
    auth = _manifest("TriggerAuthentication")
    assert schema_errors(deployment) == [] and schema_errors(scaled) == [] and schema_errors(auth) == []

    def container(d: dict) -> dict:
        return d["spec"]["template"]["spec"]["containers"][0]

    broken = {
        "misspelled field": _broken(_manifest("Deployment", "crd-worker"), lambda d: d["spec"].update(replica=2)),
        "container without a name": _broken(_manifest("Deployment", "crd-worker"), lambda d: container(d).pop("name")),
        "port as text": _broken(
            _manifest("Deployment", "crd-worker"), lambda d: container(d)["ports"][0].update(containerPort="9102")
        ),
        "unknown metadata field": _broken(
            _manifest("ConfigMap", "crd-common"), lambda d: d["metadata"].update(label={})
        ),
        "KEDA: misspelled trigger field": _broken(
            _manifest("ScaledObject"), lambda d: d["spec"]["triggers"][0].update(authRef={"name": "x"})
        ),
        "KEDA: number as text": _broken(_manifest("ScaledObject"), lambda d: d["spec"].update(pollingInterval="15")),
        "KEDA: int32 overflow": _broken(_manifest("ScaledObject"), lambda d: d["spec"].update(cooldownPeriod=2**31)),
        "KEDA: CEL min > max": _broken(_manifest("ScaledObject"), lambda d: d["spec"].update(minReplicaCount=9)),
        "KEDA: metadata": _broken(_manifest("ScaledObject"), lambda d: d["metadata"].update(labels={"a": 1})),
        "KEDA: secret ref without key": _broken(
            _manifest("TriggerAuthentication"), lambda d: d["spec"]["secretTargetRef"][0].pop("key")
        ),
        "KEDA: no triggers": _broken(_manifest("ScaledObject"), lambda d: d["spec"].pop("triggers")),
    }
    for what, doc in broken.items():
        assert schema_errors(doc), f"not caught: {what}"


def test_every_cel_rule_of_the_keda_schemas_is_checked():
    def rules(schema: object) -> Iterator[str]:
        if isinstance(schema, dict):
            for v in schema.get("x-kubernetes-validations", []):
                yield v["rule"]
            for v in schema.values():
                yield from rules(v)
        elif isinstance(schema, list):
            for v in schema:
                yield from rules(v)

    found = {rule for schema in keda_schemas().values() for rule in rules(schema)}
    assert found, "KEDA's ScaledObject has a CEL rule: the schema copy looks wrong"
    assert found <= set(CEL_RULES), f"teach CEL_RULES these rules: {found - set(CEL_RULES)}"
    assert {kind for _, kind in keda_schemas()} == {
        "ScaledObject",
        "TriggerAuthentication",
        "ClusterTriggerAuthentication",
    }


@pytest.mark.skipif(not SHARED_KEDA.is_dir(), reason="no ../shared/schemas/keda beside this clone")
def test_the_keda_schemas_are_unchanged_copies_of_the_shared_ones():
    for original in sorted(SHARED_KEDA.glob("*.yaml")):
        copy_ = KEDA_SCHEMAS / original.name
        assert copy_.is_file() and copy_.read_bytes() == original.read_bytes(), f"refresh {copy_}"
