"""Each statistic is declared once (``adapter.statistics.REGISTRY``) and agrees with what the
policies may ask for and what ``RequestStats`` carries."""

from __future__ import annotations

import dataclasses

from vllm_kvevict.adapter.statistics import BY_NAME, REGISTRY, expected_fields
from vllm_kvevict.policies import get_policy
from vllm_kvevict.policies.base import STATISTICS, RequestStats


def test_every_statistic_a_policy_may_need_is_declared_once_with_its_fields():
    assert [s.name for s in REGISTRY] == list(BY_NAME) and set(BY_NAME) == STATISTICS
    fields = {f.name for f in dataclasses.fields(RequestStats)}
    declared = [f for s in REGISTRY for f in s.fields]
    assert len(declared) == len(set(declared)) and set(declared) <= fields


def test_what_the_hooks_record_per_phase():
    """The observation window only in the step that completes the prompt; key bounds as two
    fields; a policy that needs nothing gets nothing."""
    def fields(policy, phase):
        return expected_fields(get_policy(policy, {}).needs, phase)

    assert fields("snapkv", "prefill") == {"window_attn", "decode_attn"}
    assert fields("snapkv", "decode") == {"decode_attn"}
    assert fields("hybridkv", "decode") == {"key_min", "key_max", "query"}
    assert fields("laprox", "decode") == {"decode_attn", "value_proj_norm"}
    assert fields("streamingllm", "prefill") == set()
