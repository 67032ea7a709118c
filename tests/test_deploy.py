"""Static checks of docker/Dockerfile, .dockerignore and docker/k8s/*.yaml.

Nothing here builds an image or talks to a cluster (neither exists in CI). Instead the files are
checked against what they must agree with: the repository (COPY sources), the server (routes,
CLI flags, metric names, drain timeout) and the Kubernetes API schema (the `kubernetes` client's
models, walked key by key so that a misspelt field fails instead of being silently dropped).

The server's routes, flags and metrics are read from `server.api`, `server.cli` and
`server.metrics` when those modules exist; until then the documented values are used.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
import yaml

from server.config import ServerConfig
from tests.helpers import REPO
from tests.helpers.k8s import (
    CUSTOM_KINDS,
    K8S_DIR,
    cli_flags,
    container_port,
    flags_in,
    load_manifests,
    option,
    prestop_seconds,
    validate_resource,
)

DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

LIVENESS_PATH = "/health"
READINESS_PATH = "/health/ready"
# What the architecture documents, used only while server/api.py or server/metrics.py is absent.
DOCUMENTED_ROUTES = frozenset(
    {
        "/health",
        "/health/ready",
        "/health/graphs",
        "/metrics",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
    }
)
DOCUMENTED_METRICS = frozenset(
    {
        "graphserve_requests_total",
        "graphserve_time_to_first_token_seconds",
        "graphserve_inter_token_latency_seconds",
        "graphserve_requests_running",
        "graphserve_requests_waiting",
        "graphserve_ready",
        "graphserve_graph_coverage_ratio",
        "graphserve_decode_steps_total",
        "graphserve_graph_pool_bytes",
    }
)
# Seconds the pod must keep beyond preStop + drain: after --drain-timeout the server aborts what
# is left and waits up to 5 s for those handlers, then stops the engine thread (normally quick).
DRAIN_MARGIN_S = 10
STARTUP_ALLOWANCE_S = 600


# --------------------------------------------------------------------------- Dockerfile parsing

DOCKER_INSTRUCTIONS = frozenset(
    {
        "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
        "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
        "WORKDIR",
    }
)  # fmt: skip


class DockerfileError(ValueError):
    """The Dockerfile is malformed; the message names the line."""


@dataclass
class Instruction:
    """One logical Dockerfile instruction, continuation lines joined."""

    keyword: str
    value: str
    line: int
    flags: dict[str, str] = field(default_factory=dict)
    args: str = ""  # value without the leading --flags

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form as a list, or None for the shell form."""
        if not self.args.startswith("["):
            return None
        try:
            parsed = json.loads(self.args)
        except json.JSONDecodeError as exc:
            raise DockerfileError(f"line {self.line}: invalid JSON array: {exc}") from None
        if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
            raise DockerfileError(f"line {self.line}: exec form must be a list of strings")
        return parsed


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions the way BuildKit does.

    Handles parser directives (`# escape=`), comment lines (also inside continuations), line
    continuations and leading `--flag=value` options.
    """
    lines = text.splitlines()
    escape = "\\"
    for raw in lines:  # directives only at the very top, before any other line
        m = re.fullmatch(r"#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*", raw)
        if not m:
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
    instructions: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments and blank lines vanish, even between continuation lines
        if not buf:
            start = number
        if stripped.endswith(escape):
            buf.append(stripped[: -len(escape)].rstrip())
            continue
        buf.append(stripped)
        instructions.append(_instruction(" ".join(buf), start))
        buf = []
    if buf:
        raise DockerfileError(f"line {start}: continuation runs past the end of the file")
    return instructions


def _instruction(logical: str, line: int) -> Instruction:
    keyword, _, value = logical.partition(" ")
    keyword = keyword.upper()
    if keyword not in DOCKER_INSTRUCTIONS:
        raise DockerfileError(f"line {line}: unknown instruction {keyword!r}")
    value = value.strip()
    flags: dict[str, str] = {}
    rest = value
    if keyword in {"ADD", "COPY", "FROM", "HEALTHCHECK", "RUN"}:
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            name, _, flag_value = token[2:].partition("=")
            flags[name] = flag_value
            rest = rest.strip()
    return Instruction(keyword, value, line, flags, rest)


def _env_pairs(inst: Instruction) -> dict[str, str]:
    tokens = shlex.split(inst.args)
    if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
        return {tokens[0]: " ".join(tokens[1:])}
    pairs = {}
    for token in tokens:
        key, sep, val = token.partition("=")
        if not sep:
            raise DockerfileError(f"line {inst.line}: ENV token {token!r} is not KEY=value")
        pairs[key] = val
    return pairs


@dataclass
class FinalStage:
    """The instructions of the last build stage, i.e. the image that runs."""

    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        if not found:
            raise AssertionError(f"the final stage has no {keyword}")
        return found[-1]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for inst in self.all("ENV"):
            env.update(_env_pairs(inst))
        return env

    def argv(self) -> list[str]:
        """ENTRYPOINT + CMD, both required in exec form (a shell would swallow SIGTERM)."""
        entry = self.last("ENTRYPOINT").exec_form()
        cmd = self.last("CMD").exec_form()
        if entry is None or cmd is None:
            raise AssertionError("ENTRYPOINT and CMD must use the exec (JSON) form")
        return entry + cmd


def final_stage(instructions: list[Instruction]) -> FinalStage:
    froms = [n for n, i in enumerate(instructions) if i.keyword == "FROM"]
    if not froms:
        raise DockerfileError("no FROM instruction")
    before = {i.keyword for i in instructions[: froms[0]]}
    if before - {"ARG"}:
        raise DockerfileError(f"only ARG may precede the first FROM, found {sorted(before)}")
    return FinalStage(instructions[froms[-1] :])


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def image(dockerfile) -> FinalStage:
    return final_stage(dockerfile)


# --------------------------------------------------------------------------- .dockerignore


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's path patterns: `*` and `?` stay within one path element, `**` spans any."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        rules.append((negate, _glob_regex(pattern)))
    return rules


def in_build_context(rel_path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether `rel_path` is sent to the builder: the last rule matching it or a parent wins."""
    parts = rel_path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            included = negate
    return included


