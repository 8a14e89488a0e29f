"""Each statistic is declared once (``adapter.statistics.REGISTRY``) and agrees with what the
policies may ask for and what ``RequestStatistics`` carries."""

from __future__ import annotations

import dataclasses

from vllm_kvevict.adapter.statistics import BY_NAME, REGISTRY, VARIANTS, expected_fields
from vllm_kvevict.policies import get_policy
from vllm_kvevict.policies.base import STATISTICS, RequestStatistics


def test_every_statistic_a_policy_may_need_is_declared_once_with_its_fields():
    assert {s.name for s in REGISTRY} == STATISTICS and len(REGISTRY) == len(STATISTICS)
    fields = {f.name for f in dataclasses.fields(RequestStatistics)}
    declared = [f for s in REGISTRY for f in s.fields]
    assert len(declared) == len(set(declared)) and set(declared) <= fields
    # a variant measures the same fields as the statistic it stands in for, and is found by name
    for name, (base, variant) in VARIANTS.items():
        assert base in STATISTICS and variant.fields == BY_NAME[base].fields
        assert BY_NAME[name] is variant and name not in STATISTICS


def test_what_the_hooks_record_per_phase():
    """The observation window and the value norms only in the step that completes the prompt;
    decode attention as two block fields; a policy that needs nothing gets nothing; on a
    decode row of the plugin's attention backend the hooks record nothing at decode (its
    kernel measures the decode statistics), for every policy."""
    def fields(policy, phase, in_backend=False):
        return expected_fields(get_policy(policy, {}).needs, phase, in_backend)

    decode = {"decode_mass", "decode_peak"}
    assert fields("snapkv", "prefill") == {"window_attn"} | decode
    assert fields("snapkv", "decode") == decode
    assert fields("hybridkv", "decode") == decode
    assert fields("laprox", "decode") == decode
    assert fields("laprox", "prefill") == {"window_attn", "value_proj_norm"} | decode
    assert fields("streamingllm", "prefill") == set()
    from vllm_kvevict.policies import NONE, available_policies

    for name in (p for p in available_policies() if p != NONE):
        assert fields(name, "decode", in_backend=True) == set(), name
        assert "window_attn" not in fields(name, "decode"), name
