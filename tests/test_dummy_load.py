"""`--load-format dummy`: random weights of config.json's shapes; no weight file is read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from server.cli import config_from_args, parse_args
from server.config import ConfigError, EngineConfig
from server.errors import ModelLoadError
from server.model_loader import load_checkpoint
from server.request import SamplingParams
from server.weights import DummyWeights
from tests.helpers.tiny_models import build_checkpoint


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("real"), "qwen3", seed=1,
                            attention_bias=True)


@pytest.fixture()
def config_only(real_dir, tmp_path) -> Path:
    out = tmp_path / "config-only"
    out.mkdir()
    for f in real_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return out


def test_values_depend_on_seed_and_name_not_on_order():
    a, b = DummyWeights("cpu", torch.float32, seed=7), DummyWeights("cpu", torch.float32, seed=7)
    q = a.take("model.layers.0.self_attn.q_proj.weight", (256, 128))
    b.take("model.embed_tokens.weight", (10, 128))  # another take first changes nothing
    assert torch.equal(q, b.take("model.layers.0.self_attn.q_proj.weight", (256, 128)))
    other = DummyWeights("cpu", torch.float32, seed=8)
    assert not torch.equal(q, other.take("model.layers.0.self_attn.q_proj.weight", (256, 128)))
    k = a.take("model.layers.0.self_attn.k_proj.weight", (256, 128))
    assert not torch.equal(q, k)
    assert abs(float(q.std()) - 0.02) < 0.002 and abs(float(q.mean())) < 0.002
    assert torch.equal(a.take("model.norm.weight", (128,)), torch.ones(128))
    assert torch.equal(a.take("model.layers.0.self_attn.q_norm.weight", (32,)), torch.ones(32))
    assert torch.equal(a.take("model.layers.0.self_attn.q_proj.bias", (8,)), torch.zeros(8))
    assert a.take("lm_head.weight", (3, 4)).dtype == torch.float32
    assert list(a.names()) == []


def test_config_only_directory_needs_dummy(config_only):
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weight files"):
        load_checkpoint(str(config_only), "cpu", "float32")
    (config_only / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_checkpoint(str(config_only), "cpu", "float32", load_format="dummy")


@pytest.mark.parametrize("loader", ["auto", "transformers"])
def test_dummy_model_has_the_real_shapes(real_dir, config_only, loader):
    real = load_checkpoint(str(real_dir), "cpu", "float32")
    dummy = load_checkpoint(str(config_only), "cpu", "float32", loader=loader,
                            load_format="dummy")
    assert dummy.weights == "dummy" and dummy.load_stats is None
    assert dummy.model.shape == real.model.shape
    assert dummy.weight_bytes == real.weight_bytes
    shapes = [tuple(t.shape) for t in dummy.model._tensors()]
    assert shapes == [tuple(t.shape) for t in real.model._tensors()]
    assert all(t.dtype == torch.float32 for t in dummy.model._tensors())
    # Random, not the checkpoint's values (the files were never read).
    assert not torch.equal(dummy.model.embed, real.model.embed)
    assert dummy.eos_token_ids == real.eos_token_ids


def test_dummy_logits_stay_finite_and_spread(config_only):
    from tests.helpers.model_steps import prompt_logits

    ckpt = load_checkpoint(str(config_only), "cpu", "float32", load_format="dummy")
    model = ckpt.model
    model.init_rope(64)
    logits = prompt_logits(model, list(range(2, 40)))
    assert torch.isfinite(logits).all()
    assert 0.01 < float(logits.std()) < 100


async def test_engine_serves_tokens_from_a_config_only_directory(config_only):
    from server.engine import AsyncEngine

    engine = AsyncEngine(EngineConfig(model=str(config_only), device="cpu", max_num_seqs=2,
                                      max_model_len=64, load_format="dummy", state_dir=""))
    engine.start()
    try:
        assert engine.ready.wait(120), (engine.phase, engine.error)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        tokens = []
        async for out in engine.generate("dummy-1", [2, 3, 4, 5], params):
            tokens.extend(out.token_ids)
        assert len(tokens) == 6 and all(0 <= t < engine.vocab_size for t in tokens)
    finally:
        engine.shutdown()


def test_flags():
    cfg = config_from_args(parse_args(["--load-format", "dummy", "--model", "/m"])).engine
    assert cfg.load_format == "dummy"
    assert config_from_args(parse_args([])).engine.load_format == "auto"
    with pytest.raises(SystemExit):
        parse_args(["--load-format", "pt"])
    with pytest.raises(ConfigError, match="--load-format"):
        EngineConfig(load_format="npz").validate()
    assert config_from_args(parse_args(["--prefetch-threads", "0"])).engine.prefetch_threads == 0
    with pytest.raises(ConfigError, match="--prefetch-threads"):
        config_from_args(parse_args(["--prefetch-threads", "-1"]))
