"""The decoder forward against HF's own full-sequence forward, per architecture (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from server.errors import ModelLoadError
from server.kv_cache import allocate_kv_cache
from server.model import PrefillChunk
from server.model_loader import load_checkpoint
from tests.helpers.tiny_models import ARCHITECTURES, build_checkpoint

MAX_LEN = 128


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_dir(request, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def pair(arch_dir):
    """(our model, HF reference) from the same directory, through the real loading code."""
    from transformers import AutoModelForCausalLM

    ours = load_checkpoint(str(arch_dir), "cpu", "float32")
    model = ours.model
    model.init_rope(MAX_LEN)
    ref = AutoModelForCausalLM.from_pretrained(
        arch_dir, dtype=torch.float32, local_files_only=True
    ).eval()
    return model, ref


def _ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids]), use_cache=False).logits[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_then_padded_decode_matches_hf(pair):
    model, ref = pair
    kv = allocate_kv_cache(model.shape, 4, MAX_LEN, torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, model.shape.vocab_size, (40,), generator=g).tolist()
    full = _ref_logits(ref, ids)
    slot, scratch = 1, 3
    # Prompt of 25 tokens in three chunks of different sizes.
    for start, length in ((0, 9), (9, 11), (20, 5)):
        logits = model.prefill(
            torch.tensor(ids[start : start + length]),
            torch.arange(start, start + length),
            torch.full((length,), slot),
            kv,
            [PrefillChunk(slot=slot, start=start, length=length, offset=0)],
        )
        _close(logits[0], full[start + length - 1])
    # Decode the rest one token at a time, inside a batch of 3 padded with scratch rows.
    out = torch.empty(3, model.shape.vocab_size)
    for t in range(25, 40):
        model.decode(
            torch.tensor([7, ids[t], 0]),
            torch.tensor([0, t, 0]),
            torch.tensor([scratch, slot, scratch]),
            kv,
            out,
        )
        _close(out[1], full[t])


def test_packed_prefill_of_different_lengths(pair):
    model, ref = pair
    kv = allocate_kv_cache(model.shape, 3, MAX_LEN, torch.float32, "cpu")
    a, b = list(range(3, 20)), list(range(30, 36))
    chunks = [
        PrefillChunk(slot=0, start=0, length=len(a), offset=0),
        PrefillChunk(slot=2, start=0, length=len(b), offset=len(a)),
    ]
    logits = model.prefill(
        torch.tensor(a + b),
        torch.tensor(list(range(len(a))) + list(range(len(b)))),
        torch.tensor([0] * len(a) + [2] * len(b)),
        kv,
        chunks,
    )
    _close(logits[0], _ref_logits(ref, a)[-1])
    _close(logits[1], _ref_logits(ref, b)[-1])


def test_padding_rows_do_not_touch_other_slots(pair):
    model, _ = pair
    kv = allocate_kv_cache(model.shape, 3, MAX_LEN, torch.float32, "cpu")
    for k, v in kv:
        k.normal_()
        v.normal_()
    before = [(k[:2].clone(), v[:2].clone()) for k, v in kv]
    out = torch.empty(4, model.shape.vocab_size)
    model.decode(
        torch.tensor([5, 6, 7, 8]), torch.zeros(4, dtype=torch.long), torch.full((4,), 2), kv, out
    )
    for (k, v), (k0, v0) in zip(kv, before, strict=True):
        assert torch.equal(k[:2], k0) and torch.equal(v[:2], v0)


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
