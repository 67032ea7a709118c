"""What happens to the logits between the forward and the draw, batched over the step's rows.

Runs on the engine thread after the mixed forward or the decode graph's replay, on the logits
the graph wrote; nothing here is captured in a graph, nothing syncs with the host, and no op
loops over the vocabulary in Python. A step whose rows ask for none of it goes straight to
`server.sampling.sample` (`needs_processing`): plain batches pay nothing.

Order (the docs' "logprobs semantics" section states the same):
1. penalties, from per-row token counts kept on the device (`PenaltyState`):
   repetition_penalty as HF defines it (a token seen in prompt or output: logit / p if the
   logit is positive, logit * p otherwise), then OpenAI's frequency/presence penalties
   (`logit -= frequency * count + presence * (count > 0)`, output tokens only);
2. logit_bias (added);
3. log-probabilities (`log_softmax` of the logits so far: after penalties and bias, before
   min_tokens, the grammar mask and temperature), the sampled token's and the top k;
4. min_tokens: EOS and stop_token_ids set to -inf while a row has fewer tokens than that;
5. the grammar bitmask (-inf where the bit is 0);
6. temperature, top-k, top-p and the Gumbel-max draw (`server.sampling.sample`).

Token counts stay on the device so the one-step-ahead loop keeps working: a row's count of the
token it just sampled is incremented by the step that sampled it, on the stream, before the next
step (launched without waiting for the host) reads it. A row is (re)initialised from the host's
view of its sequence only when a penalised sequence takes it, which happens with nothing in
flight for that sequence.

Engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.request import SamplingParams
from server.sampling import SamplingBatch, sample, to_device

# Floor of reported log-probabilities: a token the bias or penalties pushed to -inf would
# otherwise make the JSON answer unencodable (OpenAI reports such tokens as -9999.0).
LOGPROB_FLOOR = -9999.0


class PenaltyState:
    """Per-row output-token counts and prompt-token presence, on the device.

    Allocated on the first penalised sequence (`[rows, vocab]` int32 + bool: 33 MB + 8 MB at
    64 rows of a 128k vocabulary), never for servers whose traffic uses no penalties.
    """

    def __init__(self, num_rows: int, vocab: int, device: torch.device):
        self.num_rows, self.vocab, self.device = num_rows, vocab, device
        self.counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None

    def _ensure(self) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self.num_rows, self.vocab, dtype=torch.int32,
                                      device=self.device)
            self.prompt_mask = torch.zeros(self.num_rows, self.vocab, dtype=torch.bool,
                                           device=self.device)

    def init_row(self, row: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """A penalised sequence takes `row`: its counts become those of `output_ids`."""
        self._ensure()
        self.counts[row].zero_()
        self.prompt_mask[row].zero_()
        ids = to_device(prompt_ids, torch.int64, self.device)
        self.prompt_mask[row].index_fill_(0, ids, True)
        if output_ids:
            out = to_device(output_ids, torch.int64, self.device)
            self.counts[row].index_put_((out,), torch.ones_like(out, dtype=torch.int32),
                                        accumulate=True)

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's sampled token (rows distinct)."""
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32),
                               accumulate=True)


@dataclass
class SampleResult:
    """Device tensors of one step's draw: tokens, and when asked the logprobs."""

    tokens: torch.Tensor  # int64 [n]
    logprobs: torch.Tensor | None = None  # float32 [n]: each row's sampled token
    top_ids: torch.Tensor | None = None  # int64 [n, k]
    top_logprobs: torch.Tensor | None = None  # float32 [n, k]


def needs_processing(params: list[SamplingParams], masks) -> bool:
    return masks is not None or any(p.processed for p in params)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """-inf where `mask` (int32 `[n, ceil(V/32)]`, bit t%32 of word t//32) has a 0 bit."""
    n, vocab = logits.shape
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:  # built once per device: no allocation or launch per step
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32,
                                                       device=logits.device)
    allowed = ((mask.unsqueeze(-1) >> shifts) & 1).view(n, -1)[:, :vocab].bool()
    logits.masked_fill_(~allowed, float("-inf"))


