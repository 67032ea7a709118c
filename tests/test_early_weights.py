"""server.early_weights on the CPU: a fake CUDA driver whose "device" memory is host memory, so
the layout, the readers, the piece bookkeeping and the weight views are checked byte for byte.
(tests/test_gpu.py loads a real checkpoint through it on a GPU.)"""

from __future__ import annotations

import ctypes
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from server import early_weights
from server.errors import ModelLoadError


class FakeDriver:
    """The driver calls the reader makes; device allocations are host buffers."""

    def __init__(self, fail: str | None = None, gate: threading.Event | None = None):
        self.fail = fail
        self.gate = gate  # copies wait for it (then fail, if `fail` names them)
        self.buffers: dict[int, ctypes.Array] = {}
        self.freed: list[int] = []
        self.copies = 0
        self._lock = threading.Lock()

    def _alloc(self, out, size) -> int:
        buf = (ctypes.c_char * size.value)()
        addr = ctypes.addressof(buf)
        with self._lock:
            self.buffers[addr] = buf
        out._obj.value = addr
        return 0

    def __getattr__(self, name):
        if name == self.fail:
            return lambda *a: 700
        return lambda *a: 0  # init, context, streams, events: nothing to do

    def cuMemAlloc_v2(self, out, size):
        return 700 if self.fail == "cuMemAlloc_v2" else self._alloc(out, size)

    def cuMemHostAlloc(self, out, size, flags):
        return self._alloc(out, size)

    def cuMemcpyHtoDAsync_v2(self, dst, src, n, stream):
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail == "cuMemcpyHtoDAsync_v2":
            return 700
        ctypes.memmove(dst.value, src.value, n.value)
        with self._lock:
            self.copies += 1
        return 0

    def cuMemFree_v2(self, ptr):
        self.freed.append(ptr.value)
        return 0

    def device_bytes(self, reader) -> bytes:
        return ctypes.string_at(reader.base, reader.nbytes)