def test_dockerignore_matcher_follows_docker_semantics():
    rules = dockerignore_rules("*\n!server/\n**/__pycache__\n")
    assert in_build_context("server/api.py", rules)
    assert in_build_context("server/data/corpus_prose.txt", rules)
    assert not in_build_context("server/__pycache__/api.cpython-311.pyc", rules)
    assert not in_build_context("tests/test_deploy.py", rules)
    assert not in_build_context(".git/HEAD", rules)


# --------------------------------------------------------------------------- what the server says


def server_routes() -> set[str]:
    """Paths the FastAPI app serves, from server.api once it exists."""
    try:
        import server.api as api
    except ModuleNotFoundError as exc:
        if exc.name != "server.api":
            raise
        return set(DOCUMENTED_ROUTES)
    from fastapi import APIRouter, FastAPI

    paths: set[str] = set()
    for obj in vars(api).values():
        if isinstance(obj, (FastAPI, APIRouter)):
            paths.update(r.path for r in obj.routes if hasattr(r, "path"))
    if not paths and callable(getattr(api, "create_app", None)):
        paths.update(r.path for r in api.create_app(ServerConfig()).routes if hasattr(r, "path"))
    if not paths:
        raise AssertionError("server.api exposes neither a FastAPI app/router nor create_app()")
    return paths


class _EngineStub:
    """Just the engine contract's scrape-time surface: `stats()` and `graph_report()`."""

    def stats(self) -> dict:
        return {"running": 0, "waiting": 0}

    def graph_report(self) -> dict:
        return {}


def exported_metrics() -> dict[str, str]:
    """Exposed metric name -> Prometheus type, from a real scrape of server.metrics.

    A counter appears under its `_total` sample name; histogram families also under their
    family name. Until server/metrics.py exists, the documented names (untyped) are used.
    """
    try:
        from server.health import Lifecycle
        from server.metrics import ServerMetrics
    except ModuleNotFoundError as exc:
        if exc.name not in {"server.metrics", "server.health"}:
            raise
        return dict.fromkeys(DOCUMENTED_METRICS, "unknown")
    from prometheus_client.parser import text_string_to_metric_families

    text = ServerMetrics(Lifecycle(), lambda: _EngineStub()).render().decode()
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        exposed = f"{family.name}_total" if family.type == "counter" else family.name
        names[exposed] = family.type
        for sample in family.samples:
            names.setdefault(sample.name, family.type)
    return names


