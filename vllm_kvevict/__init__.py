"""vllm-kvevict: evict paged KV-cache blocks of running requests inside vLLM.

``register`` is the ``vllm.general_plugins`` entry point. It runs in every vLLM process and
only installs the engine adapter's hooks; they stay inert unless the engine was configured
with ``additional_config={"kv_eviction": {...}}`` (or ``--kv-eviction``).
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM plugin entry point (idempotent: vLLM may call it several times per process)."""
    from vllm_kvevict.adapter import install

    install()
