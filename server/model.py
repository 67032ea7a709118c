"""The decoder forward for Llama-family checkpoints, over the engine's slot KV cache.

Llama 2/3, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) share one layer shape,
so one readable forward serves them all. Weights come from the HF model that transformers loaded;
the q/k/v and gate/up projections are fused into single matrices (one GEMM each instead of three
and two) and the HF modules are dropped. Arithmetic follows the HF modules op for op (see
`server.ops`), so greedy output matches HF's own forward.

Two entry points:
* `decode(...)`: one new token for each of N rows — fixed shapes, no host sync, no branching
  on values, logits written into a caller-owned buffer: this is what a CUDA graph captures.
* `prefill(...)`: a packed chunk of prompt tokens from several sequences (eager), attending to
  each sequence's earlier chunks already in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from server import ops


@dataclass
class ModelShape:
    """The dimensions the engine sizes buffers and the KV cache from."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, per element byte (multiply by itemsize)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm weight over head_dim
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class PrefillChunk:
    """Tokens `[start, start + length)` of the sequence in `slot`, at `offset` in the batch."""

    slot: int
    start: int
    length: int
    offset: int


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def _cat_bias(*linears) -> torch.Tensor | None:
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [
            b if b is not None else torch.zeros_like(lin.weight[:, 0])
            for b, lin in zip(biases, linears, strict=True)
        ]
    )


