"""The worker's host↔device traffic, in one place and counted.

Why: on a GPU every pageable upload and every read of device data stalls the host until the
device catches up. The worker's per-step data goes up in one non-blocking copy from pinned
memory before the forward (``upload``), and the block scores of all scored requests come down
in one copy after it (``download``); nothing else in the step moves data between the two (the
policies run on device tensors and read nothing back at decode, ``tests/unit/test_policies_device.py``).
``counts`` says what a step did, for ``benchmarks/bench_worker.py`` and the tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch


class StepTransfers:
    """One pinned int64 staging buffer and its device twin, reused every step.

    Args:
        device: the KV cache's device (``cpu`` on vLLM's CPU backend: plain copies).
        capacity: initial int64 elements; the buffers double when a step needs more (the
            only allocation, rare: it settles at the largest step).
    """

    def __init__(self, device: torch.device | str, capacity: int = 4096):
        self.device = torch.device(device)
        self.counts: Counter = Counter()
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        pinned = self.device.type == "cuda"
        self._host = torch.zeros(capacity, dtype=torch.int64, pin_memory=pinned)
        self._host_np = self._host.numpy()
        self._dev = torch.zeros(capacity, dtype=torch.int64, device=self.device)

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """All ``arrays`` (integers) to the device in one non-blocking copy.

        Returns:
            int64 device views, one per array, in order. They stay valid until the next
            ``upload`` (the next step: the step's download has synchronised by then).
        """
        sizes = [len(a) for a in arrays]
        total = sum(sizes)
        if total > self._host.numel():
            self._allocate(max(total, 2 * self._host.numel()))
        start = 0
        for array, n in zip(arrays, sizes):
            self._host_np[start: start + n] = array
            start += n
        self._dev[:total].copy_(self._host[:total], non_blocking=True)
        self.counts["uploads"] += 1
        views, start = [], 0
        for n in sizes:
            views.append(self._dev[start: start + n])
            start += n
        return views

    def download(self, tensor: torch.Tensor) -> torch.Tensor:
        """The step's one device→host copy (a host sync on a GPU)."""
        self.counts["downloads"] += 1
        return tensor.cpu()
