"""The one budget function (``adapter/budget.py``): every caller gets the same answer from the
request's lengths at the step, and between prompt chunks the answer is the whole prompt's."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvevict.adapter.budget import request_budget
from vllm_kvevict.config import parse_config

BS = 32


@settings(max_examples=300, deadline=None)
@given(prompt=st.integers(1, 20_000), computed=st.integers(1, 25_000),
       budget=st.floats(0.01, 1.0), floor=st.sampled_from([0, 256]))
def test_between_chunks_the_budget_is_the_prompts(prompt, computed, budget, floor):
    config = parse_config({"policy": "snapkv", "budget": budget, "floor_tokens": floor})
    b = request_budget(config, computed, prompt, BS)
    assert b.keep_blocks == config.keep_blocks(max(computed, prompt), BS)
    # the protection is sized like the budget: the same as a request that had computed its
    # whole prompt, except for the blocks not yet written (nothing past `computed` is full)
    assert b.lo == request_budget(config, max(computed, prompt), prompt, BS).lo
    assert b.hi <= computed // BS
    assert 0 <= b.lo and b.keep_blocks >= math.ceil(min(config.keep_tokens(prompt), prompt) / BS)


def test_protection_keeps_the_sink_the_recent_window_and_the_unfinished_block():
    config = parse_config({"policy": "snapkv", "budget_tokens": 7 * BS, "floor_tokens": 0})
    b = request_budget(config, 1000, 1000, BS)  # 31 full blocks and a partial one
    positions = np.arange(32)
    kept = positions[b.protected(positions)].tolist()
    assert kept == [0, 29, 30, 31]  # 4 sink tokens: block 0; 64 recent tokens: 29-30; partial 31
    unscored = np.zeros(32, dtype=bool)
    unscored[7] = True
    assert positions[b.protected(positions, unscored)].tolist() == [0, 7, 29, 30, 31]


def test_a_prompt_chunk_is_protected_as_the_prompt_would_be():
    """Sized for the 256 tokens computed so far, a 10 % budget would leave no sink at all; sized
    for the 4k-token prompt it keeps it."""
    config = parse_config({"policy": "snapkv", "budget": 0.1, "floor_tokens": 0})
    assert request_budget(config, 256, 256, BS).lo == 0
    assert request_budget(config, 256, 4096, BS).lo == 1