class DecoderModel:
    """Owns the weights of a loaded checkpoint and runs its forward over a slot KV cache."""

    def __init__(self, hf_model, max_model_len: int):
        config = hf_model.config
        inner = hf_model.model
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.shape = ModelShape(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=hf_model.lm_head.weight.shape[0],
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=_sliding_window(config),
        )
        self.eps = config.rms_norm_eps
        self.scale = head_dim**-0.5
        self.embed = inner.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self.final_norm = inner.norm.weight
        self.lm_head = hf_model.lm_head.weight
        self.layers = [self._take_layer(layer) for layer in inner.layers]
        # cos/sin for every position, from HF's own rotary module: it implements the RoPE
        # scaling variants, and a table lookup per step is one gather instead of ~8 kernels.
        with torch.no_grad():
            pos = torch.arange(max_model_len, device=self.device)[None, :]
            probe = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = inner.rotary_emb(probe, pos)
        self.cos = cos[0].contiguous()
        self.sin = sin[0].contiguous()
        self.max_model_len = max_model_len

    @staticmethod
    def _take_layer(layer) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            weights = LayerWeights(
                input_norm=layer.input_layernorm.weight,
                qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                qkv_bias=_cat_bias(attn.q_proj, attn.k_proj, attn.v_proj),
                q_norm=attn.q_norm.weight if hasattr(attn, "q_norm") else None,
                k_norm=attn.k_norm.weight if hasattr(attn, "k_norm") else None,
                o_proj=attn.o_proj.weight,
                o_bias=attn.o_proj.bias,
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                gate_up_bias=_cat_bias(mlp.gate_proj, mlp.up_proj),
                down=mlp.down_proj.weight,
                down_bias=mlp.down_proj.bias,
            )
            # Drop the unfused copies now, layer by layer, so peak memory stays ~ weights + 1 layer.
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight = None
                lin.bias = None
        return weights

    # -- the forward -------------------------------------------------------------------------

    def _layer_attention_qkv(self, w: LayerWeights, x: torch.Tensor):
        s = self.shape
        qkv = F.linear(x, w.qkv, w.qkv_bias)
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q = qkv[:, :q_size].view(-1, s.num_heads, s.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(-1, s.num_kv_heads, s.head_dim)
        v = qkv[:, q_size + kv_size :].view(-1, s.num_kv_heads, s.head_dim)
        if w.q_norm is not None:
            # Qwen3 normalises each head; the strided [T, heads, D] views go in without a copy.
            q = ops.rms_norm(q, w.q_norm, self.eps)
            k = ops.rms_norm(k, w.k_norm, self.eps)
        return q, k, v

    def _forward(self, input_ids, positions, slots, kv_cache, attend) -> torch.Tensor:
        """Run all layers; `attend(layer_idx, q_rot)` computes attention for the rows."""
        cos = self.cos[positions]
        sin = self.sin[positions]
        h = F.embedding(input_ids, self.embed)
        residual = h
        x = ops.rms_norm(h, self.layers[0].input_norm, self.eps)
        n_layers = len(self.layers)
        for i, w in enumerate(self.layers):
            q, k, v = self._layer_attention_qkv(w, x)
            k_cache, v_cache = kv_cache[i]
            q = ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
            attn = attend(i, q).reshape(q.shape[0], -1)
            attn = F.linear(attn, w.o_proj, w.o_bias)
            x, residual = ops.add_rms_norm(attn, residual, w.post_norm, self.eps)
            mlp = ops.silu_and_mul(F.linear(x, w.gate_up, w.gate_up_bias))
            mlp = F.linear(mlp, w.down, w.down_bias)
            next_norm = self.layers[i + 1].input_norm if i + 1 < n_layers else self.final_norm
            x, residual = ops.add_rms_norm(mlp, residual, next_norm, self.eps)
        return x  # final-normed hidden states

    @torch.inference_mode()
    def decode(self, input_ids, positions, slots, kv_cache, logits_out: torch.Tensor) -> None:
        """One token per row: row r is token `input_ids[r]` at `positions[r]` of slot `slots[r]`.

        Writes logits `[N, vocab]` into `logits_out` (a caller-owned buffer, so a captured graph
        leaves no per-size output in the graph pool). Capturable: shapes only, no host sync.
        """
        seq_lens = positions + 1

        def attend(i, q):
            k_cache, v_cache = kv_cache[i]
            return ops.decode_attention(q, k_cache, v_cache, slots, seq_lens, self.scale)

        x = self._forward(input_ids, positions, slots, kv_cache, attend)
        torch.matmul(x, self.lm_head.t(), out=logits_out)

    @torch.inference_mode()
    def prefill(self, input_ids, positions, slots, kv_cache, chunks: list[PrefillChunk]):
        """Packed prompt chunks; returns logits `[len(chunks), vocab]` at each chunk's end."""

        def attend(i, q):
            k_cache, v_cache = kv_cache[i]
            out = torch.empty_like(q)
            for c in chunks:
                end = c.start + c.length
                qc = q[c.offset : c.offset + c.length].transpose(0, 1).unsqueeze(0)
                kc = k_cache[c.slot, :, :end].unsqueeze(0)
                vc = v_cache[c.slot, :, :end].unsqueeze(0)
                if c.start == 0:
                    o = F.scaled_dot_product_attention(
                        qc, kc, vc, is_causal=True, scale=self.scale, enable_gqa=True
                    )
                else:
                    # Query token j sits at absolute position start + j and sees keys <= it:
                    # causal aligned to the bottom-right corner. The bias object lets SDPA use
                    # a fused kernel's own causal masking instead of reading a boolean mask
                    # (H100, 2048 queries over 4096 keys: 0.39 vs 0.45 ms; on the CPU the mask
                    # sends SDPA to its math kernel, which materialises the scores).
                    o = F.scaled_dot_product_attention(
                        qc,
                        kc,
                        vc,
                        attn_mask=causal_lower_right(c.length, end),
                        scale=self.scale,
                        enable_gqa=True,
                    )
                out[c.offset : c.offset + c.length] = o[0].transpose(0, 1)
            return out

        x = self._forward(input_ids, positions, slots, kv_cache, attend)
        last = [c.offset + c.length - 1 for c in chunks]
        # Index with a host-built tensor staged through pinned memory: a plain
        # torch.tensor(..., device="cuda") would wait here for the whole forward to finish.
        pinned = x.device.type == "cuda"
        rows = torch.tensor(last, pin_memory=pinned).to(x.device, non_blocking=True)
        return torch.matmul(x[rows], self.lm_head.t())


def allocate_kv_cache(shape: ModelShape, num_slots: int, max_len: int, dtype, device):
    """Per layer, `(k, v)` tensors of `[num_slots, Hkv, max_len, D]`.

    Slot-major so one sequence's keys for one head are contiguous over positions: the decode
    kernel streams them without a gather, and a slot is reused as soon as its request ends.
    """
    return [
        (
            torch.zeros(
                num_slots, shape.num_kv_heads, max_len, shape.head_dim, dtype=dtype, device=device
            ),
            torch.zeros(
                num_slots, shape.num_kv_heads, max_len, shape.head_dim, dtype=dtype, device=device
            ),
        )
        for _ in range(shape.num_layers)
    ]
