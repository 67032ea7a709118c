"""Paged KV cache bookkeeping: a pool of fixed-size blocks, block tables and prefix caching.

KV memory is `num_blocks` blocks of `block_size` tokens. A sequence's *block table* is a plain
`list[int]` owned by the caller's sequence object: entry `i` is the block holding its tokens
`[i * block_size, (i + 1) * block_size)`. The manager never holds a sequence; it sees block
tables and token ids only. Torch-free: the tensors live in `server.kv_cache`.

Block 0 is the scratch block: padding rows of a batch and graph warm-up runs write there, so it
is never handed out. Every other block is in exactly one state:

* used: ref count > 0, held by that many block tables;
* free-cached: ref count 0, holding the KV of a full block that the prefix cache can still find;
  reclaimed least recently freed first when memory runs out;
* free-empty: ref count 0, no content worth keeping.

Prefix caching: once the KV of a *full* block is computed, `commit_full_blocks` registers it
under a chained hash `hash_block(parent_hash, tokens)`, so the hash stands for the whole prefix
up to the block's end. `allocate_prompt` walks a new prompt block by block and reuses
registered blocks while they match. A hash is not trusted alone: every match also compares the
block's own token ids and position, so colliding blocks with different tokens are never
confused. That check cannot see earlier tokens (a block stores only its own), so two prefixes
that differ before a block and collide there would pass it; hence SHA-256 rather than Python's
`hash()`, whose int and tuple hashes are unsalted and not collision resistant: a prompt crafted
to collide with another tenant's prefix could be served that tenant's KV (vLLM moved to SHA-256
for this). Cost: about 1 us per block of 16 tokens, 5-6 ms for a 100k-token prompt (`hash()`:
~3 ms), paid once per block committed and once per block matched.

Free counts include free-cached blocks: they are memory that can be taken at once.

Preemption by recompute: `free` the victim's table; its committed blocks stay cached, so
re-admitting it with `allocate_prompt(prompt + output so far, len - 1)` finds whatever was not
evicted meanwhile.

Thread ownership: engine thread only. All per-step operations cost O(blocks they touch), never
O(pool); `check_invariants` scans the pool and is for tests.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from dataclasses import dataclass

NULL_BLOCK = 0  # the scratch block: never allocated, padding rows point here
_ROOT_HASH = b""  # parent hash of a sequence's first block


def hash_block(parent_hash: bytes, tokens: bytes) -> bytes:
    """Key of a full block: SHA-256 of its parent's key and its token ids (packed int64), so
    it identifies the whole prefix up to the block's end. Module-level so tests can substitute
    a colliding one."""
    return hashlib.sha256(parent_hash + tokens).digest()


@dataclass(frozen=True)
class Allocation:
    """The result of `allocate_prompt`: the new block table and how much of it is cached."""

    block_table: list[int]
    num_cached_tokens: int  # a multiple of block_size: KV already present, skip computing it


class BlockManager:
    """Reference-counted KV blocks with an LRU prefix cache. See the module docstring."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("num_blocks must be at least 2 (block 0 is reserved)")
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        # Set by commit (full blocks only) and kept while the block is used or free-cached.
        # A used block may carry a hash without being registered: a duplicate of a block that
        # was registered first. It keeps the hash so its successors can chain from it.
        self._hash: list[bytes | None] = [None] * num_blocks
        self._tokens: list[bytes | None] = [None] * num_blocks  # token ids, packed int64
        # Index of the block in the table that committed it. Checked on a match too, so even
        # colliding hashes cannot put one block at two positions of a table.
        self._pos = [0] * num_blocks
        self._by_hash: dict[bytes, int] = {}  # registered blocks: hash -> block id
        self._pack = struct.Struct(f"<{block_size}q").pack
        # Popped from the end: block 1 is handed out first (deterministic tables in tests).
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._num_used = 0
        self.prefix_query_tokens = 0  # prompt tokens looked up (successful allocations)
        self.prefix_hit_tokens = 0  # of those, tokens served from the cache
        self.evictions = 0  # free-cached blocks reclaimed for new content

    # -- stats (plain ints; safe to copy out for metrics) -----------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free-empty plus free-cached."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self._num_used

    @property
    def num_cached_blocks(self) -> int:
        """Free-cached blocks: unreferenced, still findable, evictable."""
        return len(self._evictable)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def counters(self) -> dict:
        return {
            "kv_blocks_total": self.num_usable_blocks,
            "kv_blocks_used": self._num_used,
            "kv_blocks_free": self.num_free_blocks,
            "kv_blocks_cached": len(self._evictable),
            "prefix_query_tokens": self.prefix_query_tokens,
            "prefix_hit_tokens": self.prefix_hit_tokens,
            "prefix_evictions": self.evictions,
        }

    # -- allocation -------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _match(self, token_ids: list[int], max_cached_tokens: int) -> list[int]:
        """Registered blocks holding the longest cached prefix of `token_ids` (at most
        `max_cached_tokens` tokens). Costs O(matched blocks + 1): it stops at the first miss."""
        if not self.enable_prefix_caching:
            return []
        bs, pack = self.block_size, self._pack
        parent = _ROOT_HASH
        matched: list[int] = []
        for i in range(min(max_cached_tokens, len(token_ids)) // bs):
            tokens = pack(*token_ids[i * bs : (i + 1) * bs])
            parent = hash_block(parent, tokens)
            block = self._by_hash.get(parent)
            if block is None or self._pos[block] != i or self._tokens[block] != tokens:
                break
            matched.append(block)
        return matched

    def _cost(self, total: int, matched: list[int]) -> int:
        """Free blocks an allocation of `total` blocks with hits `matched` consumes: one per
        miss, plus each hit on a free-cached block (it leaves the free pool too)."""
        ref = self._ref
        return total - len(matched) + sum(1 for b in matched if ref[b] == 0)

    def _cannot_fit(self, token_ids: list[int], max_cached_tokens: int) -> bool:
        """Without hashing: true if even the best case (every cacheable block a hit on a used
        block) would not fit. Keeps a big prompt waiting for memory cheap to re-check."""
        total = self.blocks_for(len(token_ids))
        best = 0
        if self.enable_prefix_caching:
            cacheable = max(0, min(max_cached_tokens, len(token_ids))) // self.block_size
            best = min(cacheable, self._num_used)
        return total - best > self.num_free_blocks

    def blocks_needed(self, token_ids: list[int], max_cached_tokens: int) -> int:
        """Free blocks `allocate_prompt` would consume now (no state change)."""
        total = self.blocks_for(len(token_ids))
        return self._cost(total, self._match(token_ids, max_cached_tokens))

    def can_allocate(self, token_ids: list[int], max_cached_tokens: int) -> bool:
        """Whether `allocate_prompt(token_ids, max_cached_tokens)` would succeed now. (That
        call refuses without side effects itself: use this only to decide without allocating.)"""
        if self.blocks_for(len(token_ids)) <= self.num_free_blocks:
            return True  # hits never cost more than misses: no lookup needed
        if self._cannot_fit(token_ids, max_cached_tokens):
            return False
        return self.blocks_needed(token_ids, max_cached_tokens) <= self.num_free_blocks

    def allocate_prompt(self, token_ids: list[int], max_cached_tokens: int) -> Allocation | None:
        """Blocks for all of `token_ids`, reusing cached blocks of an identical prefix of at
        most `max_cached_tokens` tokens (pass `len(token_ids) - 1`: the last token's logits
        must be computed). None, with nothing changed, if there are not enough free blocks."""
        if self._cannot_fit(token_ids, max_cached_tokens):
            return None
        total = self.blocks_for(len(token_ids))
        matched = self._match(token_ids, max_cached_tokens)
        if self._cost(total, matched) > self.num_free_blocks:
            return None
        # Revive hits before taking new blocks, so no eviction can reclaim a block just matched.
        for block in matched:
            if self._ref[block] == 0:
                del self._evictable[block]
                self._num_used += 1
            self._ref[block] += 1
        table = matched + [self._take() for _ in range(total - len(matched))]
        num_cached = len(matched) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_query_tokens += len(token_ids)
            self.prefix_hit_tokens += num_cached
        return Allocation(table, num_cached)

    def append_slot(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` in place to hold `num_tokens` tokens (usually one more block
        when a decode token crosses a block boundary, else nothing). False, with nothing
        changed, if the free blocks do not suffice: the caller preempts someone and retries."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        block_table.extend(self._take() for _ in range(need))
        return True

    def _take(self) -> int:
        """One block for new content: a free-empty one if any (keeps the cache), else the
        least recently freed cached one. The caller has checked that one exists."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash[block]]
            self._hash[block] = None
            self._tokens[block] = None
            self.evictions += 1
        self._ref[block] = 1
        self._num_used += 1
        return block

    # -- prefix cache -----------------------------------------------------------------------

    def commit_full_blocks(
        self, block_table: list[int], token_ids: list[int], num_computed_tokens: int
    ) -> None:
        """Register the blocks that the first `num_computed_tokens` tokens fill completely.

        Call once their KV is written (or its write is queued ahead of every reader on the
        same stream). `token_ids` are the sequence's tokens (prompt then output; pass one list
        kept up to date, not a concatenation per step). Cheap when nothing new is full: it
        walks back from the newest full block only to the last block already committed.
        """
        if not self.enable_prefix_caching:
            return
        bs, pack = self.block_size, self._pack
        num_full = min(num_computed_tokens // bs, len(block_table))
        start = num_full
        while start > 0 and self._hash[block_table[start - 1]] is None:
            start -= 1
        parent = self._hash[block_table[start - 1]] if start else _ROOT_HASH
        for i in range(start, num_full):
            block = block_table[i]
            tokens = pack(*token_ids[i * bs : (i + 1) * bs])
            parent = hash_block(parent, tokens)
            self._hash[block] = parent
            self._tokens[block] = tokens
            self._pos[block] = i
            # First one wins. A duplicate (two sequences computed the same prefix at once, or a
            # hash collision) stays unregistered; `free` registers it if the slot is vacant.
            self._by_hash.setdefault(parent, block)

    def free(self, block_table: list[int]) -> None:
        """Release a table's blocks and empty the table (so freeing twice is harmless).

        Released in reverse: a sequence's tail enters the LRU first and is evicted before its
        head, which other prompts are likelier to share (and which the tail's reuse needs)."""
        for block in reversed(block_table):
            self._ref[block] -= 1
            if self._ref[block]:
                continue
            self._num_used -= 1
            h = self._hash[block]
            if h is not None and self._by_hash.setdefault(h, block) == block:
                self._evictable[block] = None  # most recently freed at the end
            else:
                self._hash[block] = None
                self._tokens[block] = None
                self._free.append(block)
        block_table.clear()

    def fork(
        self, block_table: list[int], num_tokens: int
    ) -> tuple[list[int], list[tuple[int, int]]] | None:
        """A table for a copy of a sequence whose first `num_tokens` tokens have KV.

        Full blocks are shared (ref + 1): their KV never changes again. A partial last block
        would be written by both, so the copy gets a fresh block and `copies` lists
        (src, dst) pairs whose KV the caller copies on the device before either writes.
        Blocks of `block_table` past `num_tokens` are not carried over. None if no free
        block is left for the partial one."""
        num_full = num_tokens // self.block_size
        num_blocks = self.blocks_for(num_tokens)
        if num_blocks > len(block_table):
            raise ValueError("block table too short for num_tokens")
        partial = num_blocks - num_full
        if partial > self.num_free_blocks:
            return None
        table = block_table[:num_full]
        for block in table:
            self._ref[block] += 1
        copies = []
        if partial:
            dst = self._take()
            copies.append((block_table[num_full], dst))
            table.append(dst)
        return table, copies

    def reset_prefix_cache(self) -> int:
        """Forget every free-cached block (they become free-empty); blocks in use keep their
        registration. Returns how many were dropped."""
        dropped = len(self._evictable)
        for block in self._evictable:
            del self._by_hash[self._hash[block]]
            self._hash[block] = None
            self._tokens[block] = None
            self._free.append(block)
        self._evictable.clear()
        return dropped

    # -- tests ------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the pool's invariants (O(pool): tests only)."""
        assert self._ref[NULL_BLOCK] == 0 and self._hash[NULL_BLOCK] is None
        free = set(self._free)
        assert len(free) == len(self._free), "free-empty list holds a block twice"
        assert NULL_BLOCK not in free and NULL_BLOCK not in self._evictable
        used = 0
        for block in range(1, self.num_blocks):
            ref, h, tokens = self._ref[block], self._hash[block], self._tokens[block]
            assert ref >= 0
            assert (h is None) == (tokens is None), block
            assert tokens is None or len(tokens) == 8 * self.block_size
            states = (ref > 0) + (block in self._evictable) + (block in free)
            assert states == 1, f"block {block}: ref {ref}, in {states} states"
            used += ref > 0
            if block in self._evictable:
                assert h is not None and self._by_hash.get(h) == block
            if block in free:
                assert h is None
        assert used == self._num_used
        for h, block in self._by_hash.items():
            assert block != NULL_BLOCK and self._hash[block] == h
        if not self.enable_prefix_caching:
            assert not self._by_hash and not self._evictable
