"""The embedded default model: a tiny random Llama checkpoint built once into a local cache.

`graphserve` with no `--model` must start on a fresh machine without network access, so the
package ships a small text corpus (`server/data/*.txt`) instead of weights. On first use,
`ensure_default_model()` trains a byte-level BPE tokenizer on that corpus, initialises a small
`LlamaForCausalLM` from a fixed seed, and saves both as an ordinary Hugging Face directory
(`config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json`, chat template). The engine then loads it through exactly the same code as
any real checkpoint.

The build is deterministic (same weight and tokenizer bytes every time, on transformers 5.17 and
5.24 alike), takes a fraction of a second once torch and transformers' Llama classes are imported,
and is published with one atomic rename so concurrent processes never
see a half-written directory. The weights are random: generated text is gibberish by design.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "graphserve-tiny-llama"
# Bump whenever anything below changes the built files (corpus, recipe, seed, config, template):
# the directory name changes with it, so an old cache is ignored instead of misread.
DEFAULT_MODEL_VERSION = "v1"
CACHE_ENV_VAR = "GRAPHSERVE_CACHE"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Order fixes the ids: the BPE trainer assigns special tokens ids 0..4 in this order.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)
BOS_TOKEN_ID, EOS_TOKEN_ID, IM_START_TOKEN_ID, IM_END_TOKEN_ID, PAD_TOKEN_ID = range(5)

# 2048 is reachable on the shipped corpus with min_frequency=2 (every merge is seen at least
# twice) and is a multiple of 64, which keeps the vocab-sized GEMMs aligned on the GPU.
VOCAB_SIZE = 2048
MAX_POSITION_EMBEDDINGS = 2048
HIDDEN_SIZE = 128
NUM_LAYERS = 4
NUM_ATTENTION_HEADS = 4
NUM_KV_HEADS = 2  # < NUM_ATTENTION_HEADS so grouped-query attention is exercised
INTERMEDIATE_SIZE = 352
SEED = 1234
# Logit standard deviation at init: big enough that sampling at temperature 1 is visibly peaked
# (top-k/top-p have something to cut), small enough that greedy still depends on the context.
LOGIT_STD = 3.0

MANIFEST_FILE = "graphserve-manifest.json"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# Llama-3 style pre-tokenisation: contractions, letter runs with one leading non-letter, digit
# groups of at most three, punctuation runs, newline runs and other whitespace. The byte-level
# step after it maps every UTF-8 byte to a symbol, so any text round-trips exactly.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML. Starts with BOS (apply_chat_template tokenizes without adding special tokens), accepts
# string, null or text-part-list content, renders OpenAI-style tools and assistant tool calls,
# and rejects roles it does not know rather than rendering them silently.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{ content }}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{ part }}"
    "{%- elif part.type == 'text' -%}{{ part.text }}"
    "{%- else -%}{{ raise_exception('only text content parts are supported, got: ' ~ part.type) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('message content must be a string or a list of parts') }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- set ns = namespace(skip_first=false) -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{- render_content(messages[0].content) + '\\n\\n' -}}"
    "{%- set ns.skip_first = true -%}"
    "{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more of these functions:\\n<tools>\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson + '\\n' -}}{%- endfor -%}"
    "{{- '</tools>\\n\\nTo call a function, answer with '"
    ' + \'<tool_call>\\n{"name": <name>, "arguments": <arguments>}\\n</tool_call>\''
    " + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and ns.skip_first) -%}"
    "{%- if message.role not in ['system', 'developer', 'user', 'assistant', 'tool'] -%}"
    "{{- raise_exception('unsupported chat role: ' ~ message.role) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) -}}"
    "{%- if message.role == 'assistant' and message.tool_calls -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": ' + fn.name | tojson + ', \"arguments\": ' -}}"
    "{%- if fn.arguments is string -%}{{- fn.arguments -}}"
    "{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Serialises builds between threads of one process, also where file locks are unavailable.
_THREAD_LOCK = threading.Lock()


class DefaultModelError(RuntimeError):
    """The default model could not be built or published; the message says why."""


def default_cache_dir() -> Path:
    """`$GRAPHSERVE_CACHE` if set, else `~/.cache/graphserve`."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "graphserve"


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the default model lives: `<cache_dir>/default-model-<version>`."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"default-model-{DEFAULT_MODEL_VERSION}"


