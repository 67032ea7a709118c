"""Kubernetes manifests as the tests read them: the API schema walk, argv options, the CLI's
flags, and the facts a pod's timing depends on (shared by the deploy tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields

import yaml

from server.config import EngineConfig, ServerConfig
from tests.helpers import REPO

K8S_DIR = REPO / "docker" / "k8s"


def cli_flags() -> set[str]:
    """Long options `graphserve serve` accepts.

    Read from the real `--help` once server/cli.py exists; before that, derived from the config
    dataclasses the CLI is documented to fill (`--drain-timeout` <-> `drain_timeout`).
    """
    if not (REPO / "server" / "cli.py").exists():
        names = [f.name for f in fields(ServerConfig) if f.name != "engine"]
        names += [f.name for f in fields(EngineConfig)]
        return {"--" + n.replace("_", "-") for n in names}
    code = (
        "import sys; from server.cli import main; "
        "sys.argv = ['graphserve', 'serve', '--help']; sys.exit(main())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise AssertionError(f"graphserve serve --help failed:\n{proc.stdout}\n{proc.stderr}")
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", proc.stdout))


def option(argv: list[str], name: str) -> str | None:
    """The value of `name` in an argv (`--x v` or `--x=v`); the last occurrence wins."""
    value = None
    for n, arg in enumerate(argv):
        if arg == name and n + 1 < len(argv):
            value = argv[n + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def flags_in(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


SCHEMA_CLASSES = {
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("v1", "Secret"): "V1Secret",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
}
# Custom resources the kubernetes client has no model for: their checks are below.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}
_PRIMITIVES = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
    "object": (str, int, float, bool, dict, list),
}


def schema_errors(data, type_name: str, where: str = "") -> list[str]:
    """Every key absent from the model's schema and every value of the wrong type.

    The client's own deserialiser drops unknown keys (so `readinessprobe:` would vanish without
    a word); this walk reports them, following `openapi_types` down to the primitives.
    """
    import kubernetes.client as k8s

    type_name = type_name.strip()
    if m := re.fullmatch(r"(?i)list\[(.+)\]", type_name):
        if not isinstance(data, list):
            return [f"{where or '<root>'}: expected a list, got {type(data).__name__}"]
        errors = []
        for n, item in enumerate(data):
            errors += schema_errors(item, m.group(1), f"{where}[{n}]")
        return errors
    if m := re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", type_name):
        if not isinstance(data, dict):
            return [f"{where}: expected a mapping, got {type(data).__name__}"]
        errors = []
        for key, value in data.items():
            errors += schema_errors(value, m.group(1) or m.group(2), f"{where}.{key}")
        return errors
    if type_name in _PRIMITIVES:
        ok = isinstance(data, _PRIMITIVES[type_name])
        if type_name in {"int", "float"} and isinstance(data, bool):
            ok = False
        return [] if ok else [f"{where}: expected {type_name}, got {data!r}"]
    cls = getattr(k8s, type_name)
    if not isinstance(data, dict):
        return [f"{where}: expected a {type_name} mapping, got {type(data).__name__}"]
    by_json_key = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    errors = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in by_json_key:
            errors.append(f"{path}: unknown field of {type_name}")
        elif value is not None:
            errors += schema_errors(value, cls.openapi_types[by_json_key[key]], path)
    return errors


def validate_resource(doc: dict, source: str) -> object:
    """Schema-check one manifest and return it as the client's typed model."""
    import kubernetes.client as k8s

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in SCHEMA_CLASSES:
        raise AssertionError(f"{source}: no schema for {key}; add it to SCHEMA_CLASSES")
    errors = schema_errors(doc, SCHEMA_CLASSES[key])
    if errors:
        raise AssertionError(f"{source}:\n  " + "\n  ".join(errors))
    # Deserialising enforces the fields the API marks required (a container's name, a
    # Deployment's selector, ...).
    try:
        return k8s.ApiClient()._ApiClient__deserialize(doc, SCHEMA_CLASSES[key])
    except (ValueError, TypeError) as exc:
        raise AssertionError(f"{source}: {exc}") from None


def load_manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("*.yml")):
        for n, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.name}#{n}", doc))
    return docs


def container_port(container: dict, port) -> int:
    """Resolve a probe/Service port (number or name) to the container port number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    raise AssertionError(f"port {port!r} is not a named port of the container")


def prestop_seconds(container: dict) -> float:
    pre = container.get("lifecycle", {}).get("preStop")
    if pre is None:
        return 0.0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre["exec"]["command"]
    if command[0] == "sleep" and len(command) == 2:
        return float(command[1])
    raise AssertionError(f"cannot tell how long preStop {command} takes")
