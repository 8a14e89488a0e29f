"""Triton kernels, imported as ``vllm_kvevict.kernels`` (the folder is mapped in pyproject).

Call the statistics through :mod:`.dispatch` (Triton on NVIDIA GPUs, torch elsewhere);
:mod:`.paged` wraps each vLLM KV layout as a :class:`~.paged.PagedKV` and detects the CPU
backend's key layout; :mod:`.reference` holds the torch references the kernels are tested
against. Kernels: :mod:`.fused_decode` (the attention backend's decode attention, per-block
attention mass as a side output; called by ``vllm_kvevict.backend``, not through dispatch),
:mod:`.window_attention`, :mod:`.key_bounds` (Quest), :mod:`.value_norm` (‖v W_O^h‖₂).
Importing this package does not import Triton.
"""
