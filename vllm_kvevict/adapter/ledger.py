"""Scheduler-side block accounting: evict, park, restore, release — on vLLM's own lists.

The scheduler keeps each request's block list *positional* (index i holds tokens
[i*bs, (i+1)*bs)). Releasing a block replaces it by the null block and returns it to the
pool with ``BlockPool.free_blocks`` — the pattern vLLM's sliding-window managers use — so
vLLM's allocation arithmetic and ``free()`` keep working unchanged. Parking keeps the block
(memory held, restorable) but excludes it from the worker's compacted view.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

_block_id = attrgetter("block_id")


@dataclass
class RequestBlocks:
    """What the ledger knows of one request: parked positions and released ones."""

    parked: set[int] = field(default_factory=set)
    #: released positions as a bool mask (capacity grown by doubling, past the list's end all
    #: False): resident positions and a decision's let-go blocks in array operations, no
    #: Python set of every released position
    released_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    num_released: int = 0
    #: block id by position for the first ``num_ids`` positions (capacity grown by doubling):
    #: a compacted row is one array gather, not an attribute read per block. vLLM only
    #: appends to a full-attention group's list after admission (its copy-on-write of a
    #: partial prefix hit replaces the tail block inside the admitting allocation, before any
    #: row is read) and the ledger alone nulls entries, so cached ids stay valid.
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    num_ids: int = 0
    #: the last compacted row ``(list length, block ids, positions)``, dropped when the
    #: ledger changes the request; blocks vLLM appends since are appended to it
    row: tuple[int, list[int], list[int]] | None = None
    version: int = 0  # bumped by every change the ledger makes to this request
    #: tokens computed when the first block left attention: K/V of later tokens were computed
    #: without the excluded context, so blocks past this point must never become cache hits.
    poison_from_token: int | None = None

    @property
    def released(self) -> set[int]:
        """Released positions (reports and tests; the hot path reads ``released_mask``)."""
        return set(np.flatnonzero(self.released_mask).tolist())

    def grow(self, n: int) -> np.ndarray:
        """``released_mask`` with room for ``n`` positions (doubling, so amortised O(1))."""
        if len(self.released_mask) < n:
            grown = np.zeros(max(n, 2 * len(self.released_mask)), dtype=bool)
            grown[: len(self.released_mask)] = self.released_mask
            self.released_mask = grown
        return self.released_mask


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
        #: blocks out of attention (parked + released) per request, only where nonzero: the
        #: step plan reads every scheduled request's offset from it
        self.excluded_blocks: dict[str, int] = {}
        #: requests whose compacted row changed since it last went to the workers
        self.changed: set[str] = set()
        #: verify every compacted row against a scan of vLLM's list (tests; O(blocks) each)
        self.check_rows = os.environ.get("KVEVICT_CHECK_ROWS") == "1"

    # -- queries -----------------------------------------------------------------------------
    def blocks(self, req_id: str) -> list:
        return self.manager.req_to_blocks.get(req_id, [])

    def state(self, req_id: str) -> RequestBlocks:
        rb = self.requests.get(req_id)
        if rb is None:
            rb = self.requests[req_id] = RequestBlocks()
        return rb

    def num_parked_total(self) -> int:
        return self._parked_total

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

    def num_attended(self, req_id: str) -> int:
        """Blocks of the request in attention (neither parked nor released), O(1)."""
        return len(self.blocks(req_id)) - self.excluded_blocks.get(req_id, 0)

    def offset_tokens(self, req_id: str) -> int:
        """E: tokens before the write position that the worker does not attend to."""
        return self.excluded_blocks.get(req_id, 0) * self.block_size

    def resident_positions(self, req_id: str) -> list[int]:
        """Positions whose block is in memory (kept or parked), in order."""
        return self.resident_array(req_id).tolist()

    def resident_array(self, req_id: str) -> np.ndarray:
        """:meth:`resident_positions` as an int64 array. In a full-attention group the only
        null blocks are those this ledger released (vLLM nulls blocks only in sliding-window
        and mamba groups), so they are read from the released mask, not from the list."""
        n = len(self.blocks(req_id))
        rb = self.requests.get(req_id)
        if rb is None or not rb.num_released:
            return np.arange(n, dtype=np.int64)
        return np.flatnonzero(~rb.grow(n)[:n])

    def compacted_row(self, req_id: str) -> tuple[list[int], list[int]]:
        """(block ids, positions) of the blocks the worker attends to, in positional order.
        The lists are shared with the ledger's cache: read them, do not change them."""
        blocks = self.blocks(req_id)
        rb = self.requests.get(req_id)
        if rb is None:
            return list(map(_block_id, blocks)), list(range(len(blocks)))
        n = len(blocks)
        if rb.row is not None and rb.row[0] <= n:
            cached, ids, pos = rb.row
            if cached < n:  # grown since: the new tail blocks are attended
                ids = ids + [b.block_id for b in blocks[cached:]]
                pos = pos + list(range(cached, n))
        else:
            resident = self.resident_array(req_id)
            if rb.parked:
                parked = np.fromiter(rb.parked, np.int64, len(rb.parked))
                resident = resident[~np.isin(resident, parked)]
            ids, pos = self._block_ids(rb, blocks)[resident].tolist(), resident.tolist()
        rb.row = (n, ids, pos)
        if self.check_rows:
            expect = [(i, b.block_id) for i, b in enumerate(blocks)
                      if b is not self.null_block and i not in rb.parked]
            if list(zip(pos, ids)) != expect:
                raise AssertionError(f"{req_id}: cached block ids differ from vLLM's list")
        return ids, pos

    @staticmethod
    def _block_ids(rb: RequestBlocks, blocks: list) -> np.ndarray:
        """``[n]`` block id by position (released positions: stale), new positions read."""
        n = len(blocks)
        if rb.num_ids != n:
            start = rb.num_ids if rb.num_ids < n else 0  # a shorter list: re-read all
            if len(rb.ids) < n:
                grown = np.zeros(max(n, 2 * len(rb.ids)), dtype=np.int64)
                grown[:start] = rb.ids[:start]
                rb.ids = grown
            rb.ids[start:n] = np.fromiter(map(_block_id, blocks[start:n]), np.int64, n - start)
            rb.num_ids = n
        return rb.ids[:n]

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

    def _mark_changed(self, req_id: str, rb: RequestBlocks) -> None:
        self.changed.add(req_id)
        rb.row = None
        rb.version += 1
        excluded = len(rb.parked) + rb.num_released
        if excluded:
            self.excluded_blocks[req_id] = excluded
        else:
            self.excluded_blocks.pop(req_id, None)

    def _mark_excluded(self, req_id: str, rb: RequestBlocks, committed_tokens: int) -> None:
        self._mark_changed(req_id, rb)
        if rb.poison_from_token is None:
            rb.poison_from_token = committed_tokens

    def release(self, req_id: str, positions, committed_tokens: int, ordered: bool = False
                ) -> list[int]:
        """Free blocks to the pool (kept or parked); returns the positions this request let go,
        descending (already released ones are skipped). ``ordered``: ``positions`` is an int64
        array, ascending without repeats, already (a decision's)."""
        pos = positions if ordered else np.unique(np.asarray(positions, dtype=np.int64))
        if not len(pos):
            return []
        # the extremes bound every position: one check for the whole list
        self._check_evictable(req_id, int(pos[-1]), committed_tokens)
        self._check_evictable(req_id, int(pos[0]), committed_tokens)
        rb = self.state(req_id)
        blocks = self.blocks(req_id)
        mask = rb.grow(len(blocks))
        let_go_array = pos[~mask[pos]][::-1]  # tail first, like vLLM's own free()
        let_go = let_go_array.tolist()
        if not let_go:
            return let_go
        freed = [blocks[p] for p in let_go]
        null = self.null_block
        for p in let_go:
            blocks[p] = null
        mask[let_go_array] = True
        rb.num_released += len(let_go)
        if rb.parked:
            before = len(rb.parked)
            rb.parked.difference_update(let_go)
            self._parked_total -= before - len(rb.parked)
        # older blocks stay cached longer (tail-first order)
        self.block_pool.free_blocks(freed)
        self._mark_excluded(req_id, rb, committed_tokens)
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
            self._mark_excluded(req_id, rb, committed_tokens)
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
            self._mark_changed(req_id, rb)
        return restored

    def forget(self, req_id: str) -> None:
        """Drop the request's eviction state (call when vLLM frees its blocks: finish,
        abort, preemption). Parked blocks are still in vLLM's list, so ``free()`` returns them."""
        rb = self.requests.pop(req_id, None)
        if rb is not None:
            self._parked_total -= len(rb.parked)
        self.excluded_blocks.pop(req_id, None)
        self.changed.discard(req_id)

    def take_changed(self, scheduled) -> list[str]:
        """The requests among ``scheduled`` whose row changed; they are marked as sent."""
        taken = [r for r in self.changed if r in scheduled]
        self.changed.difference_update(taken)
        return taken

    def cacheable_tokens(self, req_id: str, num_tokens: int) -> int:
        """Prefix-cache poison guard: only blocks computed before the first exclusion."""
        rb = self.requests.get(req_id)
        if rb is None or rb.poison_from_token is None:
            return num_tokens
        clean = (rb.poison_from_token // self.block_size) * self.block_size
        return min(num_tokens, clean)
