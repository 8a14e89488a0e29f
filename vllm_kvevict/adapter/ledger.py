"""Scheduler-side block accounting: evict, park, restore, release — on vLLM's own lists.

The scheduler keeps each request's block list *positional* (index i holds tokens
[i*bs, (i+1)*bs)). Releasing a block replaces it by the null block and returns it to the
pool with ``BlockPool.free_blocks`` — the pattern vLLM's sliding-window managers use — so
vLLM's allocation arithmetic and ``free()`` keep working unchanged. Parking keeps the block
(memory held, restorable) but excludes it from the worker's compacted view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestBlocks:
    """What the ledger knows of one request: parked positions and how many were released."""

    parked: set[int] = field(default_factory=set)
    released: set[int] = field(default_factory=set)
    #: ``released`` as a bool mask by position (grown on demand): resident positions in O(1)
    #: array operations instead of a scan of the block list
    released_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: tokens computed when the first block left attention: K/V of later tokens were computed
    #: without the excluded context, so blocks past this point must never become cache hits.
    poison_from_token: int | None = None
    changed: bool = False  # the worker's compacted row must be resent


class EvictionLog(Sequence):
    """One request's excluded block positions over time: entry i is ``(from_token,
    frozenset of positions)``, the set the request attends without from that token on (what
    tests rebuild reference masks from). Stored as packed bit masks (a bit per block, an
    entry only when the set changed): logging a decision costs a mask copy, not a set of
    every evicted position, and a long generation's log stays small."""

    def __init__(self):
        self._entries: list[tuple[int, bytes]] = []

    def record(self, from_token: int, excluded: np.ndarray) -> None:
        """Log ``excluded`` (``[nb]`` bool by position) from ``from_token`` on, if it changed."""
        packed = np.packbits(excluded).tobytes().rstrip(b"\0")
        if not self._entries or self._entries[-1][1] != packed:
            self._entries.append((from_token, packed))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        from_token, packed = self._entries[i]
        bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))
        return from_token, frozenset(np.flatnonzero(bits).tolist())


