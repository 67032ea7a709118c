"""The decoder forward for Llama-family checkpoints, over the engine's slot KV cache.

Llama 2/3, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) share one layer shape,
so one readable forward serves them all. Weights come by name from a weight source
(`server.weights`: safetensors files, or the state dict of a transformers model); the q/k/v and
gate/up projections are fused into single matrices (one GEMM each instead of three and two) and
the unfused parts are freed layer by layer. Arithmetic follows the HF modules op for op (see
`server.ops`), so greedy output matches HF's own forward.

Under tensor parallelism (`shard=TPShard(rank, world)`) the model holds one rank's slice of
every weight (`server.distributed.sharding`: whole heads, an intermediate slice, a vocabulary
slice) and, once `attach_comm` gave it the group's collectives, all-reduces after o_proj and
down and after the embedding lookup, and gathers the LM head's slices into full logits. Every
rank runs the same forward on the same inputs; only the weights differ.

The KV cache is paged (`server.kv_cache`): per layer a `(k, v)` pair of
`[blocks, block_size, Hkv, D]` tensors, a sequence's tokens found through its row of the block
table. Two entry points:
* `decode(...)`: one new token for each of N rows — fixed shapes, no host sync, no branching
  on values, logits written into a caller-owned buffer: this is what a CUDA graph captures.
* `forward(StepBatch)`: a mixed step (eager): decode rows plus packed prompt chunks from
  several sequences, each chunk attending to its sequence's earlier tokens in the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server import ops
from server.distributed.sharding import TPShard, pad_rows, take_sharded
from server.hf_config import head_dim as config_head_dim
from server.hf_config import sliding_window


@dataclass
class ModelShape:
    """The dimensions the engine sizes buffers and the KV cache from.

    Heads and the intermediate size are this rank's (the whole model's divided by
    `tp_world`); `vocab_size` is the whole vocabulary, which sampling sees.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    tp_world: int = 1

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
class StepBatch:
    """The tokens of one eager step and how they attend (tensors on the model's device).

    Tokens `[0, num_decode)` are decode rows (one per sequence, attending to its first
    `positions + 1` cached tokens); the rest are prompt chunks, one per sequence: sequence s
    owns tokens `num_decode + cu_seqlens_q[s] : num_decode + cu_seqlens_q[s+1]`, the last
    tokens of its first `k_lens[s]` (causal, aligned to the end). Every token's K/V is written
    at `positions[t]` of block-table row `rows[t]` before attention reads the cache.
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    rows: torch.Tensor  # int64 [T]: block-table row of each token's sequence
    logit_rows: torch.Tensor  # int64 [R]: tokens whose logits are returned, in order
    num_decode: int
    seq_rows: torch.Tensor | None = None  # int64 [S]
    cu_seqlens_q: torch.Tensor | None = None  # int32 [S + 1], relative to num_decode
    k_lens: torch.Tensor | None = None  # int32 [S]
    max_q_len: int = 0


def _rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, CPU) and the cos/sin scale for `config`'s RoPE variant.

    Same formulas, op order and dtypes as transformers' RoPE init functions, so the tables
    are bit-identical to the ones HF's rotary module computes for the same config.
    """
    params = dict(config.rope_parameters or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = params["rope_theta"]
    dim = config_head_dim(config)
    if rope_type == "yarn":
        return _yarn_inv_freq(config, params, base, dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        inv_freq /= params["factor"]
    elif rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by the factor, short ones kept, the band between blended.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(in_band, blended, scaled)
    elif rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported")
    return inv_freq, 1.0


def _yarn_inv_freq(config, params: dict, base: float, dim: int) -> tuple[torch.Tensor, float]:
    factor = params.get("factor")
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = config.max_position_embeddings / original

    def mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        if m and m_all:
            attention_factor = float(mscale(factor, m) / mscale(factor, m_all))
        else:
            attention_factor = mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate (low frequencies)
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def rope_tables(config, max_len: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[max_len, head_dim]` for positions `0..max_len-1`, as HF's rotary module."""
    inv_freq, scale = _rope_inv_freq(config)
    positions = torch.arange(max_len, device=device)[:, None].float()
    freqs = positions * inv_freq.to(device=device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype).contiguous(), (emb.sin() * scale).to(dtype).contiguous()


def _fuse(parts: list[torch.Tensor]) -> torch.Tensor:
    fused = torch.cat(parts)
    parts.clear()  # the caller's list held the only other references: free the parts now
    return fused


def _take_fused(weights, shard: TPShard, parts: list[tuple[str, tuple[int, ...]]]):
    """This rank's rows of each part, fused along dim 0 in order: one view when the source
    holds the parts back to back (`server.early_weights`, one process), else taken and
    concatenated."""
    adjacent = getattr(weights, "take_adjacent", None)
    if adjacent is not None and shard.world == 1:
        fused = adjacent(parts)
        if fused is not None:
            return fused
    return _fuse([take_sharded(weights, name, shape, 0, *shard.part(shape[0]))
                  for name, shape in parts])


class DecoderModel:
    """Owns the weights of a loaded checkpoint and runs its forward over a slot KV cache.

    Built from a config (transformers' or `server.hf_config.ModelConfig`) and a weight source
    (`server.weights`), the same way for both loaders. `init_rope(max_model_len)` must run
    before the forward; passing `max_model_len` to the constructor does it right away.
    """

    def __init__(
        self, config, weights, max_model_len: int | None = None, shard: TPShard | None = None
    ):
        shard = shard or TPShard()
        world = shard.world
        head_dim = config_head_dim(config)
        hidden, inter = config.hidden_size, config.intermediate_size
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        vocab = config.vocab_size
        self.config = config
        self.shard = shard
        self.shape = ModelShape(
            num_layers=config.num_hidden_layers,
            hidden_size=hidden,
            num_heads=n_heads // world,
            num_kv_heads=n_kv // world,
            head_dim=head_dim,
            intermediate_size=inter // world,
            vocab_size=vocab,
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=sliding_window(config),
            tp_world=world,
        )
        self.eps = config.rms_norm_eps
        self.scale = head_dim**-0.5
        self.comm = None  # the tensor-parallel collectives (`attach_comm`); None: one process
        # Device bytes of these weights outside torch's caching allocator (set by the loader
        # when `server.early_weights` read them; the KV planner counts them).
        self.external_weight_bytes = 0
        # This rank's vocabulary rows [vocab_start, vocab_start + rows), zero-padded to `rows`
        # on the last rank so every rank's logits slice has the same width.
        self.vocab_start, stop, rows = shard.vocab_rows(vocab)
        self.logits_width = rows * world
        with torch.no_grad():
            self.embed = pad_rows(
                take_sharded(weights, "model.embed_tokens.weight", (vocab, hidden), 0,
                             self.vocab_start, stop),
                rows,
            )  # fmt: skip
            self.dtype = self.embed.dtype
            self.device = self.embed.device
            self.layers = [
                self._take_layer(config, weights, i, head_dim, shard)
                for i in range(config.num_hidden_layers)
            ]
            self.final_norm = weights.take("model.norm.weight", (hidden,))
            if getattr(config, "tie_word_embeddings", False):
                # One storage for both ends, as transformers ties them (a lm_head.weight in
                # the file is ignored there too).
                self.lm_head = self.embed
            else:
                self.lm_head = pad_rows(
                    take_sharded(weights, "lm_head.weight", (vocab, hidden), 0,
                                 self.vocab_start, stop),
                    rows,
                )  # fmt: skip
        self.weight_bytes = sum(
            t.numel() * t.element_size() for t in {id(t): t for t in self._tensors()}.values()
        )
        # The bias that sends a bias-free projection of `ops.LT_ROWS` rows to cuBLASLt, made
        # here because a first use inside a graph capture would put it in the graph pool. Not
        # under tensor parallelism: a TP=2 rank's halves lost there at 64 rows (2.2 us per
        # layer on the 8B, bench/results/gemm-routes-8b-h200.json), which is the batch its
        # throughput target is measured at.
        widest = max(t.shape[0] for t in self._tensors() if t.dim() == 2)
        self.zero_bias = (torch.zeros(widest, dtype=self.dtype, device=self.device)
                          if self.device.type == "cuda" and world == 1 else None)
        self.cos = self.sin = None
        self.max_model_len = 0
        if max_model_len is not None:
            self.init_rope(max_model_len)

    def attach_comm(self, comm) -> None:
        """Give a sharded model its group's collectives (`server.distributed.comm.TPComm`)
        before its first forward; the forward issues them in the same order on every rank."""
        if self.shard.world == 1:
            raise ValueError("a model that is not sharded has no collectives to attach")
        self.comm = comm

    def init_rope(self, max_model_len: int) -> None:
        """cos/sin tables for every position below `max_model_len` (one gather per step)."""
        self.cos, self.sin = rope_tables(self.config, max_model_len, self.dtype, self.device)
        self.max_model_len = max_model_len

    def _tensors(self):
        yield from (self.embed, self.final_norm, self.lm_head)
        for w in self.layers:
            yield from (t for t in vars(w).values() if t is not None)

    @staticmethod
    def _take_layer(config, weights, i: int, head_dim: int, shard: TPShard) -> LayerWeights:
        hidden, inter = config.hidden_size, config.intermediate_size
        q_out = config.num_attention_heads * head_dim
        kv_out = config.num_key_value_heads * head_dim
        model_type = getattr(config, "model_type", None)
        # As the HF modules are built: Qwen2 always has q/k/v biases and no o_proj bias, Llama and
        # Qwen3 follow attention_bias, Mistral has none whatever the config says.
        attn_bias = model_type in ("llama", "qwen3") and bool(getattr(config, "attention_bias", 0))
        qkv_bias = model_type == "qwen2" or attn_bias
        o_bias = attn_bias and model_type != "qwen2"
        mlp_bias = bool(getattr(config, "mlp_bias", False)) and model_type == "llama"
        p = f"model.layers.{i}."

        def take(name, shape):
            return weights.take(p + name, shape)

        def cols(name, shape):
            """This rank's input columns of a row-parallel matrix: dim 1."""
            return take_sharded(weights, p + name, shape, 1, *shard.part(shape[1]))

        def after_reduce(name, shape):
            """A bias added after the all-reduce: rank 0 adds it, once."""
            bias = take(name, shape)
            return bias if shard.rank == 0 else None

        qkv = (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out))
        # Each part is sliced on its own, then fused: the fused matrix holds this rank's q heads,
        # then its k heads, then its v heads, the layout the forward splits.
        qkv_w = _take_fused(weights, shard,
                            [(f"{p}self_attn.{n}.weight", (o, hidden)) for n, o in qkv])
        qkv_b = (_take_fused(weights, shard, [(f"{p}self_attn.{n}.bias", (o,)) for n, o in qkv])
                 if qkv_bias else None)  # fmt: skip
        has_qk_norm = model_type == "qwen3"
        gate_up = _take_fused(weights, shard, [
            (f"{p}mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}mlp.up_proj.weight", (inter, hidden)),
        ])
        gate_up_b = (
            _take_fused(weights, shard, [(f"{p}mlp.gate_proj.bias", (inter,)),
                                         (f"{p}mlp.up_proj.bias", (inter,))])
            if mlp_bias
            else None
        )
        return LayerWeights(
            input_norm=take("input_layernorm.weight", (hidden,)),
            qkv=qkv_w,
            qkv_bias=qkv_b,
            q_norm=take("self_attn.q_norm.weight", (head_dim,)) if has_qk_norm else None,
            k_norm=take("self_attn.k_norm.weight", (head_dim,)) if has_qk_norm else None,
            o_proj=cols("self_attn.o_proj.weight", (hidden, q_out)),
            o_bias=after_reduce("self_attn.o_proj.bias", (hidden,)) if o_bias else None,
            post_norm=take("post_attention_layernorm.weight", (hidden,)),
            gate_up=gate_up,
            gate_up_bias=gate_up_b,
            down=cols("mlp.down_proj.weight", (hidden, inter)),
            down_bias=after_reduce("mlp.down_proj.bias", (hidden,)) if mlp_bias else None,
        )

    # -- the forward -------------------------------------------------------------------------

    def _layer_attention_qkv(self, w: LayerWeights, x: torch.Tensor):
        s = self.shape
        qkv = ops.linear(x, w.qkv, w.qkv_bias, self.zero_bias)
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q = qkv[:, :q_size].view(-1, s.num_heads, s.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(-1, s.num_kv_heads, s.head_dim)
        v = qkv[:, q_size + kv_size :].view(-1, s.num_kv_heads, s.head_dim)
        if w.q_norm is not None:
            # Qwen3 normalises each head; the strided [T, heads, D] views go in without a copy.
            q = ops.rms_norm(q, w.q_norm, self.eps)
            k = ops.rms_norm(k, w.k_norm, self.eps)
        return q, k, v

    def _reduce_norm(self, partial: torch.Tensor, residual: torch.Tensor | None, weight):
        """`s = residual + partial` summed over the ranks (no residual: the sum alone);
        returns `(rms_norm(s), s)`. One process: no sum. Tensor parallelism: one fused kernel
        where the group has one for `partial` (`TPComm.reduce_rms_norm`), else an all-reduce
        in place, then the norm."""
        comm = self.comm
        if comm is not None:
            fused = comm.reduce_rms_norm(partial, residual, weight, self.eps)
            if fused is not None:
                return fused
            partial = comm.all_reduce(partial)
        if residual is None:
            return ops.rms_norm(partial, weight, self.eps), partial
        return ops.add_rms_norm(partial, residual, weight, self.eps)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows; under tensor parallelism this rank's part of them (the caller
        sums the ranks' parts)."""
        if self.comm is None:
            return F.embedding(input_ids, self.embed)
        # Vocabulary-parallel: ids outside this rank's rows look up row 0 and are zeroed, so
        # the all-reduce sums exactly one real row per token (x + 0 is exact in any dtype).
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.embed.shape[0])
        h = F.embedding(local.clamp(0, self.embed.shape[0] - 1), self.embed)
        return h.masked_fill_(outside[:, None], 0)

    def _lm_head(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[T, logits_width]` (every rank's slice side by side) into `out` or a new
        tensor; the columns past `vocab_size` are padding."""
        if self.comm is None:
            return ops.linear(x, self.lm_head, None, self.zero_bias, out)
        if out is None:
            out = torch.empty(x.shape[0], self.logits_width, dtype=x.dtype, device=x.device)
        if x.shape[0]:  # every rank sees the same row count, so all skip an empty gather
            self.comm.gather_logits(ops.linear(x, self.lm_head, None, self.zero_bias), out)
        return out

    @torch.inference_mode()
    def warm_gemms(self, rows: int, logits_rows: int) -> None:
        """Run each projection's GEMM once at `rows` rows on zeros (the LM head's at
        `min(rows, logits_rows)`, the most a step's logits hold), routed as the forward routes
        them (`ops.linear`), outside any graph capture; no collectives, so a rank may run it
        alone.

        Why: cuBLAS's first call at a new row count costs 7-10 ms of host time on the H200
        while a step runs (docs/benchmarks.md 8n), inside a torch op, so with the GIL held.
        Made first inside a capture on the capture thread (a lazy server records the graphs of
        sizes and buckets no warm-up ran while serving), it held every other thread that
        long: the engine thread, between reading a step and handing its tokens over, and so a
        running stream's next token came one step late, 4 times per bucket. A later call at
        that row count is fast, in any thread. Every layer has the same shapes, so layer 0's
        weights stand for all of them."""
        if self.device.type != "cuda" or rows <= 0:
            return
        w = self.layers[0]
        for weight, bias in ((w.qkv, w.qkv_bias), (w.o_proj, w.o_bias),
                             (w.gate_up, w.gate_up_bias), (w.down, w.down_bias)):
            x = torch.zeros(rows, weight.shape[1], dtype=self.dtype, device=self.device)
            ops.linear(x, weight, bias, self.zero_bias)
        n = min(rows, logits_rows)
        if n > 0:
            x = torch.zeros(n, self.lm_head.shape[1], dtype=self.dtype, device=self.device)
            # One process writes the logits into the step's buffer (`out`), as `_lm_head` does.
            out = (torch.empty(n, self.lm_head.shape[0], dtype=self.dtype, device=self.device)
                   if self.comm is None else None)
            ops.linear(x, self.lm_head, None, self.zero_bias, out)

    def _forward(self, input_ids, positions, rows, kv_cache, block_tables, attend):
        """Run all layers; `attend(k_cache, v_cache, q_rot)` computes attention for the rows."""
        cos = self.cos[positions]
        sin = self.sin[positions]
        if self.comm is not None:
            self.comm.start_forward()
        x, residual = self._reduce_norm(self._embed(input_ids), None, self.layers[0].input_norm)
        n_layers = len(self.layers)
        for i, w in enumerate(self.layers):
            q, k, v = self._layer_attention_qkv(w, x)
            k_cache, v_cache = kv_cache[i]
            q = ops.rope_write_kv(
                q, k, v, cos, sin, k_cache, v_cache, block_tables, rows, positions
            )
            attn = attend(k_cache, v_cache, q).reshape(q.shape[0], -1)
            attn = ops.linear(attn, w.o_proj, w.o_bias, self.zero_bias)
            x, residual = self._reduce_norm(attn, residual, w.post_norm)
            mlp = ops.silu_and_mul(ops.linear(x, w.gate_up, w.gate_up_bias, self.zero_bias))
            mlp = ops.linear(mlp, w.down, w.down_bias, self.zero_bias)
            next_norm = self.layers[i + 1].input_norm if i + 1 < n_layers else self.final_norm
            x, residual = self._reduce_norm(mlp, residual, next_norm)
        return x  # final-normed hidden states

    @torch.inference_mode()
    def decode(self, input_ids, positions, rows, kv_cache, block_tables, logits_out) -> None:
        """One token per row: token `input_ids[r]` at `positions[r]` of the sequence in
        block-table row `rows[r]`.

        Writes logits `[N, logits_width]` into `logits_out` (a caller-owned buffer, so a
        captured graph leaves no per-size output in the graph pool; columns past `vocab_size`
        are padding). Capturable: shapes only, no host sync; under tensor parallelism the
        collectives are captured too.
        """
        seq_lens = positions + 1

        def attend(k_cache, v_cache, q):
            return ops.decode_attention(
                q, k_cache, v_cache, block_tables, rows, seq_lens, self.scale
            )

        x = self._forward(input_ids, positions, rows, kv_cache, block_tables, attend)
        self._lm_head(x, logits_out)

    @torch.inference_mode()
    def forward_packed(self, input_ids, positions, rows, seq_rows, cu_seqlens_q, k_lens,
                       logit_rows, kv_cache, block_tables, logits_out) -> None:
        """A mixed step as one packed batch, capturable (`server.mixed_graph_runner`).

        Every sequence is a chunk, a decode row a chunk of one token: sequence s owns tokens
        `cu_seqlens_q[s]:cu_seqlens_q[s+1]`, the last of its `k_lens[s]` tokens. Sequences
        with an empty chunk and tokens past the last chunk are padding: their KV goes wherever
        `rows`/`positions` say (the scratch row) and their outputs are never read. Writes the
        logits of tokens `logit_rows` into `logits_out` `[len(logit_rows), logits_width]`.
        One attention launch per layer whose grid depends on shapes only; no host sync.
        """
        width = input_ids.shape[0]
        attn_out = None

        def attend(k_cache, v_cache, q):
            nonlocal attn_out
            if attn_out is None:  # one buffer for every layer, as in `forward`
                attn_out = torch.empty_like(q)
            return ops.prefill_attention(
                q, k_cache, v_cache, block_tables, seq_rows, cu_seqlens_q, k_lens, width,
                self.scale, out=attn_out,
            )

        x = self._forward(input_ids, positions, rows, kv_cache, block_tables, attend)
        self._lm_head(x.index_select(0, logit_rows), logits_out)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv_cache, block_tables) -> torch.Tensor:
        """A mixed step: decode rows first, then packed prompt chunks (eager).

        Returns logits `[len(batch.logit_rows), vocab]` for the tokens `batch.logit_rows`
        names (decode rows, and the last token of each chunk that completes its prompt).
        """
        nd = batch.num_decode
        seq_lens = batch.positions[:nd] + 1  # once per step, not per layer
        # One output buffer for every layer: the decode and prefill kernels each write their
        # rows into it (no per-layer concatenation and allocation: mixed steps are launch-bound).
        attn_out = None

        def attend(k_cache, v_cache, q):
            nonlocal attn_out
            if attn_out is None:
                attn_out = torch.empty_like(q)
            if nd:
                ops.decode_attention(
                    q[:nd], k_cache, v_cache, block_tables, batch.rows[:nd], seq_lens,
                    self.scale, out=attn_out[:nd],
                )
            if batch.seq_rows is not None:
                ops.prefill_attention(
                    q[nd:], k_cache, v_cache, block_tables, batch.seq_rows,
                    batch.cu_seqlens_q, batch.k_lens, batch.max_q_len, self.scale,
                    out=attn_out[nd:],
                )
            return attn_out

        x = self._forward(
            batch.input_ids, batch.positions, batch.rows, kv_cache, block_tables, attend
        )
        return self._lm_head(x[batch.logit_rows])[:, : self.shape.vocab_size]
