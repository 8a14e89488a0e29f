"""What travels between the scheduler and the workers each step (plain picklable data).

Scheduler → worker: ``SchedulerOutput.kv_eviction`` (a ``StepPlan``).
Worker → scheduler: ``ModelRunnerOutput.kv_eviction_scores`` (``{req_id: BlockScores}``) and
``ModelRunnerOutput.kv_eviction_skipped`` (``{req_id: policy}``, tasks that measured nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PLAN_ATTR = "kv_eviction"
SCORES_ATTR = "kv_eviction_scores"
#: ``{req_id: policy}`` of scoring tasks whose statistics were not measured this step
SKIPPED_ATTR = "kv_eviction_skipped"


@dataclass
class ScoreTask:
    """Score one request's resident blocks during this step's forward pass."""

    policy: str
    options: dict
    #: "prefill" (this step computes prompt tokens: the last chunk, or with prefill eviction an
    #: earlier one; window statistics use this step's last queries) or "decode"
    phase: str
    generation: int  # bumps on preemption: late scores of an old generation are dropped
    kept_positions: list[int]  # positional index of each block of the compacted row
    parked: list[tuple[int, int]]  # (position, block id) of parked blocks
    visual_spans: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    #: a middle prompt chunk scored by the question probe's queries (``adapter/probe.py``)
    #: instead of its own last queries, where the worker holds them
    probe: bool = False


@dataclass
class ProbeTask:
    """A question probe's step: keep the queries of its last ``window`` tokens (the parent
    prompt's tail), turned by ``shift`` positions to where the tail sits in the parent."""

    parent: str
    shift: int
    window: int


@dataclass
class StepPlan:
    rows: dict[str, list[int]] = field(default_factory=dict)  # compacted rows that changed
    offsets: dict[str, int] = field(default_factory=dict)  # E tokens per request (absent = 0)
    score: dict[str, ScoreTask] = field(default_factory=dict)
    probes: dict[str, ProbeTask] = field(default_factory=dict)  # by the probe request's id


@dataclass
class BlockScores:
    generation: int
    positions: Any  # [nb] int64 array (or a list), ascending: the request's resident blocks
    scores: Any  # [nb] float32 array (or a list)
    #: the task's phase: "prefill" (a prompt chunk, the last one included) or "decode"
    phase: str = "decode"
