"""When the plugin uses its attention backend, and what it says when it cannot.

At engine configuration, with eviction on (a policy other than ``none``) on an NVIDIA GPU: the
full-attention layers get the plugin's backend (``attention_config.backend_per_kind
["full_attention"] = CUSTOM``; sliding-window layers of a hybrid model keep vLLM's choice) —
unless the user picked a backend, or the model needs what the kernel lacks. Then the decode
statistics are measured beside that backend, and the log says what that costs. Policy
``none`` and other platforms (vLLM's CPU backend) leave the configuration untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("vllm_kvevict")

FULL_ATTENTION = "full_attention"  # vllm.v1.kv_cache_interface.KVCacheSpecKind.FULL_ATTENTION
#: what measuring beside another backend costs (logged once at startup)
COST = ("decode statistics are measured by a second pass over the evicted layers' K/V after "
        "the backend's attention, and scored decode steps run without FULL CUDA graphs "
        "(piecewise: attention eager between the graph pieces)")


@dataclass(frozen=True)
class Selection:
    """The outcome: ``backend`` the full-attention layers get (None: vLLM chooses), whether the
    plugin's kernel measures decode statistics, and why."""

    backend: str | None
    fused: bool
    reason: str


def select_attention_backend(vllm_config, config, *, cuda: bool | None = None) -> Selection:
    """Pick the full-attention layers' backend for an eviction config (in place on
    ``vllm_config.attention_config``) and log the outcome.

    Args:
        vllm_config: the engine's ``VllmConfig`` (before the workers start).
        config: its ``EvictionConfig`` (None: eviction off).
        cuda: whether the platform is NVIDIA CUDA (default: ``vllm.platforms.current_platform``).
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kvevict.backend import NAME, is_ours, register

    if config is None or not config.enabled:
        return Selection(None, False, "eviction off: vLLM's backend untouched")
    if cuda is None:
        from vllm.platforms import current_platform

        cuda = current_platform.is_cuda()
    if not cuda:
        return Selection(None, False, "not an NVIDIA GPU: statistics measured beside the "
                         "platform's backend")
    register()
    ac = vllm_config.attention_config
    chosen = ac.backend_per_kind.get(FULL_ATTENTION, ac.backend)
    if chosen is not None:
        if is_ours(chosen):
            return _log(Selection(NAME, True, "chosen by the user"))
        return _log(Selection(chosen.name, False, f"--attention-backend {chosen.name} chosen "
                              f"by the user: {COST}; leave it unset (or pick {NAME}) for the "
                              "plugin's backend"))
    why_not = _unsupported(vllm_config)
    if why_not:
        return _log(Selection(None, False, f"the plugin's attention backend does not serve "
                              f"{why_not}: {COST}"))
    ac.backend_per_kind = {**ac.backend_per_kind, FULL_ATTENTION: AttentionBackendEnum.CUSTOM}
    return _log(Selection(NAME, True, "decode statistics measured inside the attention pass"))


def _unsupported(vllm_config) -> str | None:
    """What of this model the backend's kernel does not implement (None: nothing)."""
    mc = vllm_config.model_config
    if getattr(mc, "is_mm_prefix_lm", False):
        return "bidirectional attention over multimodal prefixes"
    if getattr(mc, "rswa_window", None) is not None:
        return "R-SWA attention"
    from vllm_kvevict.backend import BLOCK_SIZES, HEAD_SIZES

    block_size = getattr(vllm_config.cache_config, "block_size", None)
    if block_size is not None and block_size not in BLOCK_SIZES:
        return f"--block-size {block_size} (it takes {', '.join(map(str, BLOCK_SIZES))})"
    head_size = mc.get_head_size() if mc is not None else None
    low, high = HEAD_SIZES
    if head_size is not None and not low <= head_size <= high:
        return f"head size {head_size} ({low} to {high})"
    return None


def _log(selection: Selection) -> Selection:
    log = logger.info if selection.fused else logger.warning
    log("kv_eviction: attention backend %s for the evicted layers (%s)",
        selection.backend or "chosen by vLLM", selection.reason)
    return selection
