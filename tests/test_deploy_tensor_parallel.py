"""The multi-GPU Kubernetes variant (docker/k8s/tensor-parallel): the overlay's patch applied to
the base Deployment, then checked like the base (schema, flags, probes, drain) and for what
tensor parallelism needs (as many GPUs as ranks, a memory-backed /dev/shm, multicast off)."""

from __future__ import annotations

import copy

import pytest
import yaml

from server.config import ServerConfig
from tests.helpers.k8s import (
    K8S_DIR,
    cli_flags,
    flags_in,
    load_manifests,
    option,
    prestop_seconds,
    validate_resource,
)

OVERLAY = K8S_DIR / "tensor-parallel"
DRAIN_MARGIN_S = 10


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc, ops: list[dict]):
    """RFC 6902 `add`/`replace`/`remove` on a copy of `doc` (what kustomize applies); a path
    that does not exist (for `replace`/`remove`, or a missing parent) raises KeyError."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), op["value"])
            else:
                node[last] = op["value"]
        elif op["op"] in ("replace", "remove"):
            if isinstance(node, list):
                index = int(last)
                node[index]  # raises IndexError for a missing element
            elif last not in node:
                raise KeyError(f"{op['op']} {op['path']}: no such member")
            else:
                index = last
            if op["op"] == "replace":
                node[index] = op["value"]
            else:
                del node[index]
        else:
            raise ValueError(f"unsupported op {op['op']!r}")
    return doc


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def deployment(kustomization) -> dict:
    """The base Deployment with the overlay's patch applied."""
    (base,) = [doc for _, doc in load_manifests() if doc.get("kind") == "Deployment"]
    (patch,) = kustomization["patches"]
    target = patch["target"]
    assert (target["kind"], target["name"]) == ("Deployment", base["metadata"]["name"])
    assert base["apiVersion"] == f"{target['group']}/{target['version']}"
    return json_patch(base, yaml.safe_load((OVERLAY / patch["path"]).read_text()))


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_the_overlay_builds_on_the_whole_base(kustomization):
    assert kustomization["resources"] == ["../"]
    assert (OVERLAY / "../kustomization.yaml").resolve() == K8S_DIR / "kustomization.yaml"


def test_the_patched_deployment_matches_the_kubernetes_schema(deployment):
    pytest.importorskip("kubernetes", reason="the test extra installs the kubernetes client")
    validate_resource(deployment, "tensor-parallel Deployment")


def test_one_gpu_per_rank_and_only_known_flags(container):
    args = container["args"]
    ranks = int(option(args, "--tensor-parallel-size"))
    assert ranks >= 2
    resources = container["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == ranks
    assert int(resources["limits"]["nvidia.com/gpu"]) == ranks
    unknown = flags_in(args) - cli_flags()
    assert not unknown, f"the Deployment passes flags the CLI lacks: {sorted(unknown)}"


def test_nccl_gets_shared_memory_and_multicast_stays_off(deployment, container):
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    shm = volumes[mounts["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"
    # The memory-backed /dev/shm counts against the container's memory limit.
    limit_gi = int(container["resources"]["limits"]["memory"].removesuffix("Gi"))
    assert int(shm["emptyDir"]["sizeLimit"].removesuffix("Gi")) < limit_gi / 4


def test_probes_and_drain_are_the_base_ones(deployment, container):
    """A rank dying fails the server (liveness 503, exit 1): the base probes and grace cover the
    multi-GPU pod unchanged."""
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    drain = float(option(container["args"], "--drain-timeout") or ServerConfig().drain_timeout)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= prestop_seconds(container) + drain + DRAIN_MARGIN_S


def test_json_patch_refuses_paths_that_do_not_exist():
    doc = {"a": [1, {"b": 2}]}
    assert json_patch(doc, [{"op": "add", "path": "/a/-", "value": 3}]) == {"a": [1, {"b": 2}, 3]}
    assert json_patch(doc, [{"op": "replace", "path": "/a/1/b", "value": 5}])["a"][1] == {"b": 5}
    with pytest.raises(KeyError):
        json_patch(doc, [{"op": "replace", "path": "/a/1/c", "value": 5}])
    with pytest.raises(KeyError):
        json_patch(doc, [{"op": "add", "path": "/x/y", "value": 5}])
    assert doc == {"a": [1, {"b": 2}]}  # the input is left alone
