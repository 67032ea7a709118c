"""Kernels compiled ahead: seeding Triton's cache (stdlib, everywhere), compiling without a GPU
(needs triton with its CUDA backend), and a server-shaped warm-up that compiles nothing after
seeding (GPU)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from server import kernel_cache
from server.kernel_cache import MANIFEST, runtime_fingerprint, seed_from_config, seed_triton_cache


def _shipped(root: Path, runtime: dict | None = None) -> Path:
    """A shipped directory: two kernel entries (files + a group file with absolute paths, as
    Triton writes them) and a launcher entry, built "elsewhere" (paths under /build)."""
    root.mkdir(parents=True)
    for key, name in (("AAAA", "_rms_norm_kernel"), ("BBBB", "_prefill_kernel")):
        entry = root / key
        entry.mkdir()
        for ext in ("cubin", "json", "ptx"):
            (entry / f"{name}.{ext}").write_text(f"{key} {ext}")
        children = {f"{name}.{ext}": f"/build/cache/{key}/{name}.{ext}"
                    for ext in ("cubin", "json", "ptx")}  # fmt: skip
        (entry / f"__grp__{name}.json").write_text(json.dumps({"child_paths": children}))
    (root / "CCCC").mkdir()
    (root / "CCCC" / "__triton_launcher.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    manifest = {"runtime": runtime or runtime_fingerprint(), "kernels": []}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def test_seeding_copies_entries_and_points_their_groups_at_the_new_place(tmp_path):
    shipped, cache = _shipped(tmp_path / "shipped"), tmp_path / "cache"
    result = seed_triton_cache(shipped, cache)
    assert (result.copied, result.present, result.skipped) == (3, 0, None)
    group = json.loads((cache / "AAAA" / "__grp___rms_norm_kernel.json").read_text())
    for name, path in group["child_paths"].items():
        assert path == str(cache / "AAAA" / name) and Path(path).read_text().startswith("AAAA")
    assert (cache / "CCCC" / "__triton_launcher.cpython-312-x86_64-linux-gnu.so").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging left
    # The shipped directory is untouched (it is read-only in the image).
    shipped_group = json.loads((shipped / "AAAA" / "__grp___rms_norm_kernel.json").read_text())
    assert all(p.startswith("/build/") for p in shipped_group["child_paths"].values())


def test_seeding_keeps_what_the_cache_has_and_is_idempotent(tmp_path):
    shipped, cache = _shipped(tmp_path / "shipped"), tmp_path / "cache"
    (cache / "AAAA").mkdir(parents=True)
    (cache / "AAAA" / "mine").write_text("compiled here")
    first = seed_triton_cache(shipped, cache)
    assert (first.copied, first.present) == (2, 1)
    assert (cache / "AAAA" / "mine").read_text() == "compiled here"
    again = seed_triton_cache(shipped, cache)
    assert (again.copied, again.present, again.skipped) == (0, 3, None)


def test_seeding_skips_a_directory_built_for_another_runtime(tmp_path):
    other = dict(runtime_fingerprint(), python="2.7")
    shipped, cache = _shipped(tmp_path / "shipped", other), tmp_path / "cache"
    result = seed_triton_cache(shipped, cache)
    assert result.copied == 0 and "every key would miss" in result.skipped
    assert not cache.exists()
    missing = seed_triton_cache(tmp_path / "nowhere", cache)
    assert missing.copied == 0 and MANIFEST in missing.skipped


def test_startup_hook_reads_the_flag_or_the_environment_and_never_raises(
    tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="graphserve.kernels")
    shipped = _shipped(tmp_path / "shipped")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(kernel_cache.KERNEL_CACHE_ENV, raising=False)
    assert seed_from_config(None) is None
    monkeypatch.setenv(kernel_cache.KERNEL_CACHE_ENV, str(shipped))
    assert seed_from_config(None).copied == 3
    assert "3 kernel entries copied" in caplog.text

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(kernel_cache, "seed_triton_cache", broken)
    assert seed_from_config(str(shipped)) is None
    assert "not used: RuntimeError: disk on fire" in caplog.text


def test_seeding_runs_beside_the_torch_import(tmp_path, monkeypatch):
    shipped = _shipped(tmp_path / "shipped")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(kernel_cache.KERNEL_CACHE_ENV, raising=False)
    assert kernel_cache.start_seeding(None) is None
    thread = kernel_cache.start_seeding(str(shipped))
    thread.join(10)
    assert not thread.is_alive() and (tmp_path / "cache" / "AAAA").is_dir()


def test_the_engine_seeds_before_it_loads(tmp_path, monkeypatch):
    from server.config import EngineConfig
    from server.engine import AsyncEngine
    from tests.helpers.tiny_models import build_checkpoint

    shipped = _shipped(tmp_path / "shipped")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    model = build_checkpoint(tmp_path / "model", "llama", seed=1)
    engine = AsyncEngine(EngineConfig(model=str(model), device="cpu", max_num_seqs=2,
                                      max_model_len=64, state_dir="",
                                      kernel_cache=str(shipped)))  # fmt: skip
    engine.start()
    try:
        assert engine.ready.wait(120), engine.error
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["AAAA", "BBBB", "CCCC"]
    finally:
        engine.shutdown()


def test_default_cache_dir_is_tritons(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert kernel_cache.triton_cache_dir() == tmp_path / ".triton" / "cache"


# -- compiling without a GPU ------------------------------------------------------------------

TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=400,
            hidden_size=512, intermediate_size=1024, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
            hidden_act="silu", tie_word_embeddings=False)  # fmt: skip
KERNELS = {"_skinny_linear_kernel", "_rms_norm_kernel", "_silu_and_mul_kernel",
           "_rope_write_kv_kernel", "_decode_split_kernel", "_decode_reduce_kernel",
           "_prefill_kernel", "_prefill_merge_kernel"}  # fmt: skip


def _nvidia_triton():
    triton = pytest.importorskip("triton")
    try:
        import triton.backends.nvidia.driver  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no CUDA backend")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 runs kernels in the interpreter: nothing compiles")
    return triton


def test_precompile_builds_every_startup_kernel_and_a_rerun_compiles_nothing(tmp_path,
                                                                           monkeypatch):
    _nvidia_triton()
    from server import triton_ops
    from server.kernel_precompile import precompile

    # The tiny shape's projections are too small for the skinny GEMM; let them take it here.
    monkeypatch.setattr(triton_ops, "_SKINNY_MIN_PROGRAMS", 1)
    monkeypatch.setattr(triton_ops, "_SKINNY_MIN_WEIGHT_BYTES", 0)

    out = tmp_path / "kernels"
    manifest = precompile({"tiny": TINY}, out, launchers=False)
    assert {k["name"] for k in manifest["kernels"]} == KERNELS
    assert manifest["runtime"] == runtime_fingerprint() and manifest["target"] == "cuda:90"
    entries = {p.name for p in out.iterdir() if p.is_dir()}
    # One complete entry per kernel: a group file naming a cubin next to it.
    groups = list(out.glob("*/__grp__*.json"))
    assert len(groups) == len(manifest["kernels"])
    for group in groups:
        paths = json.loads(group.read_text())["child_paths"].values()
        assert any(p.endswith(".cubin") for p in paths) and all(Path(p).exists() for p in paths)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.cubin")}
    again = precompile({"tiny": TINY}, out, launchers=False)
    assert {p.name for p in out.iterdir() if p.is_dir()} == entries
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.cubin")} == before
    assert again["kernels"] == manifest["kernels"]


def _launch_pdl_variants(manifest: dict) -> dict[str, set[bool]]:
    """{kernel name: the `launch_pdl` values of its compiled variants} from a manifest."""
    found: dict[str, set[bool]] = {}
    for kernel in manifest["kernels"]:
        found.setdefault(kernel["name"], set()).add(kernel["launch_pdl"])
    return found


def test_precompile_compiles_the_launch_variants_a_hopper_server_uses(tmp_path, monkeypatch):
    """`launch_pdl` is part of a compiled kernel (server.pdl): for sm_90 the kernels of steps
    of up to 16 rows come with it and those of larger steps without, as a server launches them
    (the warm-ups run both sizes); prefill attention never has it; for sm_80 nothing has it."""
    _nvidia_triton()
    from server import pdl, triton_ops
    from server.kernel_precompile import precompile

    monkeypatch.setattr(triton_ops, "_SKINNY_MIN_PROGRAMS", 1)
    monkeypatch.setattr(triton_ops, "_SKINNY_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(pdl, "_cuda_driver_version", lambda: None)  # as on a box without a GPU
    monkeypatch.delenv("GRAPHSERVE_PDL", raising=False)
    sm90 = precompile({"tiny": TINY}, tmp_path / "sm90", launchers=False)
    both = {"_rms_norm_kernel", "_silu_and_mul_kernel", "_rope_write_kv_kernel",
            "_decode_split_kernel", "_decode_reduce_kernel"}
    assert _launch_pdl_variants(sm90) == {
        **{name: {False, True} for name in both}, "_skinny_linear_kernel": {True},
        "_prefill_kernel": {False}, "_prefill_merge_kernel": {False}}
    sm80 = precompile({"tiny": TINY}, tmp_path / "sm80", arch=80, launchers=False)
    assert set().union(*_launch_pdl_variants(sm80).values()) == {False}


def test_precompile_covers_tensor_parallel_ranks_whose_heads_split(tmp_path):
    """Rank-shaped kernels (a quarter of the heads and of the MLP per rank here: head counts
    no longer divisible by 16 and a smaller MLP block make other variants) land beside the
    one-GPU ones; a size that does not split the KV heads is left out, not an error."""
    _nvidia_triton()
    from server.kernel_precompile import precompile

    wide = dict(TINY, num_attention_heads=16, num_key_value_heads=4)
    one = precompile({"wide": wide}, tmp_path / "one", launchers=False)
    both = precompile({"wide": wide}, tmp_path / "both", launchers=False,
                      tensor_parallel_sizes=(1, 4, 3))  # fmt: skip
    # Under TP the fused all-reduce + norm (`--tp-allreduce auto` on GPUs with peer access).
    assert {k["name"] for k in both["kernels"]} == (
        KERNELS - {"_skinny_linear_kernel"} | {"_reduce_norm_kernel"}
    )
    assert {k["hash"] for k in one["kernels"]} < {k["hash"] for k in both["kernels"]}


@pytest.mark.gpu
def test_seeded_cache_serves_a_real_warm_up_without_compiling(tmp_path):
    """Compiled in a process that sees no GPU, seeded into an empty cache, then the same
    warm-ups launched for real on CUDA in a fresh process (`bench.kernel_warmup`'s case): no
    new cache entry (a compile or a launcher build would add one)."""
    import subprocess
    import sys

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _nvidia_triton()
    from bench.kernel_warmup import child_env, run_case

    env = child_env()
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    subprocess.run([sys.executable, "-m", "server", "precompile-kernels", "--model",
                    str(_config_dir(tmp_path)), "--out", str(shipped)], check=True,
                   env=dict(env, CUDA_VISIBLE_DEVICES=""), timeout=600)  # fmt: skip
    assert seed_triton_cache(shipped, cache).copied > 0
    before = sorted(p.name for p in cache.iterdir())
    run_case(TINY, cache, None, env)
    assert sorted(p.name for p in cache.iterdir()) == before


def _config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY))
    return d


@pytest.mark.gpu
def test_kernel_warmup_bench_compiles_nothing_once_seeded(tmp_path):
    """`bench.kernel_warmup` end to end on the GPU: its own verdicts must all pass."""
    import subprocess
    import sys

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _nvidia_triton()
    out = tmp_path / "warmup.json"
    subprocess.run([sys.executable, "-m", "bench.kernel_warmup", "--model",
                    str(_config_dir(tmp_path)), "--out", str(out)], check=True,
                   cwd=Path(__file__).resolve().parents[1], timeout=900)  # fmt: skip
    data = json.loads(out.read_text())
    assert data["cases"]["empty cache"]["compiled"] > 0
    assert [t["passed"] for t in data["targets"][:2]] == [True, True], data["targets"]