@pytest.fixture(scope="module")
def routes() -> set[str]:
    return server_routes()


@pytest.fixture(scope="module")
def known_flags() -> set[str]:
    return cli_flags()


# --------------------------------------------------------------------------- Dockerfile tests


def test_dockerfile_parser_handles_continuations_comments_and_flags():
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=ubuntu\n"
        "FROM ${BASE} AS run\n"
        "RUN apt-get update \\\n"
        "    # a comment inside the continuation\n"
        "    && true\n"
        "COPY --chown=1:1 a b /dst/\n"
        'CMD ["x", "y"]\n'
    )
    parsed = parse_dockerfile(text)
    assert [i.keyword for i in parsed] == ["ARG", "FROM", "RUN", "COPY", "CMD"]
    assert parsed[2].value == "apt-get update && true"
    assert parsed[3].flags == {"chown": "1:1"} and parsed[3].args == "a b /dst/"
    assert parsed[4].exec_form() == ["x", "y"]
    with pytest.raises(DockerfileError, match="unknown instruction"):
        parse_dockerfile("FROM x\nRUNN true\n")
    with pytest.raises(DockerfileError, match="past the end"):
        parse_dockerfile("FROM x\nRUN true \\\n")
    with pytest.raises(DockerfileError, match="only ARG"):
        final_stage(parse_dockerfile("RUN true\nFROM x\n"))


def test_dockerfile_parses_into_one_runnable_stage(image):
    for keyword in ("ENTRYPOINT", "CMD", "HEALTHCHECK", "USER", "EXPOSE"):
        assert len(image.all(keyword)) == 1, f"expected exactly one {keyword}"
    assert image.argv()[:2] == ["graphserve", "serve"]
    # The CUDA torch wheel must be installed explicitly; the project range alone would let pip
    # pick whatever build PyPI serves.
    runs = " ".join(i.args for i in image.all("RUN"))
    assert re.search(r"pip install \"?torch==", runs), "the image must pin its torch build"


def test_copy_sources_exist_and_reach_the_build_context(dockerfile):
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    copies = [i for i in dockerfile if i.keyword in {"COPY", "ADD"} and "from" not in i.flags]
    assert copies, "the Dockerfile copies nothing from the repository"
    for inst in copies:
        argv = inst.exec_form() or shlex.split(inst.args)
        for src in argv[:-1]:
            path = REPO / src
            assert path.exists(), f"line {inst.line}: COPY source {src!r} is not in the repo"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                if "__pycache__" in rel:
                    continue
                assert in_build_context(rel, rules), f"{rel} is excluded by .dockerignore"
    for private in (".git/HEAD", "tests/conftest.py", ".venv/bin/python"):
        assert not in_build_context(private, rules), f"{private} leaks into the build context"


def test_package_data_is_copied(image):
    """The embedded tokenizer corpus under server/data must end up in the image."""
    sources = set()
    for inst in image.all("COPY"):
        sources.update((inst.exec_form() or shlex.split(inst.args))[:-1])
    assert "pyproject.toml" in sources
    assert any(s.rstrip("/") == "server" for s in sources), "server/ (with data/) is not copied"


def test_healthcheck_probes_liveness_on_the_exposed_port(image, routes):
    hc = image.last("HEALTHCHECK")
    argv = hc.args.split(None, 1)
    assert argv[0] == "CMD", "HEALTHCHECK must run a command (not NONE)"
    command = " ".join(Instruction("CMD", argv[1], hc.line, args=argv[1]).exec_form() or [])
    url = re.search(r"https?://[^'\"\s]+", command or argv[1])
    assert url, "HEALTHCHECK does not request a URL"
    parts = urlsplit(url.group(0))
    assert parts.path == LIVENESS_PATH, "the container health is liveness, not readiness"
    assert parts.path in routes
    exposed = {int(p.split("/")[0]) for p in image.last("EXPOSE").args.split()}
    assert parts.port in exposed
    # The command must exist in the image: python is the venv interpreter, curl is not installed.
    assert command.split()[0] == "python"
    timeout = float(hc.flags.get("timeout", "30s").rstrip("s"))
    inner = re.search(r"timeout=(\d+(?:\.\d+)?)", command)
    assert inner and float(inner.group(1)) < timeout, "the request must time out before Docker"


