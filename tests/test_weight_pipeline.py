"""The parallel weight pipeline and the page-cache prefetcher (CPU; the CUDA path under `gpu`).

The pipeline must hand out the exact bytes safetensors' own reader does, for single-file and
sharded checkpoints, with the dtype converted where asked, whatever the chunking, the window and
the order of the takes; and it must report broken files by name without leaving threads behind.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from bench.common import drop_from_page_cache
from server import prefetch
from server.errors import ModelLoadError
from server.hf_config import load_config
from server.model import DecoderModel
from server.model_loader import load_checkpoint
from server.safetensors_index import (
    is_model_tensor,
    load_order_key,
    load_plan,
    read_checkpoint,
    read_header,
)
from server.weight_pipeline import PipelinedWeights
from server.weights import SafetensorsWeights
from tests.helpers.tiny_models import build_checkpoint

REPO = Path(__file__).resolve().parent.parent

CASES = {
    "llama": ("llama", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True,
                                  "mlp_bias": True}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}


@pytest.fixture(scope="module", params=CASES)
def checkpoint(request, tmp_path_factory) -> Path:
    arch, overrides = CASES[request.param]
    return build_checkpoint(tmp_path_factory.mktemp(request.param), arch, seed=5, **overrides)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    base = build_checkpoint(tmp_path_factory.mktemp("base"), "llama", seed=6)
    out = tmp_path_factory.mktemp("sharded")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    hf.save_pretrained(out, max_shard_size="40KB")
    for f in base.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",):
            (out / f.name).write_bytes(f.read_bytes())
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def _all_tensors(weights, entries) -> dict[str, torch.Tensor]:
    return {name: weights.take(name, entries[name].shape) for name in sorted(entries)}


def _reference(path: Path, dtype) -> dict[str, torch.Tensor]:
    ref = SafetensorsWeights(path, "cpu", dtype)
    entries = read_checkpoint(path)
    return _all_tensors(ref, entries)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("graphserve-weights-")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk,window,threads", [(4096, 0, 1), (4096, 64 * 1024, 3),
                                                  (1 << 20, None, 2)])
def test_bit_identical_to_safetensors(checkpoint, dtype, chunk, window, threads):
    entries = read_checkpoint(checkpoint)
    ref = _reference(checkpoint, dtype)
    w = PipelinedWeights(checkpoint, "cpu", dtype, threads=threads, chunk_bytes=chunk,
                         window_bytes=window)
    try:
        got = _all_tensors(w, entries)
        assert w.names() == []
    finally:
        w.close()
    assert got.keys() == ref.keys()
    for name in got:
        assert _same_bits(got[name], ref[name]), name
    assert w.stats.bytes_read == sum(e.nbytes for e in entries.values())
    assert not _reader_threads()


def test_sharded_checkpoint_and_decoder_model(sharded):
    config = load_config(sharded)
    ref = DecoderModel(config, SafetensorsWeights(sharded, "cpu", torch.float32))
    w = PipelinedWeights(sharded, "cpu", torch.float32, threads=4, chunk_bytes=8192,
                         window_bytes=32 * 1024)
    try:
        model = DecoderModel(config, w)
    finally:
        w.close()
    assert model.weight_bytes == ref.weight_bytes
    for mine, theirs in zip(model._tensors(), ref._tensors(), strict=True):
        assert _same_bits(mine, theirs)


def test_the_plan_is_the_order_decoder_model_takes(checkpoint):
    """Reading ahead in any other order would make the model wait and hold extra memory."""
    config = load_config(checkpoint)
    taken = []

    class Recording(SafetensorsWeights):
        def take(self, name, shape):
            taken.append(name)
            return super().take(name, shape)

    DecoderModel(config, Recording(checkpoint, "cpu", torch.float32))
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    plan = [e.name for e in load_plan(read_checkpoint(checkpoint), frozenset(tied))]
    assert plan == taken
    assert all(is_model_tensor(n) for n in taken)


def test_window_bounds_what_is_read_ahead(checkpoint):
    entries = read_checkpoint(checkpoint)
    plan = load_plan(entries)
    window = 20_000
    largest = max(e.nbytes for e in plan)
    w = PipelinedWeights(checkpoint, "cpu", torch.float32, threads=2, chunk_bytes=4096,
                         window_bytes=window)
    try:
        for entry in plan:
            w.take(entry.name, entry.shape)
            # Scheduled beyond the latest take: at most the window plus the one that crossed it.
            assert w._ahead_bytes() < window + largest
    finally:
        w.close()


def test_out_of_order_and_unplanned_takes(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama", seed=2)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["model.vision_tower.weight"] = torch.arange(6, dtype=torch.float32).view(2, 3)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    entries = read_checkpoint(path)
    w = PipelinedWeights(path, "cpu", torch.float32, threads=2, chunk_bytes=4096,
                         window_bytes=4096)
    try:
        last = max((n for n in entries if is_model_tensor(n)), key=load_order_key)
        assert torch.equal(w.take(last, entries[last].shape), tensors[last])
        extra = w.take("model.vision_tower.weight", (2, 3))
        assert torch.equal(extra, tensors["model.vision_tower.weight"])
        assert not w.has("model.vision_tower.weight") and w.has("model.norm.weight")
        assert "model.vision_tower.weight" not in w.names() and last not in w.names()
        with pytest.raises(ModelLoadError, match=r"'model.norm.weight' has shape \[64\], "
                                                 r"expected \[65\] from config.json"):
            w.take("model.norm.weight", (65,))
        with pytest.raises(ModelLoadError, match="missing from model.safetensors"):
            w.take(last, entries[last].shape)  # taken already
    finally:
        w.close()


def test_integer_tensor_is_refused_like_the_old_loader(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama", seed=2)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int64)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    w = PipelinedWeights(path, "cpu", torch.float32, threads=2)
    try:
        with pytest.raises(ModelLoadError, match="has dtype torch.int64, not float"):
            w.take("model.norm.weight", (64,))
    finally:
        w.close()


def test_file_shrinking_after_open_names_the_tensor(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama", seed=2)
    entries = read_checkpoint(path)
    last = max(entries.values(), key=lambda e: e.end)
    w = PipelinedWeights(path, "cpu", torch.float32, threads=2, window_bytes=0)
    try:
        os.truncate(path / "model.safetensors", last.start + 8)
        with pytest.raises(ModelLoadError, match=rf"cannot read tensor '{last.name}'.*file ended"):
            w.take(last.name, last.shape)
    finally:
        w.close()
    assert not _reader_threads()


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
     "do not hold shape"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8,
     "bad data_offsets"),
    ([1, 2], b"", "not a JSON object"),
])
def test_header_validation(tmp_path, header, data, match):
    with pytest.raises(ModelLoadError, match=match):
        read_header(_write_raw(tmp_path / "x.safetensors", header, data))
    (tmp_path / "y.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(ModelLoadError, match="does not fit the file"):
        read_header(tmp_path / "y.safetensors")


def test_loader_uses_the_pipeline_and_closes_it_on_errors(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama", seed=2)
    ckpt = load_checkpoint(str(path), "cpu", "float32", loader="fast")
    assert ckpt.weights == "pipeline" and ckpt.load_stats["bytes_read"] > 0
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="up_proj.weight' is missing"):
        load_checkpoint(str(path), "cpu", "float32", loader="fast")
    assert not _reader_threads()


def test_tokenizer_fallback_still_reads_weights_through_the_pipeline(tmp_path):
    path = build_checkpoint(tmp_path / "q", "qwen2", seed=4)  # its tokenizer needs transformers
    auto = load_checkpoint(str(path), "cpu", "float32")
    ref = load_checkpoint(str(path), "cpu", "float32", loader="transformers")
    assert auto.loader == "transformers" and "Qwen2Tokenizer" in auto.fallback_reason
    assert auto.weights == "pipeline" and ref.weights == "transformers"
    for mine, theirs in zip(auto.model._tensors(), ref.model._tensors(), strict=True):
        assert _same_bits(mine, theirs)
    assert auto.eos_token_ids == ref.eos_token_ids
    assert auto.api_tokenizer.encode("hello world") == ref.api_tokenizer.encode("hello world")


# -- the prefetcher -------------------------------------------------------------------------------


def test_warmer_reads_what_is_not_cached_and_skips_what_is(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama", seed=2, hidden_size=256,
                            intermediate_size=512)
    file = path / "model.safetensors"
    plan = load_plan(read_checkpoint(path))
    if prefetch._residency(file) is None:
        pytest.skip("mincore unavailable")
    drop_from_page_cache(file)
    evicted = prefetch._residency(file)
    if all(evicted):
        pytest.skip("this filesystem does not drop cached pages on request")
    warmer = prefetch.PageCacheWarmer(path, threads=2)
    assert warmer.wait(30)
    assert warmer.stats.error is None and warmer.stats.read_bytes > 0
    assert warmer.stats.planned_bytes == sum(e.nbytes for e in plan)
    assert prefetch.not_resident(plan) == []
    again = prefetch.PageCacheWarmer(path, threads=2)  # everything cached: nothing to read
    assert again.wait(30)
    assert again.stats.read_bytes == 0
    assert again.stats.resident_bytes == again.stats.planned_bytes


def test_warmer_skips_what_the_pipeline_took_over(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama", seed=2, hidden_size=256,
                            intermediate_size=512)
    plan = load_plan(read_checkpoint(path))
    drop_from_page_cache(path / "model.safetensors")
    if not prefetch.not_resident(plan):
        pytest.skip("this filesystem does not drop cached pages on request")
    warmer = prefetch.PageCacheWarmer(path, threads=1, start=False)
    taken = [e for e in plan if e.name.startswith(("model.embed", "model.layers.0."))]
    warmer.skip(e.name for e in taken)
    warmer.run()
    assert warmer.wait(30) and warmer.stats.error is None
    cold = warmer.stats.planned_bytes - warmer.stats.resident_bytes
    skipped = warmer.stats.skipped_bytes
    assert 0 < skipped <= sum(e.nbytes for e in taken)
    assert warmer.stats.read_bytes == cold - skipped


def test_handover_is_per_thread_and_per_directory(tmp_path):
    a = build_checkpoint(tmp_path / "a", "llama", seed=2)
    warmer = prefetch.start(str(a))
    assert warmer is not None
    seen = []
    other = threading.Thread(target=lambda: seen.append(prefetch.claim(a)))
    other.start()
    other.join()
    assert seen == [None]  # another engine thread never gets this one
    assert prefetch.claim(tmp_path / "b") is None  # another model: stopped and dropped
    assert prefetch.claim(a) is None  # handed over at most once
    warmer = prefetch.start(str(a))
    assert prefetch.claim(a) is warmer
    assert prefetch.start(None) is None and prefetch.start(str(tmp_path / "nope")) is None
    warmer.wait(30)


def test_warmer_records_a_broken_checkpoint_and_never_raises(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01")
    warmer = prefetch.PageCacheWarmer(tmp_path)
    assert warmer.wait(30)
    assert "cannot read safetensors file" in warmer.stats.error


_TORCH_FREE = """
import sys
import server.prefetch, server.safetensors_index, server.state_dir, server.graph_warmup
heavy = [m for m in ("torch", "transformers", "numpy") if m in sys.modules]
print(",".join(heavy))
"""


def test_startup_modules_import_no_torch():
    out = subprocess.run([sys.executable, "-c", _TORCH_FREE], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


# -- slices (tensor-parallel shards) --------------------------------------------------------------


def _some_slice(name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """A slice of every matrix and vector: rows for some, columns (strided) for the others."""
    if len(shape) == 2 and ("o_proj" in name or "down_proj" in name or "embed" in name):
        return 1, 3, shape[1] - 5
    return (0, 1, shape[0] - 2) if shape[0] > 3 else None


def _slices(path: Path, device: str, dtype, **kwargs) -> tuple[dict, dict, PipelinedWeights]:
    entries = read_checkpoint(path)
    ref = SafetensorsWeights(path, "cpu", dtype)
    parts = {n: _some_slice(n, e.shape) for n, e in entries.items()}
    want = {n: ref.take_part(n, e.shape, *parts[n]) if parts[n] else ref.take(n, e.shape)
            for n, e in entries.items()}  # fmt: skip
    w = PipelinedWeights(path, device, dtype, parts=lambda n, shape: parts[n], **kwargs)
    try:
        got = {n: w.take_part(n, e.shape, *parts[n]) if parts[n] else w.take(n, e.shape)
               for n, e in sorted(entries.items(), key=lambda kv: load_order_key(kv[0]))}
    finally:
        w.close()
    return got, want, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk,threads", [(4096, 1), (4096, 3), (1 << 20, 2)])
def test_planned_slices_read_only_their_bytes(checkpoint, dtype, chunk, threads):
    """Row slices are one range, column slices one run per row (many runs per piece): the
    bytes of the slice, no more, whatever the chunking and the number of readers."""
    got, want, w = _slices(checkpoint, "cpu", dtype, threads=threads, chunk_bytes=chunk,
                           window_bytes=16 * 1024)
    for name in want:
        assert got[name].is_contiguous() and _same_bits(got[name], want[name]), name
    assert w.stats.part_misses == 0
    assert w.stats.bytes_read == sum(t.numel() * 4 for t in want.values() if t.numel())
    assert not _reader_threads()


def test_runs_longer_than_a_chunk_are_cut_into_pieces():
    from server.safetensors_index import TensorEntry
    from server.weight_pipeline import _pieces, _runs

    entry = TensorEntry("w", Path("f"), "F32", (3, 10), 100, 100 + 120)
    runs = _runs(entry, (1, 2, 9))  # 7 floats of each of 3 rows: 28-byte runs, 40 apart
    assert runs == [(108, 28, 3, 40)]
    assert list(_pieces(runs, 64)) == [(108, 28, 0, 2, 40), (188, 28, 56, 1, 40)]
    assert list(_pieces(runs, 16)) == [
        (108, 16, 0, 1, 0), (124, 12, 16, 1, 0), (148, 16, 28, 1, 0), (164, 12, 44, 1, 0),
        (188, 16, 56, 1, 0), (204, 12, 72, 1, 0),
    ]  # fmt: skip
    assert _runs(entry, (0, 1, 3)) == [(140, 80, 1, 0)]  # whole rows: one range
    assert _runs(entry, (1, 4, 4)) == []


def test_a_take_unlike_the_planned_slice_is_still_right(tmp_path):
    path = build_checkpoint(tmp_path / "m", "llama", seed=3)
    entries = read_checkpoint(path)
    ref = SafetensorsWeights(path, "cpu", torch.float32)
    q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"
    want_q, want_down = ref.take(q, entries[q].shape), ref.take(down, entries[down].shape)
    # q planned as a row slice but taken whole; down planned whole but taken as a column
    # slice; up planned as one slice and taken as another.
    up = "model.layers.0.mlp.up_proj.weight"
    want_up = ref.take_part(up, entries[up].shape, 0, 10, 20)
    parts = {q: (0, 0, 8), up: (0, 0, 10)}
    w = PipelinedWeights(path, "cpu", torch.float32, parts=lambda n, s: parts.get(n),
                         chunk_bytes=4096)
    try:
        assert torch.equal(w.take(q, entries[q].shape), want_q)
        got = w.take_part(down, entries[down].shape, 1, 4, 9)
        assert got.is_contiguous() and torch.equal(got, want_down[:, 4:9])
        assert torch.equal(w.take_part(up, entries[up].shape, 0, 10, 20), want_up)
        with pytest.raises(ValueError, match="outside shape"):
            w.take_part("model.norm.weight", entries["model.norm.weight"].shape, 0, 2, 99)
    finally:
        w.close()
    assert w.stats.part_misses == 3


# -- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_pipeline_is_bit_identical(checkpoint, dtype):
    entries = read_checkpoint(checkpoint)
    ref = SafetensorsWeights(checkpoint, "cuda", dtype)
    want = _all_tensors(ref, entries)
    w = PipelinedWeights(checkpoint, "cuda", dtype, threads=3, chunk_bytes=4096,
                         window_bytes=16 * 1024)
    try:
        got = _all_tensors(w, entries)
    finally:
        w.close()
    torch.cuda.synchronize()
    for name in got:
        assert got[name].is_cuda and _same_bits(got[name], want[name]), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_planned_slices_are_bit_identical(checkpoint, dtype):
    """Strided column slices through pinned staging and the readers' streams."""
    got, want, w = _slices(checkpoint, "cuda", dtype, threads=3, chunk_bytes=4096,
                           window_bytes=16 * 1024)
    torch.cuda.synchronize()
    assert w.stats.part_misses == 0
    for name in want:
        assert got[name].is_cuda and _same_bits(got[name].cpu(), want[name]), name


@pytest.mark.parametrize("prefetch_threads", [3, 0])
def test_engine_thread_hands_its_prefetch_to_the_loader(tmp_path, prefetch_threads):
    from server.config import EngineConfig
    from server.engine import AsyncEngine

    path = build_checkpoint(tmp_path / "m", "llama", seed=2)
    engine = AsyncEngine(EngineConfig(model=str(path), device="cpu", max_num_seqs=2,
                                      max_model_len=64, state_dir="",
                                      prefetch_threads=prefetch_threads))
    engine.start()
    try:
        assert engine.ready.wait(120), (engine.phase, engine.error)
        stats = engine._core.runner.checkpoint.load_stats
        assert stats["bytes_read"] == sum(e.nbytes for e in read_checkpoint(path).values())
        if prefetch_threads == 0:
            assert "prefetch" not in stats
            return
        pre = stats["prefetch"]
        assert pre["error"] is None and pre["planned_bytes"] > 0
        assert pre["files"] == ["model.safetensors"]
    finally:
        engine.shutdown()
