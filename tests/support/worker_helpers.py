"""What the worker's step does for a scored request, for tests that build a ``ScoredRequest``
by hand instead of resolving it against a runner's batch (``StepInputs.fix_inputs``)."""

from __future__ import annotations

import torch

from vllm_kvevict.adapter.scoring_batch import ScoredRequest


def uploaded(sr: ScoredRequest, device: torch.device | str = "cpu") -> ScoredRequest:
    """``sr`` with its ``device_parts()`` on ``device``, as the step's one upload leaves it
    (after ``set_hooked``: what goes up depends on what the hooks measure)."""
    sr.on_device = [torch.from_numpy(a).to(device) for a in sr.device_parts()]
    return sr