def test_server_listens_on_all_interfaces_on_the_exposed_port(image, known_flags):
    argv = image.argv()
    assert option(argv, "--host") == "0.0.0.0"
    exposed = {int(p.split("/")[0]) for p in image.last("EXPOSE").args.split()}
    port = option(argv, "--port") or str(ServerConfig().port)
    assert int(port) in exposed
    unknown = flags_in(argv[2:]) - known_flags
    assert not unknown, f"ENTRYPOINT/CMD pass flags the CLI lacks: {sorted(unknown)}"


def test_image_runs_as_a_fixed_non_root_user(image):
    user = image.last("USER").args
    uid, _, gid = user.partition(":")
    assert uid not in {"root", "0"} and gid not in {"root", "0"}
    assert uid.isdigit(), "numeric UID lets Kubernetes verify runAsNonRoot"
    runs = " ".join(i.args for i in image.all("RUN"))
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b", runs), f"no user with UID {uid} is created"
    # USER must come after every RUN that needs root (apt-get, pip into /opt).
    user_line = image.last("USER").line
    assert all(i.line < user_line for i in image.all("RUN"))


def test_model_path_and_offline_mode(image):
    env = image.env()
    assert env.get("HF_HUB_OFFLINE") == "1", "the server must never reach for a model hub"
    model = option(image.argv(), "--model")
    assert model and model.startswith("/models/")


def test_image_ships_kernels_compiled_ahead_for_known_shapes(image):
    """The build precompiles the Triton kernels (no GPU there) into the directory the server
    is pointed at, for preset names that exist, after the package is installed and as root
    (the directory is then readable by the server's user), and outside the emptyDir cache."""
    from server.kernel_cache import KERNEL_CACHE_ENV
    from server.kernel_precompile import PRESETS

    env = image.env()
    shipped = env.get(KERNEL_CACHE_ENV)
    assert shipped and not shipped.startswith(env["XDG_CACHE_HOME"])
    (run,) = [i for i in image.all("RUN") if "graphserve precompile-kernels" in i.args]
    assert f"--out {shipped}" in run.args and "chmod -R a+rX" in run.args
    install = [i.line for i in image.all("RUN") if "pip install /src/graphserve" in i.args]
    assert install and install[0] < run.line < image.last("USER").line
    presets = {}
    for arg in image.all("ARG"):
        name, _, value = arg.args.partition("=")
        presets[name] = value.strip('"').split()
    assert presets["KERNEL_PRESETS"] and set(presets["KERNEL_PRESETS"]) <= set(PRESETS)
    assert all(n.isdigit() for n in presets["KERNEL_TP_SIZES"])


# --------------------------------------------------------------------------- Kubernetes schema

@pytest.fixture(scope="module")
def manifests() -> list[tuple[str, dict]]:
    return load_manifests()