def _checkpoint(tmp_path: Path, dtype=torch.bfloat16, tie=False, layers=2) -> dict:
    torch.manual_seed(0)
    h, inter, kv = 64, 96, 32
    t = {"model.embed_tokens.weight": torch.randn(50, h), "model.norm.weight": torch.randn(h)}
    if not tie:
        t["lm_head.weight"] = torch.randn(50, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {
            p + "self_attn.q_proj.weight": torch.randn(h, h),
            p + "self_attn.k_proj.weight": torch.randn(kv, h),
            p + "self_attn.v_proj.weight": torch.randn(kv, h),
            p + "self_attn.o_proj.weight": torch.randn(h, h),
            p + "mlp.gate_proj.weight": torch.randn(inter, h),
            p + "mlp.up_proj.weight": torch.randn(inter, h),
            p + "mlp.down_proj.weight": torch.randn(h, inter),
            p + "input_layernorm.weight": torch.randn(h),
            p + "post_attention_layernorm.weight": torch.randn(h),
        }
    t = {k: v.to(dtype).contiguous() for k, v in t.items()}
    # Two shards, in an order unlike the model's, as real checkpoints are.
    names = sorted(t)
    half = len(names) // 2
    save_file({n: t[n] for n in names[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({n: t[n] for n in names[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                            for i, n in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": tie}))
    return t


def _start(tmp_path, driver, dtype="auto", threads=3, piece=None, monkeypatch=None):
    if piece is not None:
        monkeypatch.setattr(early_weights, "PIECE_BYTES", piece)
    return early_weights.start(str(tmp_path), dtype, threads=threads, lib=driver)


def _weights(reader, driver):
    """EarlyWeights over the fake device memory (a CPU tensor aliasing it)."""
    reader.ready.wait(10)
    raw = (ctypes.c_uint8 * reader.nbytes).from_address(reader.base)
    return early_weights.EarlyWeights(reader, torch.bfloat16, device_buffer=torch.frombuffer(
        raw, dtype=torch.uint8))


@pytest.mark.parametrize("piece", [None, 1000])  # whole tensors; many pieces per tensor
def test_reader_puts_every_tensor_at_its_offset(tmp_path, monkeypatch, piece):
    tensors = _checkpoint(tmp_path)
    driver = FakeDriver()
    reader = _start(tmp_path, driver, piece=piece, monkeypatch=monkeypatch)
    assert reader is not None and early_weights.claim(tmp_path) is reader
    w = _weights(reader, driver)
    for name, ref in tensors.items():
        assert torch.equal(w.take(name, tuple(ref.shape)), ref), name
    assert w.names() == []
    assert reader.stats.bytes_read == reader.stats.bytes_planned
    w.close()
    assert driver.freed == []  # the buffer is the weights' storage: not freed at close


def test_layout_aligns_tensors_but_keeps_fused_parts_back_to_back(tmp_path):
    _checkpoint(tmp_path)
    reader = early_weights.start(str(tmp_path), "auto", threads=1, lib=FakeDriver())
    early_weights.discard()
    slots = reader.slots
    p = "model.layers.1."
    q, k, v = (slots[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
    assert k.offset == q.offset + q.entry.nbytes and v.offset == k.offset + k.entry.nbytes
    gate, up = slots[p + "mlp.gate_proj.weight"], slots[p + "mlp.up_proj.weight"]
    assert up.offset == gate.offset + gate.entry.nbytes
    assert all(s.offset % early_weights.ALIGN == 0 for n, s in slots.items()
               if not n.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")))
    assert reader.nbytes % early_weights.ALIGN == 0


def test_fused_parts_are_one_view_equal_to_their_concatenation(tmp_path):
    tensors = _checkpoint(tmp_path)
    driver = FakeDriver()
    reader = _start(tmp_path, driver)
    early_weights.claim(tmp_path)
    w = _weights(reader, driver)
    p = "model.layers.0."
    parts = [(p + f"self_attn.{n}_proj.weight", tuple(tensors[p + f"self_attn.{n}_proj.weight"]
                                                          .shape)) for n in "qkv"]
    fused = w.take_adjacent(parts)
    assert fused.shape == (64 + 32 + 32, 64)
    assert torch.equal(fused, torch.cat([tensors[n] for n, _ in parts]))
    # A view of the buffer where q starts: no copy was made.
    assert fused.data_ptr() == reader.base + reader.slots[parts[0][0]].offset
    # Not back to back (o_proj sits between): the caller concatenates instead.
    assert w.take_adjacent([(p + "self_attn.o_proj.weight", (64, 64)),
                            (p + "mlp.gate_proj.weight", (96, 64))]) is None


def test_untaken_tensors_are_named_whether_read_or_not(tmp_path, monkeypatch):
    from safetensors.torch import save_file as save

    _checkpoint(tmp_path)
    # A tensor no model takes (a vision tower's, say): not read, still reported as unused.
    save({"vision.proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16)},
         str(tmp_path / "extra.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["vision.proj.weight"] = "extra.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    driver = FakeDriver()
    reader = _start(tmp_path, driver)
    early_weights.claim(tmp_path)
    assert "vision.proj.weight" not in reader.slots
    w = _weights(reader, driver)
    w.take("model.norm.weight", (64,))
    names = w.names()
    assert "vision.proj.weight" in names and "model.norm.weight" not in names
    assert "model.embed_tokens.weight" in names


def test_take_checks_names_and_shapes(tmp_path):
    _checkpoint(tmp_path)
    driver = FakeDriver()
    reader = _start(tmp_path, driver)
    early_weights.claim(tmp_path)
    w = _weights(reader, driver)
    with pytest.raises(ModelLoadError, match="has shape"):
        w.take("model.norm.weight", (65,))
    with pytest.raises(ModelLoadError, match="missing"):
        w.take("model.layers.9.mlp.up_proj.weight", (96, 64))


def test_tied_lm_head_is_not_read_and_a_dtype_mismatch_is_left_to_the_pipeline(tmp_path):
    _checkpoint(tmp_path, tie=True)
    reader = _start(tmp_path, FakeDriver())
    assert "lm_head.weight" not in reader.slots
    early_weights.discard()
    assert _start(tmp_path, FakeDriver(), dtype="float16") is None  # bf16 bytes, fp16 served
    assert _start(tmp_path, FakeDriver(), dtype="float32") is None
    assert early_weights.start(None, "auto", lib=FakeDriver()) is None  # the embedded model
    assert early_weights.start(str(tmp_path / "nope"), "auto", lib=FakeDriver()) is None


def _failing(tmp_path, call: str):
    """A claimed reader over a fake driver whose `call` fails, once a reader has hit it."""
    _checkpoint(tmp_path)
    driver = FakeDriver(fail=call)
    reader = _start(tmp_path, driver)
    early_weights.claim(tmp_path)
    reader.ready.wait(10)
    deadline = time.monotonic() + 10
    while reader.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return reader, driver


def test_a_failed_setup_frees_nothing_twice_and_makes_the_source_unusable(tmp_path):
    reader, driver = _failing(tmp_path, "cuMemAlloc_v2")
    assert "cuMemAlloc" in reader.error
    with pytest.raises(ModelLoadError, match="unusable"):
        early_weights.EarlyWeights(reader, torch.bfloat16,
                                   device_buffer=torch.zeros(1, dtype=torch.uint8))
    assert driver.freed == []  # nothing was allocated


def test_a_copy_failing_before_the_load_leaves_it_to_the_pipeline(tmp_path):
    reader, driver = _failing(tmp_path, "cuMemcpyHtoDAsync_v2")
    base = reader.base
    with pytest.raises(ModelLoadError, match="unusable.*cuMemcpyHtoDAsync"):
        _weights(reader, driver)
    assert driver.freed == [base]  # given back before the pipeline allocates its own


def test_a_copy_failing_during_the_load_fails_the_take_instead_of_hanging(tmp_path):
    tensors = _checkpoint(tmp_path)
    gate = threading.Event()
    driver = FakeDriver(fail="cuMemcpyHtoDAsync_v2", gate=gate)
    reader = _start(tmp_path, driver)
    early_weights.claim(tmp_path)
    w = _weights(reader, driver)  # the readers are still in their first copies
    gate.set()
    name = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(ModelLoadError, match="cuMemcpyHtoDAsync"):
        w.take(name, tuple(tensors[name].shape))


def test_claim_for_another_directory_stops_and_frees(tmp_path):
    _checkpoint(tmp_path)
    driver = FakeDriver()
    reader = _start(tmp_path, driver)
    reader.ready.wait(10)
    base = reader.base
    assert base
    assert early_weights.claim(tmp_path / "elsewhere") is None
    assert driver.freed == [base] and reader.base == 0
    assert early_weights.claim(tmp_path) is None  # handed over (or dropped) once only


def test_reader_count_follows_the_page_cache(tmp_path, monkeypatch):
    from server import prefetch

    _checkpoint(tmp_path)
    reader = early_weights.start(str(tmp_path), "auto", threads=2, lib=FakeDriver())
    early_weights.discard()
    plan = [s.entry for s in reader.slots.values()]
    total = sum(e.nbytes for e in plan)
    monkeypatch.setattr(early_weights.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(prefetch, "not_resident", lambda p: [])
    # From the page cache: one reader per CACHED_BYTES_PER_READER bytes (more only slow the
    # torch import beside them), up to CACHED_THREADS.
    assert early_weights.default_threads(plan) == 1  # a small checkpoint: one reader
    monkeypatch.setattr(early_weights, "CACHED_BYTES_PER_READER", total // 2)
    assert early_weights.default_threads(plan) == 2
    monkeypatch.setattr(early_weights, "CACHED_BYTES_PER_READER", total // 2 + 1)
    assert early_weights.default_threads(plan) == 2  # rounded up
    monkeypatch.setattr(early_weights, "CACHED_BYTES_PER_READER", 1)
    assert early_weights.default_threads(plan) == early_weights.CACHED_THREADS
    monkeypatch.setattr(prefetch, "not_resident", lambda p: p[:1])  # a page on disk: read wide
    assert early_weights.default_threads(plan) == early_weights.DISK_THREADS
    monkeypatch.setattr(early_weights.os, "sched_getaffinity", lambda pid: {0, 1})
    assert early_weights.default_threads(plan) == 2
    monkeypatch.setattr(prefetch, "not_resident", lambda p: [])
    assert early_weights.default_threads(plan) == 1  # two CPUs: one reader, however large


def test_the_engine_reads_early_only_where_it_applies():
    from server.config import EngineConfig
    from server.engine import reads_early

    assert reads_early(EngineConfig(device="cuda")) and reads_early(EngineConfig())  # auto
    assert not reads_early(EngineConfig(device="cpu"))
    assert not reads_early(EngineConfig(device="cuda", early_weights=False))
    assert not reads_early(EngineConfig(device="cuda", load_format="dummy"))
    assert not reads_early(EngineConfig(device="cuda", loader="transformers"))
    assert not reads_early(EngineConfig(device="cuda", tensor_parallel_size=2))