class BlockLedger:
    """Eviction bookkeeping over one ``SingleTypeKVCacheManager`` (one KV-cache group)."""

    def __init__(self, manager, bin_capacity: int = 0):
        self.manager = manager
        self.block_pool = manager.block_pool
        self.null_block = manager.block_pool.null_block
        self.block_size = manager.block_size
        self.bin_capacity = bin_capacity  # parked blocks held across all requests, at most
        self.requests: dict[str, RequestBlocks] = {}
        self._parked_total = 0  # sum of len(rb.parked) over requests, kept up to date

    # -- queries -----------------------------------------------------------------------------
    def blocks(self, req_id: str) -> list:
        return self.manager.req_to_blocks.get(req_id, [])

    def state(self, req_id: str) -> RequestBlocks:
        return self.requests.setdefault(req_id, RequestBlocks())

    def num_parked_total(self) -> int:
        return self._parked_total

    def excluded_positions(self, req_id: str) -> set[int]:
        rb = self.requests.get(req_id)
        return set() if rb is None else rb.parked | rb.released

    def excluded_mask(self, req_id: str) -> np.ndarray:
        """``[n]`` bool by position: parked or released (n = the list's length)."""
        mask = np.zeros(len(self.blocks(req_id)), dtype=bool)
        rb = self.requests.get(req_id)
        if rb is not None:
            m = min(len(mask), len(rb.released_mask))
            mask[:m] = rb.released_mask[:m]
            if rb.parked:
                mask[list(rb.parked)] = True
        return mask

    def offset_tokens(self, req_id: str) -> int:
        """E: tokens before the write position that the worker does not attend to."""
        rb = self.requests.get(req_id)
        return 0 if rb is None else (len(rb.parked) + len(rb.released)) * self.block_size

    def resident_positions(self, req_id: str) -> list[int]:
        """Positions whose block is in memory (kept or parked), in order."""
        return self.resident_array(req_id).tolist()

    def resident_array(self, req_id: str) -> np.ndarray:
        """:meth:`resident_positions` as an int64 array. In a full-attention group the only
        null blocks are those this ledger released (vLLM nulls blocks only in sliding-window
        and mamba groups), so they are read from the released mask, not from the list."""
        n = len(self.blocks(req_id))
        rb = self.requests.get(req_id)
        if rb is None or not rb.released:
            return np.arange(n, dtype=np.int64)
        mask = rb.released_mask[:n]
        if len(mask) < n:
            mask = np.concatenate([mask, np.zeros(n - len(mask), dtype=bool)])
        return np.flatnonzero(~mask)

    def compacted_row(self, req_id: str) -> tuple[list[int], list[int]]:
        """(block ids, positions) of the blocks the worker attends to, in positional order."""
        rb = self.requests.get(req_id)
        parked = rb.parked if rb else set()
        ids, pos = [], []
        for i, b in enumerate(self.blocks(req_id)):
            if b is not self.null_block and i not in parked:
                ids.append(b.block_id)
                pos.append(i)
        return ids, pos

    def parked_blocks(self, req_id: str) -> list[tuple[int, int]]:
        """(position, block id) of parked blocks, in positional order."""
        rb = self.requests.get(req_id)
        blocks = self.blocks(req_id)
        return [(i, blocks[i].block_id) for i in sorted(rb.parked)] if rb else []

    # -- transitions ---------------------------------------------------------------------------
    def _check_evictable(self, req_id: str, pos: int, committed_tokens: int) -> None:
        blocks = self.blocks(req_id)
        if not 0 <= pos < len(blocks):
            raise IndexError(f"{req_id}: block {pos} out of range ({len(blocks)} blocks)")
        if (pos + 1) * self.block_size > committed_tokens:
            raise ValueError(
                f"{req_id}: block {pos} is not a full committed block "
                f"({committed_tokens} committed tokens, block size {self.block_size})"
            )

    def _mark_excluded(self, rb: RequestBlocks, committed_tokens: int) -> None:
        rb.changed = True
        if rb.poison_from_token is None:
            rb.poison_from_token = committed_tokens

    def release(self, req_id: str, positions, committed_tokens: int) -> list[int]:
        """Free blocks to the pool (kept or parked); returns the positions this request let go
        (already released ones are skipped)."""
        rb = self.state(req_id)
        blocks = self.blocks(req_id)
        order = sorted(set(positions), reverse=True)
        if order:  # the extremes bound every position: one check for the whole list
            self._check_evictable(req_id, order[0], committed_tokens)
            self._check_evictable(req_id, order[-1], committed_tokens)
        null = self.null_block
        let_go = [pos for pos in order if blocks[pos] is not null]
        freed = [blocks[pos] for pos in let_go]
        for pos in let_go:
            blocks[pos] = null
        if let_go:
            before = len(rb.parked)
            rb.parked.difference_update(let_go)
            self._parked_total -= before - len(rb.parked)
            rb.released.update(let_go)
            if len(rb.released_mask) <= let_go[0]:  # let_go is descending
                grown = np.zeros(max(let_go[0] + 1, 2 * len(rb.released_mask)), dtype=bool)
                grown[: len(rb.released_mask)] = rb.released_mask
                rb.released_mask = grown
            rb.released_mask[let_go] = True
        if freed:
            # tail-first order, like vLLM's own free(): older blocks stay cached longer
            self.block_pool.free_blocks(freed)
            self._mark_excluded(rb, committed_tokens)
        return let_go

    def park(self, req_id: str, positions, committed_tokens: int) -> int:
        """Exclude blocks from attention but keep their memory (bounded by ``bin_capacity``)."""
        rb = self.state(req_id)
        blocks = self.blocks(req_id)
        room = self.bin_capacity - self.num_parked_total()
        added = 0
        for pos in sorted(set(positions)):
            if pos in rb.parked:
                continue
            self._check_evictable(req_id, pos, committed_tokens)
            if blocks[pos] is self.null_block:
                raise ValueError(f"{req_id}: block {pos} was released and cannot be parked")
            if added >= room:
                raise ValueError(f"recycle bin full ({self.bin_capacity} blocks)")
            rb.parked.add(pos)
            self._parked_total += 1
            added += 1
        if added:
            self._mark_excluded(rb, committed_tokens)
        return added

    def restore(self, req_id: str, positions) -> int:
        """Bring parked blocks back into attention (their K/V never left memory)."""
        rb = self.state(req_id)
        restored = 0
        for pos in set(positions):
            if pos in rb.parked:
                rb.parked.remove(pos)
                self._parked_total -= 1
                restored += 1
        if restored:
            rb.changed = True
        return restored

    def forget(self, req_id: str) -> None:
        """Drop the request's eviction state (call when vLLM frees its blocks: finish,
        abort, preemption). Parked blocks are still in vLLM's list, so ``free()`` returns them."""
        rb = self.requests.pop(req_id, None)
        if rb is not None:
            self._parked_total -= len(rb.parked)

    def take_changed(self, req_id: str) -> bool:
        rb = self.requests.get(req_id)
        if rb is None or not rb.changed:
            return False
        rb.changed = False
        return True

    def cacheable_tokens(self, req_id: str, num_tokens: int) -> int:
        """Prefix-cache poison guard: only blocks computed before the first exclusion."""
        rb = self.requests.get(req_id)
        if rb is None or rb.poison_from_token is None:
            return num_tokens
        clean = (rb.poison_from_token // self.block_size) * self.block_size
        return min(num_tokens, clean)