def one(manifests, kind: str) -> dict:
    found = [doc for _, doc in manifests if doc.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment(manifests) -> dict:
    return one(manifests, "Deployment")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_every_manifest_matches_the_kubernetes_schema(manifests):
    pytest.importorskip("kubernetes", reason="the test extra installs the kubernetes client")
    kinds = set()
    for source, doc in manifests:
        key = (doc.get("apiVersion"), doc.get("kind"))
        kinds.add(key[1])
        if key not in CUSTOM_KINDS:
            validate_resource(doc, source)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds


def test_schema_check_rejects_typos_wrong_types_and_missing_fields(deployment):
    pytest.importorskip("kubernetes", reason="the test extra installs the kubernetes client")
    import copy

    def mutated(edit):
        doc = copy.deepcopy(deployment)
        edit(doc["spec"]["template"]["spec"]["containers"][0])
        return doc

    def rename(c):
        c["readinessprobe"] = c.pop("readinessProbe")

    def int_env(c):
        c["env"].append({"name": "X", "value": 1})

    def no_name(c):
        del c["name"]

    with pytest.raises(AssertionError, match="readinessprobe: unknown field of V1Container"):
        validate_resource(mutated(rename), "typo")
    with pytest.raises(AssertionError, match=r"env\[\d+\]\.value: expected str"):
        validate_resource(mutated(int_env), "int env")
    with pytest.raises(AssertionError, match="name"):
        validate_resource(mutated(no_name), "no name")


# --------------------------------------------------------------------------- Deployment semantics


def test_probes_never_kill_a_loading_pod(container, routes):
    args = container["args"]
    serve_port = int(option(args, "--port") or ServerConfig().port)
    startup, liveness, readiness = (
        container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")
    )
    for name, probe in (("startup", startup), ("liveness", liveness), ("readiness", readiness)):
        get = probe["httpGet"]
        assert get["path"] in routes, f"{name} probe path {get['path']} is not a server route"
        assert container_port(container, get["port"]) == serve_port, f"{name} probe port"
    # Liveness (and the startup probe that gates it) must use the endpoint that is 200 while
    # weights load; pointing either at readiness would restart pods that are merely loading.
    assert startup["httpGet"]["path"] == LIVENESS_PATH
    assert liveness["httpGet"]["path"] == LIVENESS_PATH
    assert readiness["httpGet"]["path"] == READINESS_PATH
    allowance = startup["failureThreshold"] * startup["periodSeconds"]
    assert allowance >= STARTUP_ALLOWANCE_S, f"startup allows only {allowance}s"
    # A liveness probe that gives up after one slow answer restarts a pod under load.
    assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 30
    for probe in (startup, liveness, readiness):
        assert probe.get("timeoutSeconds", 1) >= 2, "1 s probes flap while the GIL is busy"


def test_grace_period_covers_prestop_and_drain(deployment, container, known_flags):
    args = container["args"]
    drain = float(option(args, "--drain-timeout") or ServerConfig().drain_timeout)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    needed = prestop_seconds(container) + drain + DRAIN_MARGIN_S
    assert grace >= needed, f"grace {grace}s < preStop + drain {drain}s + margin = {needed}s"
    unknown = flags_in(args) - known_flags
    assert not unknown, f"the Deployment passes flags the CLI lacks: {sorted(unknown)}"


def test_container_matches_the_image(deployment, container, image):
    pod = deployment["spec"]["template"]["spec"]
    # runAsNonRoot can only be verified against the UID the image declares.
    uid = image.last("USER").args.split(":")[0]
    run_as = container.get("securityContext", {}).get("runAsUser") or pod.get(
        "securityContext", {}
    ).get("runAsUser")
    assert str(run_as) == uid
    assert pod["securityContext"].get("runAsNonRoot") is True
    # `args` replaces the image's CMD, so it must restate the port and model.
    args = container["args"]
    assert option(args, "--model") == option(image.argv(), "--model")
    assert "command" not in container, "overriding the entrypoint drops --host 0.0.0.0"
    # With a read-only root filesystem every cache directory the image points at must be a
    # writable mount, or Triton fails at its first kernel compile.
    if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
        for var in ("XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
            path = image.env().get(var)
            assert path, f"the image does not set {var}"
            assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), (
                f"{var}={path} is not on a writable volume"
            )


def test_gpu_model_volume_and_api_key_secret(deployment, container):
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    model = option(container["args"], "--model")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert model in mounts and mounts[model].get("readOnly") is True
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    volume = volumes[mounts[model]["name"]]
    assert "persistentVolumeClaim" in volume or "hostPath" in volume
    env = {e["name"]: e for e in container.get("env", [])}
    key = env.get("GRAPHSERVE_API_KEY")
    assert key and "secretKeyRef" in key.get("valueFrom", {}), "API key must come from a Secret"
    assert "value" not in key
    assert "--api-key" not in container["args"], "a key in args shows in `ps` and pod specs"


def test_service_and_pod_agree(manifests, deployment, container):
    service = one(manifests, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= labels.items(), "the Service selects no pod of the Deployment"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    serve_port = int(option(container["args"], "--port") or ServerConfig().port)
    for port in service["spec"]["ports"]:
        assert container_port(container, port.get("targetPort", port["port"])) == serve_port
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert int(annotations["prometheus.io/port"]) == serve_port
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def test_hpa_scales_the_deployment_on_an_exported_metric(manifests, deployment):
    hpa = one(manifests, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    exported = exported_metrics()
    assert hpa["spec"]["metrics"], "the HPA has no metric"
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods", "graphserve's load signals are per-pod metrics"
        name = metric["pods"]["metric"]["name"]
        assert name in exported, f"{name} is not exported by server/metrics.py"
        # Averaging a counter across pods measures nothing; queue depths are gauges.
        assert exported[name] in {"gauge", "unknown"}, f"{name} is a {exported[name]}"
        assert metric["pods"]["target"]["type"] == "AverageValue"


# --------------------------------------------------------------------------- custom resources

_KEDA_SPEC_KEYS = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}  # fmt: skip
_KEDA_TRIGGER_KEYS = {
    "type",
    "name",
    "metadata",
    "metricType",
    "authenticationRef",
    "useCachedMetrics",
}
_KEDA_PROMETHEUS_KEYS = {
    "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
    "ignoreNullValues", "queryParameters", "unsafeSsl", "timeout",
}  # fmt: skip


def test_keda_scaledobject_is_a_coherent_alternative(manifests, deployment):
    scaled = [doc for _, doc in manifests if doc.get("kind") == "ScaledObject"]
    if not scaled:
        pytest.skip("no KEDA ScaledObject shipped")
    (obj,) = scaled
    spec = obj["spec"]
    assert set(spec) <= _KEDA_SPEC_KEYS, (
        f"unknown ScaledObject fields {set(spec) - _KEDA_SPEC_KEYS}"
    )
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 0 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]
    exported = exported_metrics()
    uses_server_metric = False
    for trigger in spec["triggers"]:
        assert set(trigger) <= _KEDA_TRIGGER_KEYS, f"unknown trigger fields in {trigger}"
        if trigger["type"] != "prometheus":
            continue
        meta = trigger["metadata"]
        assert set(meta) <= _KEDA_PROMETHEUS_KEYS, (
            f"unknown fields {set(meta) - _KEDA_PROMETHEUS_KEYS}"
        )
        assert urlsplit(meta["serverAddress"]).scheme in {"http", "https"}
        float(meta["threshold"])  # KEDA wants a number in a string
        assert isinstance(meta["threshold"], str)
        for name in re.findall(r"\bgraphserve_[a-z0-9_]+", meta["query"]):
            assert name in exported, f"{name} is not exported by server/metrics.py"
            uses_server_metric = True
    assert uses_server_metric, "no trigger follows the server's own load metrics"
    # Scale from zero needs a trigger that sees demand while no pod exports metrics.
    if spec.get("minReplicaCount", 0) == 0:
        assert any(
            t["type"] != "prometheus" or "graphserve_" not in t["metadata"]["query"]
            for t in spec["triggers"]
        ), "at zero replicas no graphserve_* series exist to wake the deployment"


def test_kustomization_applies_the_hpa_variant_only(manifests):
    kustomization = one(manifests, "Kustomization")
    resources = kustomization["resources"]
    for name in resources:
        assert (K8S_DIR / name).is_file(), f"kustomization lists missing {name}"
    shipped = {
        path.name
        for path in K8S_DIR.glob("*.yaml")
        if path.name != "kustomization.yaml"
        and not any(
            d and d.get("kind") == "ScaledObject" for d in yaml.safe_load_all(path.read_text())
        )
    }
    assert set(resources) == shipped, "every plain manifest belongs in the kustomization"
    listed_kinds = {
        d["kind"]
        for name in resources
        for d in yaml.safe_load_all((K8S_DIR / name).read_text())
        if d
    }
    assert "ScaledObject" not in listed_kinds, "KEDA and hpa.yaml would both own the Deployment"
