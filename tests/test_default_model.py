"""The embedded default model: build, determinism, offline loading, tokenizer, chat template,
concurrent builds and recovery from a broken cache directory (CPU only)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from server import default_model as dm
from tests.helpers import REPO

TRICKY_TEXTS = [
    "Hello, world!",
    "emoji 😀🎉 ZWJ family 👨‍👩‍👧 skin tone 👍🏽 flags 🇯🇵🇧🇷 rainbow 🏳️‍🌈",
    "中文：茶馆里的下午。日本語のテキスト、한국어 문장.",
    "combining: e\u0301 a\u0308 n\u0303 \u0301 leading mark, Å vs A\u030a",
    "whitespace:  two   three\t\ttabs\n\n\nnewlines \r\n crlf    ",
    "   leading spaces and trailing ones   ",
    "\u200b zero width \u00a0 nbsp \ufeff bom \x00 nul \x7f del",
    "def f(x):\n    return {'a': [1, 2, 3]}  # 12345678901234567890\n",
    "mixed العربية עברית हिन्दी Ελληνικά русский ∑ᵢ aᵢ ≈ √2",
]


def _manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / dm.MANIFEST_FILE).read_text(encoding="utf-8"))


def _hashes(model_dir: Path) -> dict[str, str]:
    return {name: meta["sha256"] for name, meta in _manifest(model_dir)["files"].items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return dm.ensure_default_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built, local_files_only=True)


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) gives a BatchEncoding in transformers 5, a list before."""
    if isinstance(encoded, list):
        return encoded
    return list(encoded["input_ids"])


# --------------------------------------------------------------------------- locations


