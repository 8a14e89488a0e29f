"""Triton kernels, imported as ``vllm_kvevict.kernels`` (the folder is mapped in pyproject)."""
