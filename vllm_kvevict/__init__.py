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


def ensure_kernels_importable() -> None:
    """Make ``vllm_kvevict.kernels`` importable from a bare checkout (no package install).

    Installed (editable or not), pyproject maps the top-level ``kernels/`` folder to that name;
    in a bare ``git clone`` (e.g. ``benchmarks/gpu_check.sh`` on a GPU node with only torch and
    triton) the folder is registered under it by hand. A no-op when the import already works.
    """
    import importlib.util
    import os
    import sys

    try:
        import vllm_kvevict.kernels  # noqa: F401
        return
    except ModuleNotFoundError as exc:
        if exc.name != "vllm_kvevict.kernels":
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    spec = importlib.util.spec_from_file_location(
        "vllm_kvevict.kernels", os.path.join(folder, "__init__.py"),
        submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module
