"""Guards on vLLM's KV-cache manager: what may be cached, admitted and reused once blocks of
running requests can be evicted.

Installed on the scheduler's own ``KVCacheManager`` instance (never on the class):

* ``coordinator.cache_blocks``: never publish to the prefix cache blocks computed after an
  eviction (they hold K/V computed without the evicted tokens; a later request reusing them
  would silently attend differently) - *prefix-cache poisoning*.
* ``allocate_slots``: admit a request with prefill eviction by its peak (budget + one chunk),
  not its whole prompt; and where vLLM would preempt a running request, free blocks under pool
  pressure instead.
* ``get_computed_blocks``: cap a prefix-cache hit so a windowed policy still computes its
  whole observation window (:func:`cap_prefix_hit`).
"""

from __future__ import annotations

import math

from vllm.v1.request import RequestStatus

from vllm_kvevict.adapter.budget import keep_blocks_at


def install_guards(sched) -> None:
    """Wrap ``sched.kv_cache_manager``'s methods (see the module docstring).

    Args:
        sched: the ``EvictingScheduler`` (its ledger, requests, pool pressure and config).
    """
    manager = sched.kv_cache_manager
    coordinator = manager.coordinator
    original_cache_blocks = coordinator.cache_blocks
    ledger = sched.ledger

    def cache_blocks(request, num_computed_tokens):
        num = ledger.cacheable_tokens(request.request_id, num_computed_tokens)
        return original_cache_blocks(request, num)

    coordinator.cache_blocks = cache_blocks

    original_allocate = manager.allocate_slots

    def allocate_slots(request, num_new_tokens, *args, **kwargs):
        if kwargs.get("full_sequence_must_fit") and bounded_prefill(sched, request):
            # vLLM admits a request only if its whole prompt fits the pool; with prefill
            # eviction it never holds more than its peak (budget + one chunk)
            if not peak_fits(sched, request):
                return None
            kwargs["full_sequence_must_fit"] = False
        blocks = original_allocate(request, num_new_tokens, *args, **kwargs)
        # Only where vLLM would preempt: a *running* request short of blocks. A waiting
        # request short of blocks just waits; evicting to admit it would trade quality
        # for concurrency nobody asked for.
        if (blocks is not None or not sched.kv_default.pool_pressure
                or request.status != RequestStatus.RUNNING):
            return blocks
        need = math.ceil(max(num_new_tokens, 1) / sched.kv_block_size) + 1
        while blocks is None and sched.kv_pressure.free(need, sched.running, sched.kv_requests):
            blocks = original_allocate(request, num_new_tokens, *args, **kwargs)
        if blocks is not None:
            sched.kv_metrics.preemptions_avoided += 1
            sched.kv_metrics.dirty = True
        return blocks

    manager.allocate_slots = allocate_slots

    original_computed = manager.get_computed_blocks

    def get_computed_blocks(request, *args, **kwargs):
        # vLLM 0.33 passes max_cache_hit_length (an upper bound on the hit); the cap below
        # only ever shortens what vLLM found, so it composes with that bound
        found = original_computed(request, *args, **kwargs)
        return cap_prefix_hit(request, found, state=sched.kv_requests.get(request.request_id),
                              block_size=sched.kv_block_size, hybrid=sched.kv_hybrid,
                              empty=manager.empty_kv_cache_blocks)

    manager.get_computed_blocks = get_computed_blocks


def bounded_prefill(sched, request) -> bool:
    """The request evicts between prefill chunks (not on hybrid models: their sliding-window
    groups hold blocks the full group's bound does not describe, so vLLM's whole-prompt
    admission check stays)."""
    state = sched.kv_requests.get(request.request_id)
    return (state is not None and state.config.enabled and state.config.prefill_eviction
            and not sched.kv_hybrid)


def peak_fits(sched, request) -> bool:
    """Admission with prefill eviction: the pool has room for the most blocks the request
    can hold at once (``EvictionConfig.peak_blocks`` of its current length), in place of
    vLLM's whole-prompt check."""
    config = sched.kv_requests[request.request_id].config
    peak = config.peak_blocks(request.num_tokens, sched.max_num_scheduled_tokens,
                              sched.kv_block_size)
    held = len(sched.ledger.resident_array(request.request_id))
    return sched.kv_cache_manager.block_pool.get_num_free_blocks() >= peak - held


def cap_prefix_hit(request, found: tuple, *, state, block_size: int, hybrid: bool, empty):
    """``found`` (vLLM's ``(blocks, num_computed, *rest)``), capped for a windowed policy.

    A windowed policy scores the prompt through the queries computed in its last prefill step;
    a prefix-cache hit can leave fewer than its ``window`` (a prompt whose length is not a
    block multiple keeps only ``len % block_size`` queries). So for a request that will be
    scored at prefill the hit stops where at least ``window`` prompt tokens remain to compute:
    those blocks are recomputed (exactly: they hold prefix-cache K/V computed with full
    attention). A hybrid model gets no hit instead (``empty``): a shorter hit is not valid for
    its sliding-window groups, whose cached rows hold only the blocks of the window before the
    hit's end (the rest are null blocks).

    Args:
        state: the request's ``RequestEviction`` (None: eviction off).
        empty: vLLM's empty ``KVCacheBlocks``.
    """
    blocks, num_computed, *rest = found
    window = state.policy.schedule.window if state is not None else 0
    bs, prompt = block_size, request.num_prompt_tokens
    if not window or not num_computed or state.config.below_floor(prompt):
        return found
    keep_blocks = keep_blocks_at(state.config, prompt, prompt, bs)
    scored = keep_blocks < math.ceil(prompt / bs) or state.policy.schedule.select_after_prefill
    limit = max(prompt - window, 0) // bs * bs
    if not scored or num_computed <= limit:
        return found
    if hybrid:
        # no hit: 0.32/0.33's third value (a shared-prefix boundary) is 0 with it
        return (empty, 0, *(0 for _ in rest))
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks

    capped = KVCacheBlocks(tuple(list(group[: limit // bs]) for group in blocks.blocks))
    return (capped, limit, *rest)
