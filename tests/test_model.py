"""The decoder forward against HF's own full-sequence forward, per architecture (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from server.errors import ModelLoadError
from server.kv_cache import allocate_kv_cache
from server.model import StepBatch
from server.model_loader import load_checkpoint
from tests.helpers.tiny_models import ARCHITECTURES, build_checkpoint, hf_reference

MAX_LEN = 128


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_dir(request, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pair(arch_dir):
    """(our model, HF reference) from the same directory, through the real loading code."""
    ours = load_checkpoint(str(arch_dir), "cpu", "float32")
    model = ours.model
    model.init_rope(MAX_LEN)
    ref = hf_reference(arch_dir)
    return model, ref


def _ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids]), use_cache=False).logits[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


BLOCK = 8  # small blocks: every sequence here spans several, in scattered order


def _paged(model, rows: int, num_blocks: int = 64, seed: int = 0):
    """A paged cache and a block table whose rows list scattered blocks (block 0 = scratch)."""
    kv = allocate_kv_cache(model.shape, num_blocks, BLOCK, torch.float32, "cpu")
    per_row = MAX_LEN // BLOCK
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks - 1, generator=g)[: rows * per_row] + 1
    table = torch.zeros(rows + 1, per_row, dtype=torch.int32)  # last row: scratch (block 0)
    table[:rows] = perm.view(rows, per_row).to(torch.int32)
    return kv, table


def _step(model, kv, table, decode=(), chunks=()):
    """One mixed step: `decode` = [(token, position, row)], `chunks` = [(ids, start, row)].
    Returns logits for the decode rows, then the last token of each chunk."""
    ids, pos, rows = [], [], []
    for token, p, r in decode:
        ids.append(token)
        pos.append(p)
        rows.append(r)
    cu, k_lens, seq_rows = [0], [], []
    for chunk, start, r in chunks:
        ids += chunk
        pos += range(start, start + len(chunk))
        rows += [r] * len(chunk)
        cu.append(cu[-1] + len(chunk))
        k_lens.append(start + len(chunk))
        seq_rows.append(r)
    nd = len(decode)
    batch = StepBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(pos),
        rows=torch.tensor(rows),
        logit_rows=torch.tensor(list(range(nd)) + [nd + c - 1 for c in cu[1:]]),
        num_decode=nd,
        seq_rows=torch.tensor(seq_rows) if chunks else None,
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32) if chunks else None,
        k_lens=torch.tensor(k_lens, dtype=torch.int32) if chunks else None,
        max_q_len=max((len(c) for c, _, _ in chunks), default=0),
    )
    return model.forward(batch, kv, table)


def test_chunked_prefill_then_padded_decode_matches_hf(pair):
    model, ref = pair
    kv, table = _paged(model, rows=3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, model.shape.vocab_size, (40,), generator=g).tolist()
    full = _ref_logits(ref, ids)
    row, scratch = 1, 3
    # Prompt of 25 tokens in three chunks of different sizes (crossing block edges).
    for start, length in ((0, 9), (9, 11), (20, 5)):
        logits = _step(model, kv, table, chunks=[(ids[start : start + length], start, row)])
        _close(logits[0], full[start + length - 1])
    # Decode the rest one token at a time, inside a batch of 3 padded with scratch rows.
    out = torch.empty(3, model.shape.vocab_size)
    for t in range(25, 40):
        model.decode(
            torch.tensor([7, ids[t], 0]),
            torch.tensor([0, t, 0]),
            torch.tensor([scratch, row, scratch]),
            kv,
            table,
            out,
        )
        _close(out[1], full[t])


def test_packed_prefill_of_different_lengths(pair):
    model, ref = pair
    kv, table = _paged(model, rows=3)
    a, b = list(range(3, 20)), list(range(30, 36))
    logits = _step(model, kv, table, chunks=[(a, 0, 0), (b, 0, 2)])
    _close(logits[0], _ref_logits(ref, a)[-1])
    _close(logits[1], _ref_logits(ref, b)[-1])


def test_a_mixed_step_equals_its_parts(pair):
    """Decode rows and prompt chunks in one step give the logits each gives alone."""
    model, ref = pair
    kv, table = _paged(model, rows=3)
    a = list(range(5, 30))
    b = list(range(40, 61))
    _step(model, kv, table, chunks=[(a[:-1], 0, 0)])  # a's prompt, minus its last token
    _step(model, kv, table, chunks=[(b[:12], 0, 1)])  # b's first chunk
    logits = _step(model, kv, table, decode=[(a[-1], len(a) - 1, 0)], chunks=[(b[12:], 12, 1)])
    _close(logits[0], _ref_logits(ref, a)[-1])
    _close(logits[1], _ref_logits(ref, b)[-1])


def test_padding_rows_do_not_touch_other_blocks(pair):
    model, _ = pair
    kv, table = _paged(model, rows=2)
    for k, v in kv:
        k.normal_()
        v.normal_()
    before = [(k[1:].clone(), v[1:].clone()) for k, v in kv]
    out = torch.empty(4, model.shape.vocab_size)
    model.decode(
        torch.tensor([5, 6, 7, 8]), torch.arange(4), torch.full((4,), 2), kv, table, out
    )
    for (k, v), (k0, v0) in zip(kv, before, strict=True):
        assert torch.equal(k[1:], k0) and torch.equal(v[1:], v0)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import json

    path = build_checkpoint(tmp_path / "m", "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*gpt2"):
        load_checkpoint(str(path), "cpu", "float32")


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "does not exist"),
        ("no_config", "no config.json"),
        ("no_weights", "no \\*.safetensors"),
    ],
)
def test_broken_directory_is_a_clear_error(tmp_path, breakage, message):
    path = tmp_path / "m"
    if breakage != "missing":
        build_checkpoint(path, "llama")
        victim = "config.json" if breakage == "no_config" else "model.safetensors"
        (path / victim).unlink()
    with pytest.raises(ModelLoadError, match=message):
        load_checkpoint(str(path), "cpu", "float32")