def test_module_import_is_light():
    code = (
        "import sys, server.default_model as m; "
        "heavy = [n for n in ('torch', 'transformers', 'tokenizers') if n in sys.modules]; "
        "print(','.join(heavy)); print(m.DEFAULT_MODEL_NAME)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["", "graphserve-tiny-llama"]


def test_default_location_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(tmp_path / "gs"))
    assert dm.default_model_dir() == tmp_path / "gs" / "default-model-v1"
    monkeypatch.delenv(dm.CACHE_ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "graphserve" / "default-model-v1"
    assert dm.default_model_dir() == expected
    assert dm.default_model_dir(tmp_path / "explicit") == tmp_path / "explicit" / "default-model-v1"


def test_ensure_uses_env_cache_when_no_argument(monkeypatch, tmp_path, built):
    # A complete copy already in $GRAPHSERVE_CACHE is returned as is, without rebuilding.
    shutil.copytree(built, tmp_path / built.name)
    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(dm, "build_default_model", _fail_build)
    assert dm.ensure_default_model() == tmp_path / built.name


def _fail_build(out_dir):
    raise AssertionError(f"unexpected rebuild into {out_dir}")


# --------------------------------------------------------------------------- build output


def test_layout_and_manifest(built):
    assert built.name == f"default-model-{dm.DEFAULT_MODEL_VERSION}"
    names = {p.name for p in built.iterdir()}
    assert set(dm.REQUIRED_FILES) | {dm.MANIFEST_FILE, "special_tokens_map.json"} <= names
    assert set(_manifest(built)["files"]) == names - {dm.MANIFEST_FILE}
    assert dm.is_complete(built)
    # No temp or stale directories are left next to the published one.
    assert [p.name for p in built.parent.iterdir() if p.is_dir()] == [built.name]
    size = (built / "model.safetensors").stat().st_size
    assert 1_000_000 < size < 8_000_000


def test_rebuild_is_byte_identical_and_keeps_global_rng(built, tmp_path):
    import torch

    torch.manual_seed(987)  # a different global RNG state must not matter
    state = torch.get_rng_state()
    again = dm.ensure_default_model(tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
    assert _hashes(again) == _hashes(built)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (built / name).read_bytes()


def test_offline_loading_and_config(built, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(built, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(built, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(built, local_files_only=True)
    gen = GenerationConfig.from_pretrained(built, local_files_only=True)

    assert config.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert config.vocab_size == len(tok) == dm.VOCAB_SIZE
    assert config.num_attention_heads > config.num_key_value_heads  # GQA
    assert config.tie_word_embeddings is False
    assert config.max_position_embeddings == dm.MAX_POSITION_EMBEDDINGS
    assert model.dtype == torch.bfloat16
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        dm.BOS_TOKEN,
        dm.EOS_TOKEN,
        dm.PAD_TOKEN,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in dm.SPECIAL_TOKENS}
    assert ids == dict(zip(dm.SPECIAL_TOKENS, range(5), strict=True))
    assert gen.bos_token_id == dm.BOS_TOKEN_ID
    assert gen.eos_token_id == [dm.EOS_TOKEN_ID, dm.IM_END_TOKEN_ID]
    assert gen.pad_token_id == dm.PAD_TOKEN_ID
    assert tok.model_max_length == dm.MAX_POSITION_EMBEDDINGS


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == dm.BOS_TOKEN_ID and dm.BOS_TOKEN_ID not in ids[1:]
    assert dm.EOS_TOKEN_ID not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids[1:]) == text


def test_tokenizer_round_trips_random_unicode(tokenizer):
    rng = random.Random(0)
    # Code points from every plane in use, minus surrogates (not valid in UTF-8 text).
    pool = [c for c in range(0x20, 0x30000, 7) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(chr(rng.choice(pool)) for _ in range(2000))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_compresses_corpus_like_text(tokenizer):
    # Merges were actually learned: common English is far shorter than one token per byte.
    text = "The server reads that message, decides which piece of code should handle it."
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < len(text) / 2.5


def test_special_token_strings_map_to_single_ids(tokenizer):
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == dm.IM_START_TOKEN_ID and ids[-1] == dm.IM_END_TOKEN_ID
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


# --------------------------------------------------------------------------- chat template


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
    ]
    body = (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nAB<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == body
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == body + "<|im_start|>assistant\n"

    ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [dm.BOS_TOKEN_ID, dm.IM_START_TOKEN_ID]
    assert ids.count(dm.BOS_TOKEN_ID) == 1
    assert ids.count(dm.IM_END_TOKEN_ID) == 4


def test_chat_template_tools_and_tool_calls(tokenizer):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    ]
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|begin_of_text|><|im_start|>system\nSys.\n\n# Tools")
    assert text.count("<|im_start|>system") == 1  # the system message is merged, not repeated
    assert '"name": "get_weather"' in text and '"description": "Current weather"' in text
    expected_call = (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
    )
    assert expected_call in text
    assert text.endswith("<|im_start|>tool\n-3 C<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(Exception, match="unsupported chat role: narrator"):
        tokenizer.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


# --------------------------------------------------------------------------- model behaviour


def test_greedy_generation_is_varied(built, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32).eval()
    prompts = ["Hello, my name is", "The quick brown fox", "def main():", "Once upon a time"]
    continuations = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=dm.PAD_TOKEN_ID)
        new = out[0, ids.shape[1] :].tolist()
        assert len(new) == 16  # greedy never emits a stop token (zeroed lm_head rows)
        assert len(set(new)) >= 6, f"degenerate continuation for {prompt!r}: {new}"
        assert not set(new) & set(range(len(dm.SPECIAL_TOKENS)))
        continuations.append(tuple(new))
    assert len(set(continuations)) == len(prompts)


# --------------------------------------------------------------------------- concurrency


def _race_builds(cache: Path, workers: int) -> list[Path]:
    """Call ensure_default_model(cache) from `workers` threads released at the same instant."""
    results, errors = [], []
    barrier = threading.Barrier(workers)

    def worker():
        barrier.wait()
        try:
            results.append(dm.ensure_default_model(cache))
        except BaseException as exc:  # re-raised on the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def test_concurrent_threads_build_once(tmp_path, monkeypatch):
    calls = []
    real_build = dm.build_default_model

    def counting_build(out_dir):
        calls.append(out_dir)
        real_build(out_dir)

    monkeypatch.setattr(dm, "build_default_model", counting_build)
    results = _race_builds(tmp_path, workers=3)
    assert len(results) == 3 and len(set(results)) == 1
    assert len(calls) == 1
    assert dm.is_complete(results[0])


def test_unlocked_builders_still_agree(tmp_path, monkeypatch):
    """Where file locks are unavailable, racing builders rely on the atomic rename alone."""

    @contextlib.contextmanager
    def no_lock(path):
        yield False

    monkeypatch.setattr(dm, "_file_lock", no_lock)
    monkeypatch.setattr(dm, "_THREAD_LOCK", contextlib.nullcontext())
    results = _race_builds(tmp_path, workers=3)
    assert len(results) == 3 and len(set(results)) == 1
    assert dm.is_complete(results[0])
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_concurrent_processes_agree(tmp_path, built):
    code = (
        "import sys, json, server.default_model as m; "
        "p = m.ensure_default_model(sys.argv[1]); "
        "print(json.dumps({'path': str(p), 'complete': m.is_complete(p)}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    target = tmp_path / built.name
    assert outputs == [{"path": str(target), "complete": True}] * 2
    # Built by other processes (fresh tokenizer hash seeds, fresh torch state): same bytes.
    assert _hashes(target) == _hashes(built)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([built.name, f".{built.name}.lock"])


# --------------------------------------------------------------------------- broken caches


def _copy(built: Path, cache: Path) -> Path:
    target = cache / built.name
    shutil.copytree(built, target)
    return target


@pytest.mark.parametrize(
    "damage",
    ["delete_weights", "truncate_weights", "flip_tokenizer_byte", "drop_manifest", "old_version"],
)
def test_broken_cache_is_rebuilt(built, tmp_path, damage):
    target = _copy(built, tmp_path)
    if damage == "delete_weights":
        (target / "model.safetensors").unlink()
    elif damage == "truncate_weights":
        with open(target / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    elif damage == "flip_tokenizer_byte":
        data = bytearray((target / "tokenizer.json").read_bytes())
        data[len(data) // 2] ^= 0x01
        (target / "tokenizer.json").write_bytes(bytes(data))
    elif damage == "drop_manifest":
        (target / dm.MANIFEST_FILE).unlink()
    else:
        manifest = _manifest(target)
        manifest["version"] = "v0"
        (target / dm.MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    assert not dm.is_complete(target)

    assert dm.ensure_default_model(tmp_path) == target
    assert dm.is_complete(target)
    assert _hashes(target) == _hashes(built)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([built.name, f".{built.name}.lock"])


def test_leftovers_of_a_crashed_build_are_removed(built, tmp_path):
    crashed = tmp_path / f".{built.name}.tmp-crashed"
    crashed.mkdir()
    (crashed / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / built.name).mkdir()  # an empty, half-created directory
    dm.ensure_default_model(tmp_path)
    assert not crashed.exists()
    assert dm.is_complete(tmp_path / built.name)


def test_unwritable_cache_raises_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(dm.DefaultModelError, match=dm.CACHE_ENV_VAR):
        dm.ensure_default_model(blocker / "cache")
