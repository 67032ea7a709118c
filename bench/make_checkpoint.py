"""Write a random-weight Llama-3 architecture checkpoint (bf16 safetensors + tokenizer) to disk.

Benchmarks load it through the server's real loading path, so weight loading is measured, not
skipped. Shapes follow Llama 3.2 1B, Llama 3.1 8B and 70B; weights are N(0, 0.02) from a fixed
seed. The tokenizer is the embedded default model's (its ids are a subset of the 128k vocab).
`--config-only` writes config.json and the tokenizer but no weights: a directory for
`graphserve serve --load-format dummy` (70B shapes without 141 GB on disk).

    python -m bench.make_checkpoint --shape 8b --out /tmp/llama-8b
    python -m bench.make_checkpoint --shape 70b --config-only --out /tmp/llama-70b
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               tie_word_embeddings=False),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                tie_word_embeddings=False),
}  # fmt: skip
COMMON = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", torch_dtype="bfloat16",
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    attention_bias=False, mlp_bias=False,
)  # fmt: skip
SHARD_BYTES = 4 * 2**30


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def pad_tokenizer(path: Path, vocab_size: int) -> None:
    """Give every id the model can emit a text, as a real 128k tokenizer does.

    The embedded tokenizer has ~2k tokens; ids above it would decode to nothing, so a streaming
    client would see almost no chunks and could not measure per-token latency. Each missing id
    becomes a BPE vocabulary entry " tN" with no merge leading to it: prompts still tokenize as
    before, every id decodes to text, and (unlike 126k "added tokens", which transformers
    processes in Python at load) the tokenizer still loads in milliseconds.
    """
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    for i in range(vocab_size):
        if i not in taken:
            vocab[f"\u0120t{i}"] = i  # "\u0120" is byte-level BPE's space
    path.write_text(json.dumps(data, ensure_ascii=False))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu", help="where to draw weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config-only", action="store_true",
                    help="config.json and tokenizer only (for --load-format dummy)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from server.default_model import ensure_default_model

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(ensure_default_model())
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
    pad_tokenizer(out / "tokenizer.json", COMMON["vocab_size"])
    tok_cfg = json.loads((tok_dir / "config.json").read_text())
    cfg = dict(COMMON, **SHAPES[args.shape])
    cfg["bos_token_id"] = tok_cfg.get("bos_token_id")
    cfg["eos_token_id"] = tok_cfg.get("eos_token_id")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]})
    )
    if args.config_only:
        params = sum(math.prod(shape) for _, shape in tensor_shapes(cfg))
        print(f"wrote {args.shape} config and tokenizer ({params / 1e9:.2f} B parameters, no "
              f"weights) to {out} in {time.perf_counter() - t0:.1f} s")
        return

    g = torch.Generator(device=args.device).manual_seed(args.seed)
    shard, shard_bytes, shards, index = {}, 0, [], {}
    total = 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            for key in shard:
                index[key] = name
            shards.append(name)
            shard, shard_bytes = {}, 0

    for name, shape in tensor_shapes(cfg):
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (
                (torch.randn(shape, generator=g, device=args.device, dtype=torch.float32) * 0.02)
                .to(torch.bfloat16)
                .cpu()
            )
        nbytes = t.numel() * 2
        if shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        shard_bytes += nbytes
        total += nbytes
    flush()
    # Name shards "-of-N" like HF does, and write the index transformers reads.
    final = {}
    for k, name in enumerate(shards):
        new = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / name).rename(out / new)
        final[name] = new
    weight_map = {key: final[name] for key, name in index.items()}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    seconds = time.perf_counter() - t0
    size = f"{total / 1e9:.2f} GB, {len(shards)} shards"
    print(f"wrote {args.shape} checkpoint ({size}) to {out} in {seconds:.1f} s")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
