"""The plugin's attention backend (NVIDIA GPUs): decode attention that scores blocks in the
same pass. ``attention.py`` holds the backend, ``buffers.py`` the persistent statistics buffers,
``selection.py`` when the plugin picks it. Registered (``register``) as vLLM's
``AttentionBackendEnum.CUSTOM`` through ``vllm.v1.attention.backends.registry.register_backend``;
the class path is resolved only when vLLM selects the backend, so registering imports nothing.
"""

from __future__ import annotations

BACKEND_PATH = "vllm_kvevict.backend.attention.EvictionAttentionBackend"
NAME = "CUSTOM"  # the AttentionBackendEnum member it is registered as (and its get_name())
#: block sizes the kernel takes (``tl.arange`` over a block: powers of two)
BLOCK_SIZES = (16, 32, 64, 128)
HEAD_SIZES = (32, 256)  # smallest and largest head size it takes


def register() -> None:
    """Register the backend under ``AttentionBackendEnum.CUSTOM`` (idempotent). A CUSTOM
    backend another plugin registered first is left alone (and never selected by us)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        return
    register_backend(custom, BACKEND_PATH)


def is_ours(backend) -> bool:
    """Whether an ``AttentionBackendEnum`` member (or None) resolves to this backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return (backend == AttentionBackendEnum.CUSTOM and backend.is_overridden()
            and backend.get_path() == BACKEND_PATH)
