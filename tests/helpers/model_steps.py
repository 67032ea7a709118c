"""Run a `DecoderModel` directly on a paged cache, for tests that check logits, not serving."""

from __future__ import annotations

import torch

from server.kv_cache import allocate_kv_cache
from server.model import StepBatch


def prompt_logits(model, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits `[1, vocab]` at the last token of `ids`, prefilled as one chunk into a fresh
    paged cache (block 0 is the scratch block, the sequence gets blocks 1, 2, ...)."""
    n = len(ids)
    device = model.device
    kv = allocate_kv_cache(model.shape, 1 + -(-n // block_size), block_size, model.dtype, device)
    table = torch.arange(1, kv[0][0].shape[0], dtype=torch.int32, device=device)[None]
    batch = StepBatch(
        input_ids=torch.tensor(ids, device=device),
        positions=torch.arange(n, device=device),
        rows=torch.zeros(n, dtype=torch.long, device=device),
        logit_rows=torch.tensor([n - 1], device=device),
        num_decode=0,
        seq_rows=torch.tensor([0], device=device),
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=device),
        k_lens=torch.tensor([n], dtype=torch.int32, device=device),
        max_q_len=n,
    )
    return model.forward(batch, kv, table)
