"""``select_batch`` (all of a step's decisions at once) decides exactly what the per-request
``select_blocks`` / ``select_tiered`` decide, ties and padding included."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvevict.policies.selection import select_batch, select_blocks, select_tiered

# few distinct values: ties, zeros of both signs (released outright under release_zero), negatives
SCORE = st.sampled_from([0.0, -0.0, 0.0, 0.25, 0.5, 0.5, 1.0, 3.0, -0.5])


@st.composite
def request(draw):
    nb = draw(st.integers(1, 12))
    return dict(
        scores=draw(st.lists(SCORE, min_size=nb, max_size=nb)),
        protected=draw(st.lists(st.booleans(), min_size=nb, max_size=nb)),
        tier=draw(st.lists(st.integers(0, 1), min_size=nb, max_size=nb)),
        keep=draw(st.integers(0, nb + 2)),
        bin=draw(st.integers(-1, 4)),
        first=draw(st.integers(0, 40)),  # positional index of the first resident block
    )


def _reference(r, release_zero, with_tier):
    nb = len(r["scores"])
    block_index = torch.arange(r["first"], r["first"] + nb)
    args = dict(block_index=block_index, keep_blocks=r["keep"],
                protected=torch.tensor(r["protected"]), bin_blocks=r["bin"])
    scores = torch.tensor(r["scores"], dtype=torch.float32)
    if release_zero:
        tier = torch.tensor(r["tier"]) if with_tier else None
        return select_tiered(scores, tier=tier, **args)
    return select_blocks(scores, **args)


@settings(max_examples=400, deadline=None)
@given(st.lists(request(), min_size=1, max_size=6), st.booleans(), st.booleans(),
       st.sampled_from([np.float32, np.float64]))
def test_batched_decisions_equal_per_request_ones(reqs, release_zero, with_tier, dtype):
    """float32 scores (the scheduler's) take the packed-sort path, float64 the argsort one."""
    width = max(len(r["scores"]) for r in reqs) + 2  # padding in every row
    shape = (len(reqs), width)
    scores, valid = np.zeros(shape, dtype=dtype), np.zeros(shape, dtype=bool)
    protected, tier = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=np.int64)
    for i, r in enumerate(reqs):
        nb = len(r["scores"])
        # float32 like the scheduler's scores
        scores[i, :nb] = np.asarray(r["scores"], dtype=np.float32)
        valid[i, :nb], protected[i, :nb], tier[i, :nb] = True, r["protected"], r["tier"]
        scores[i, nb:] = 99.0  # padding must never be kept, whatever it holds
    got = select_batch(scores, valid, protected, np.array([r["keep"] for r in reqs]),
                       np.array([r["bin"] for r in reqs]), release_zero=release_zero,
                       tier=tier if (release_zero and with_tier) else None)
    for i, r in enumerate(reqs):
        want = _reference(r, release_zero, with_tier)
        for name in ("keep", "park", "release"):
            mask = getattr(got, name)[i]
            assert not mask[~valid[i]].any()
            positions = (np.nonzero(mask)[0] + r["first"]).tolist()
            assert positions == getattr(want, name).tolist(), (name, r)
