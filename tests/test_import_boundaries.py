"""Which modules stay off the model stack (docs/architecture.md, column "imports torch?").

Everything above the model runner — CLI, launch, the HTTP layer, the engine front, the
scheduler, the capture policy — must import without torch: the port is bound and `/health`
answers before the heavy imports start, and the engine imports its runner on its own thread.
Each module is imported in a fresh interpreter and what its import added is checked; the
table in docs/architecture.md must list the same modules ("yes (lazily)": torch inside
functions only, so importing the module is torch-free too).
"""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO
from tests.helpers.imports import fresh_imports

TORCH_FREE = (
    "server.config",
    "server.request",
    "server.errors",
    "server.seeds",
    "server.engine_protocol",
    "server.scheduler",
    "server.block_manager",
    "server.engine",
    "server.engine_ipc",
    "server.engine_process",
    "server.engine_host",
    "server.child_process",
    "server.graph_warmup",
    "server.graph_memory",
    "server.capture_records",
    "server.mixed_graph_policy",
    "server.gc_control",
    "server.step_timing",
    "server.detokenizer",
    "server.hf_config",
    "server.tokenizer",
    "server.model_loader",
    "server.safetensors_index",
    "server.prefetch",
    "server.state_dir",
    "server.kernel_cache",
    "server.warm_start",
    "server.torch_import",
    "server.early_weights",
    "server.stall_watch",
    "server.default_model",
    "server.step_plan",
    "server.distributed.protocol",
    "server.distributed.launcher",
    "server.distributed.worker",
    "server.distributed.sharding",
    "server.distributed.report",
    "server.health",
    "server.metrics",
    "server.http.errors",
    "server.http.schemas",
    "server.http.prompts",
    "server.http.sampling_params",
    "server.http.generation",
    "server.http.state",
    "server.http.streaming",
    "server.http.middleware",
    "server.http.error_handlers",
    "server.http.openapi",
    "server.http.responses",
    "server.http.body_guard",
    "server.http.limits",
    "server.http.token_bounds",
    "server.http.workers",
    "server.http.loop_lag",
    "server.connection_guard",
    "server.http.surface",
    "server.http.relay",
    "server.http.logprobs",
    "server.structured.__init__",
    "server.structured.grammar",
    "server.structured.grammar_worker",
    "server.structured.tool_calls",
    "server.api",
    "server.early_health",
    "server.uvicorn_server",
    "server.logging_setup",
    "server.launch",
    "server.cli",
    "server.__main__",
)
# The project's modules that import torch at module level (server.pdl: Triton, the same stack).
TORCH_MODULES = (
    "server.model_runner",
    "server.kv_cache",
    "server.graph_runner",
    "server.mixed_graph_runner",
    "server.model",
    "server.ops",
    "server.triton_ops",
    "server.triton_attention",
    "server.pdl",
    "server.sampling",
    "server.logits_processors",
    "server.weights",
    "server.weight_pipeline",
    "server.step_executor",
    "server.distributed.comm",
    "server.distributed.symm_allreduce",
    "server.kernel_precompile",
    "server.background_capture",
)


def _model_stack(names) -> list[str]:
    return sorted(
        n
        for n in names
        if n.split(".")[0] in ("torch", "triton", "transformers") or n in TORCH_MODULES
    )


@pytest.fixture(scope="module")
def added():
    """Each module's own additions to sys.modules, all in one fresh interpreter, then the
    model runner's (the control)."""
    return fresh_imports(*TORCH_FREE, "server.model_runner")


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_no_torch(added, module):
    # In import order, so a module that pulls torch in is the one blamed for it.
    assert _model_stack(added[module]) == []


@pytest.mark.parametrize("module", ["server.scheduler", "server.engine", "server.api"])
def test_engine_front_scheduler_and_api_import_no_torch_alone(module):
    """The same, each in an interpreter of its own (nothing imported before it)."""
    (names,) = fresh_imports(module).values()
    assert module in names
    assert _model_stack(names) == []


def test_the_control_imports_torch(added):
    assert {"torch", "server.model_runner", "server.model", "server.ops"} <= set(
        _model_stack(added["server.model_runner"])
    )


def _documented() -> dict[str, str]:
    """{module: its "imports torch?" cell} from the tables in docs/architecture.md."""
    out = {}
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`server/"):
            continue
        folder = ""
        for path in re.findall(r"`([^`]+\.py)`", cells[0]):
            if "/" in path:
                folder = path.rsplit("/", 1)[0]
            else:  # `server/http/a.py`, `b.py`: b.py lives beside a.py
                path = f"{folder}/{path}"
            out[path.removesuffix(".py").replace("/", ".")] = cells[2]
    return out


def test_the_architecture_table_says_what_is_tested():
    documented = _documented()
    assert len(documented) > 30
    torch_free = {m for m, cell in documented.items() if cell.startswith("no")}
    lazy = {m for m, cell in documented.items() if cell == "yes (lazily)"}
    eager = {m for m, cell in documented.items() if cell == "yes"}
    assert torch_free | lazy | eager == set(documented)
    assert torch_free | lazy == set(TORCH_FREE)
    assert eager == set(TORCH_MODULES)