def ensure_default_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory of the built default model, building it first if needed.

    `cache_dir` is the parent cache directory (default: `default_cache_dir()`); the model goes
    into its `default-model-<version>` subdirectory. A directory that is missing files or whose
    files do not match its manifest is rebuilt. Safe to call from several threads or processes
    at once: one builds, the others wait for it and reuse the result.
    """
    target = default_model_dir(cache_dir)
    if is_complete(target):
        return target

    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DefaultModelError(
            f"cannot create the cache directory {parent} for the default model ({exc}); "
            f"set {CACHE_ENV_VAR} to a writable directory or pass --model"
        ) from exc

    with _THREAD_LOCK, _file_lock(parent / f".{target.name}.lock") as exclusive:
        # Whoever held the lock before us may have just published it.
        if is_complete(target):
            return target
        if exclusive:
            _remove_leftovers(parent, target.name)
        logger.info("building the default model %s into %s", DEFAULT_MODEL_NAME, target)
        started = time.perf_counter()
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        except OSError as exc:
            raise DefaultModelError(
                f"cannot write to the cache directory {parent} ({exc}); "
                f"set {CACHE_ENV_VAR} to a writable directory or pass --model"
            ) from exc
        try:
            build_default_model(tmp)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # already gone if it was published
        logger.info("built the default model in %.2f s (%s)", time.perf_counter() - started, target)
    return target


def is_complete(model_dir: str | os.PathLike[str]) -> bool:
    """True if `model_dir` holds a finished build whose files all match its manifest."""
    model_dir = Path(model_dir)
    try:
        manifest = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("version") != DEFAULT_MODEL_VERSION:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not set(REQUIRED_FILES) <= files.keys():
        return False
    for name, expected in files.items():
        if not isinstance(expected, dict) or Path(name).name != name:
            return False
        path = model_dir / name
        try:
            if path.stat().st_size != expected.get("size"):
                return False
            if _sha256(path) != expected.get("sha256"):
                return False
        except OSError:
            return False
    return True


def build_default_model(out_dir: str | os.PathLike[str]) -> None:
    """Write the default checkpoint, tokenizer and manifest into the existing `out_dir`.

    Not atomic on its own; `ensure_default_model` builds into a private directory and renames.
    """
    out_dir = Path(out_dir)
    _save_tokenizer(out_dir)
    _save_model(out_dir)
    _write_manifest(out_dir)


# --------------------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """The shipped training texts, in a fixed order (file names sorted)."""
    data = resources.files("server").joinpath("data")
    texts = [
        entry.read_text(encoding="utf-8")
        for entry in sorted(data.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".txt")
    ]
    if not texts:
        raise DefaultModelError("the packaged corpus server/data/*.txt is missing; reinstall")
    return texts


def _train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, seen in the corpus or not, so no input is ever unrepresentable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    # Plain encodes (completions) start with BOS, as Llama 3 does.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )

    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise DefaultModelError(
            f"the packaged corpus yields a {tokenizer.get_vocab_size()}-token vocabulary, "
            f"expected {VOCAB_SIZE}; the corpus under server/data/ is incomplete"
        )
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise DefaultModelError(f"special token {token} did not get id {token_id}")
    return tokenizer


def _save_tokenizer(out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Stated explicitly so transformers keeps "BOS, no EOS" when it rebuilds the
        # post-processor from these flags at load time.
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        # Cleanup would rewrite " ." as "." and break the exact byte round-trip.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    hf_tokenizer.save_pretrained(out_dir)
    # transformers 5 no longer writes this legacy file; tools built on transformers 4 read it.
    special_tokens_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
    }
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map)


# --------------------------------------------------------------------------- model


def _save_model(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    stop_ids = [EOS_TOKEN_ID, IM_END_TOKEN_ID]
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_ATTENTION_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HIDDEN_SIZE // NUM_ATTENTION_HEADS,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=stop_ids,
        pad_token_id=PAD_TOKEN_ID,
        # bfloat16 storage: it is what CUDA serving computes in, so the GPU path loads the
        # weights unrounded, and every bfloat16 value is exact in float32, so CPU (float32)
        # and GPU runs use numerically identical weights. It also halves the file size.
        dtype="bfloat16",
    )
    # Constructing the model runs transformers' own random init on the global CPU generator;
    # fork it so building the default model leaves the caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_init_tensor(name, tuple(param.shape)))
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID, eos_token_id=stop_ids, pad_token_id=PAD_TOKEN_ID
    )
    # transformers 5 always writes safetensors (the safe_serialization switch is gone).
    with _quiet_progress_bars():
        model.save_pretrained(out_dir)
    if not (out_dir / "model.safetensors").is_file():
        raise DefaultModelError("save_pretrained did not write a single model.safetensors file")


def _init_tensor(name: str, shape: tuple[int, ...]):
    """Deterministic float32 initial value for the parameter `name`.

    Each tensor has its own CPU generator seeded from its name, so the values depend neither
    on parameter order nor on how transformers initialises modules. Scales keep every residual
    branch around unit variance, so attention over the context (not just the last token)
    shapes the next-token choice and greedy continuations differ between prompts.
    """
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(SEED * 1_000_003 + zlib.crc32(name.encode("utf-8")))
    if name.endswith("norm.weight"):
        # Not all ones: a loader that drops or swaps norm weights must change the output.
        return torch.empty(shape).uniform_(0.75, 1.25, generator=generator)
    values = torch.randn(shape, generator=generator)
    if name.endswith("embed_tokens.weight"):
        return values  # unit variance; the first norm rescales anyway
    if name == "lm_head.weight":
        values *= LOGIT_STD / HIDDEN_SIZE**0.5
        # Zero rows give special tokens logit 0 (about the median), so greedy decoding never
        # picks EOS/<|im_end|>/BOS/PAD and runs to max_tokens; sampling can, rarely.
        values[: len(SPECIAL_TOKENS)] = 0.0
        return values
    if len(shape) != 2:
        raise DefaultModelError(f"no initialisation rule for parameter {name} {shape}")
    return values * shape[1] ** -0.5  # fan-in scaling for every projection


# --------------------------------------------------------------------------- publishing


def _write_manifest(out_dir: Path) -> None:
    files = {
        path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(out_dir.iterdir())
        if path.is_file() and path.name != MANIFEST_FILE
    }
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise DefaultModelError(f"default model build did not produce {', '.join(missing)}")
    manifest = {"name": DEFAULT_MODEL_NAME, "version": DEFAULT_MODEL_VERSION, "files": files}
    # Written last: its presence (with matching hashes) is what marks a directory complete.
    _write_json(out_dir / MANIFEST_FILE, manifest)


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished build at `tmp` to `target` with one rename, replacing a broken copy."""
    # mkdtemp and safetensors create owner-only entries; a shared cache must be readable by all.
    tmp.chmod(0o755)
    for path in tmp.iterdir():
        path.chmod(0o644)
    if target.exists() or target.is_symlink():
        if is_complete(target):
            return  # published meanwhile by a builder that held no lock; identical bytes
        # A broken copy: move it aside first (a rename cannot replace a non-empty directory),
        # then delete it.
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError as exc:
        # Another builder (one without a working file lock) published first; its build is
        # byte-identical to ours, so use it.
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and is_complete(target):
            return
        raise DefaultModelError(f"cannot publish the default model at {target}: {exc}") from exc


def _remove_leftovers(parent: Path, name: str) -> None:
    """Delete temp and stale dirs of crashed builds (only called while holding the file lock)."""
    for prefix in (f".{name}.tmp-", f".{name}.stale-"):
        for path in parent.glob(prefix + "*"):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Suppress transformers' one-shard "Writing model shards" bar in server startup logs."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Exclusive advisory lock on `path`; yields whether the lock is really held.

    Without fcntl (Windows) or on file systems that refuse flock, builds proceed unlocked:
    the atomic rename in `_publish` still keeps readers safe.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DefaultModelError(
            f"cannot create the lock file {path} ({exc}); "
            f"set {CACHE_ENV_VAR} to a writable directory or pass --model"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            logger.warning("cannot lock %s (%s); building the default model unlocked", path, exc)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