def process_and_sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    rows: list[int],
    keys: list[int],
    steps: list[int],
    penalties: PenaltyState,
    eos_ids: frozenset[int],
    masks: np.ndarray | None = None,
) -> SampleResult:
    """Steps 1-6 of the module docstring for `logits` `[n, vocab]` (row i: a sequence with
    `params[i]`, in block-table row `rows[i]`, noise key `keys[i]`, `steps[i]` tokens sampled
    before this one). `masks`: the grammar bitmasks (all bits set for unconstrained rows)."""
    batch = SamplingBatch(
        temperatures=[p.temperature for p in params],
        top_ps=[p.top_p for p in params],
        top_ks=[p.top_k for p in params],
        keys=keys,
        steps=steps,
    )
    if not needs_processing(params, masks):
        return SampleResult(sample(logits, batch))
    dev = logits.device
    x = logits.float()
    if x is logits or x.data_ptr() == logits.data_ptr():
        x = x.clone()  # fp32 models: never edit the caller's (or a graph's) logits in place
    _penalize(x, params, rows, penalties)
    _bias(x, params)
    lp = None
    k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
    if k is not None:
        lp = torch.log_softmax(x, dim=-1)
    _suppress_stops(x, params, steps, eos_ids)
    if masks is not None:
        apply_bitmask(x, torch.from_numpy(masks).to(dev, non_blocking=False)
                      if dev.type != "cuda" else
                      torch.from_numpy(masks).pin_memory().to(dev, non_blocking=True))
    tokens = sample(x, batch)
    pen = [i for i, p in enumerate(params) if p.penalized]
    if pen:
        idx = to_device([pen, [rows[i] for i in pen]], torch.int64, dev)
        penalties.record(idx[1], tokens.index_select(0, idx[0]))
    result = SampleResult(tokens)
    if lp is not None:
        result.logprobs = lp.gather(1, tokens[:, None])[:, 0].clamp(min=LOGPROB_FLOOR)
        if k:
            top_lp, top_ids = lp.topk(k, dim=-1)
            result.top_ids, result.top_logprobs = top_ids, top_lp.clamp(min=LOGPROB_FLOOR)
    return result


def _penalize(x: torch.Tensor, params: list[SamplingParams], rows: list[int],
              penalties: PenaltyState) -> None:
    pen = [i for i, p in enumerate(params) if p.penalized]
    if not pen:
        return
    dev = x.device
    idx = to_device([pen, [rows[i] for i in pen]], torch.int64, dev)
    vals = to_device(
        [[params[i].repetition_penalty for i in pen],
         [params[i].frequency_penalty for i in pen],
         [params[i].presence_penalty for i in pen]],
        torch.float32, dev,
    )
    counts = penalties.counts.index_select(0, idx[1]).float()
    sub = x.index_select(0, idx[0])
    if any(params[i].repetition_penalty != 1.0 for i in pen):
        rep = vals[0][:, None]
        seen = penalties.prompt_mask.index_select(0, idx[1]) | (counts > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - vals[1][:, None] * counts - vals[2][:, None] * (counts > 0).float()
    x.index_copy_(0, idx[0], sub)


def _bias(x: torch.Tensor, params: list[SamplingParams]) -> None:
    r, t, v = [], [], []
    vocab = x.shape[1]
    for i, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            if token < vocab:
                r.append(i)
                t.append(token)
                v.append(bias)
    if not r:
        return
    idx = to_device([r, t], torch.int64, x.device)
    x.index_put_((idx[0], idx[1]), to_device(v, torch.float32, x.device), accumulate=True)


def _suppress_stops(x: torch.Tensor, params: list[SamplingParams], steps: list[int],
                    eos_ids: frozenset[int]) -> None:
    r, t = [], []
    vocab = x.shape[1]
    for i, p in enumerate(params):
        if steps[i] < p.min_tokens:
            for token in sorted(eos_ids | set(p.stop_token_ids)):
                if token < vocab:
                    r.append(i)
                    t.append(token)
    if r:
        idx = to_device([r, t], torch.int64, x.device)
        x[idx[0], idx[1]] = float("-inf")


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int):
    """Log-probabilities of `targets[i]` under row i of `logits` (raw: no penalties), and
    the top k of each row: (target [m], top_ids [m, k] | None, top [m, k] | None)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    tgt = to_device(targets, torch.int64, logits.device)
    chosen = lp.gather(1, tgt[:, None])[:, 0].clamp(min=LOGPROB_FLOOR)
    if not k:
        return chosen, None, None
    top_lp, top_ids = lp.topk(k, dim=-1)
    return chosen, top_ids, top_lp.clamp(min=LOGPROB_FLOOR)
