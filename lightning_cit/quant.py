"""QLoRA building blocks: the 4-bit base, random-weight architectures, and the FSDP wrapping policy.

What made FSDP + 4-bit work elsewhere (Answer.AI ``fsdp_qlora``; bitsandbytes#970) is reproduced
here without patching anything:

- **Float quant storage.** FSDP only flattens and shards float tensors, so the packed 4-bit weights
  are stored as ``quant_storage: bfloat16`` (bnb's ``Params4bit(quant_storage=...)``), which must equal
  FSDP's ``param_dtype`` (bf16 under ``bf16-mixed`` / ``bf16-true``); otherwise FSDP casts the packed
  bytes as if they were numbers and the base turns into noise. :func:`check_storage_matches_precision`
  refuses that combination.
- **Wrapping.** :class:`QLoRAWrapPolicy` makes every decoder layer one FSDP unit and every module
  whose own parameters are all trainable (the LoRA ``A``/``B`` leaves) a unit of its own, like
  ``get_wrapping_policy`` in ``fsdp_qlora/train.py``: frozen 4-bit storage and fp32 adapters never
  share a flat parameter (one dtype per flat parameter; no gradient buffer for frozen storage).
- **Random weights without downloads.** ``model: random:llama3-8b`` (or ``random:<config.json>``) builds
  the architecture with seeded random weights and quantizes it while loading, for speed and memory
  benchmarks; the same seed gives the same base, so adapter-only checkpoints load back onto it.

Lightning's ``BitsandbytesPrecision`` plugin is not used: ``FSDPStrategy`` accepts only its own
precision plugin, and the plugin's ``uint8`` storage cannot be sharded (landscape.md §5.3).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from lightning_cit.errors import ConfigError

QUANT_TYPES = ("nf4", "fp4")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
QUANT_FIELDS = {
    "quant_type": "nf4 | fp4 (default nf4)",
    "compute_dtype": "auto | bfloat16 | float16 | float32 (default auto: bfloat16 on CUDA, float32 on CPU)",
    "quant_storage": "uint8 | bfloat16 | float16 | float32 (default uint8; bfloat16 for FSDP)",
    "double_quant": "bool (default true)",
}
RANDOM_PREFIX = "random:"

# Llama-3-8B's config.json (meta-llama/Meta-Llama-3-8B), kept here so benchmarks need no download.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    # the same layout at toy size (grouped-query attention, untied head): CPU twins of the GPU configs
    "tiny-llama": {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
}
RANDOM_SEED = 0
"""Seed of ``random:`` weights: fixed, so every build (and every rank) gets the same base."""


def quantization_spec(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Normalize ``model.quantization`` (``nf4``, ``fp4``, a dict of :data:`QUANT_FIELDS`, or None)."""
    if value is None:
        return None
    spec: dict[str, Any] = {"quant_type": "nf4", "compute_dtype": "auto", "quant_storage": "uint8", "double_quant": True}
    if isinstance(value, str):
        value = {"quant_type": value}
    if not isinstance(value, dict):
        raise ConfigError(f"model.quantization must be nf4, fp4, a dict or null, got {value!r}")
    unknown = sorted(set(value) - set(QUANT_FIELDS))
    if unknown:
        raise ConfigError(f"model.quantization has unknown field(s) {unknown}; valid: " + "; ".join(f"{k}: {v}" for k, v in QUANT_FIELDS.items()))
    spec.update(value)
    if spec["quant_type"] not in QUANT_TYPES:
        raise ConfigError(f"model.quantization.quant_type={spec['quant_type']!r} is unknown; valid: {', '.join(QUANT_TYPES)}")
    for key, valid in (("compute_dtype", ("auto", "bfloat16", "float16", "float32")), ("quant_storage", tuple(DTYPES))):
        if spec[key] not in valid:
            raise ConfigError(f"model.quantization.{key}={spec[key]!r} is unknown; valid: {', '.join(valid)}")
    if not isinstance(spec["double_quant"], bool):
        raise ConfigError(f"model.quantization.double_quant must be true or false, got {spec['double_quant']!r}")
    return spec


def compute_dtype(spec: dict[str, Any]) -> torch.dtype:
    if spec["compute_dtype"] == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[spec["compute_dtype"]]


def bnb_config(spec: dict[str, Any]) -> Any:
    """transformers' ``BitsAndBytesConfig`` for a normalized spec."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec["quant_type"],
        bnb_4bit_use_double_quant=spec["double_quant"],
        bnb_4bit_compute_dtype=compute_dtype(spec),
        bnb_4bit_quant_storage=DTYPES[spec["quant_storage"]],
    )


def is_random(model: str) -> bool:
    return model.startswith(RANDOM_PREFIX)


def random_architecture(model: str) -> Any:
    """The ``PretrainedConfig`` of ``random:<preset>`` (see :data:`ARCHITECTURES`) or ``random:<config.json>``."""
    from transformers import AutoConfig

    name = model[len(RANDOM_PREFIX) :]
    if name in ARCHITECTURES:
        fields = dict(ARCHITECTURES[name])
    elif os.path.isfile(os.path.expanduser(name)):
        with open(os.path.expanduser(name), encoding="utf-8") as handle:
            fields = json.load(handle)
    else:
        raise ConfigError(f"model.model={model!r}: after 'random:' give a preset ({', '.join(ARCHITECTURES)}) or a config.json file")
    if "model_type" not in fields:
        raise ConfigError(f"model.model={model!r}: the config has no 'model_type'")
    return AutoConfig.for_model(**fields)


def load_causal_lm(source: str, quantization: dict[str, Any] | None, device: torch.device | None = None) -> Any:
    """A causal LM from a local checkpoint directory or ``random:<architecture>``, 4-bit when ``quantization`` is set.

    On CUDA the weights are quantized straight onto ``device`` (``device_map``), never held in
    full precision on the host. Without quantization the checkpoint's own dtype is kept.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization)
        # non-quantized parameters (norms, embeddings, head) in the compute dtype; under FSDP they
        # share flat parameters with the packed storage, so they must not be upcast to fp32 either
        kwargs["dtype"] = compute_dtype(quantization)
        if device is not None and device.type == "cuda":
            kwargs["device_map"] = {"": device}
    if not is_random(source):
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(source), local_files_only=True, **kwargs)
        return keep_trainable_4bit_layout(model) if quantization is not None else model
    config = random_architecture(source)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    dtype = kwargs.get("dtype", torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32)
    build_device = device if device is not None and device.type == "cuda" else torch.device("cpu")
    devices = [build_device.index or 0] if build_device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(build_device):
        torch.manual_seed(RANDOM_SEED)
        if build_device.type == "cuda":
            torch.cuda.manual_seed(RANDOM_SEED)
        model = model_class(config).to(dtype)
    if quantization is None:
        return model
    # quantized while "loading" the random weights, exactly like a checkpoint from disk
    state = model.state_dict()
    del model
    quantized = model_class.from_pretrained(None, config=config, state_dict=state, **kwargs)
    del state
    if build_device.type == "cuda":
        torch.cuda.empty_cache()
    return keep_trainable_4bit_layout(quantized)


def keep_trainable_4bit_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Keep bitsandbytes' 4-bit layers in their trainable layout on CPUs with AVX512-BF16.

    bitsandbytes >= 0.48 repacks a ``Linear4bit`` into a CPU inference layout the first time it runs
    in eval mode without grad (an evaluation pass), in place and for good. Training afterwards goes
    through ``gemv_4bit``, which has no autograd kernel: no gradient flows back through the frozen
    base (measured here: the layer-0 LoRA gradient changes by 14%), and the conversion back for saving
    rounds the double-quant constants to bf16. Each layer's ``support_avx512bf16_for_cpu`` switch
    (an instance attribute bitsandbytes sets from the CPU's features) turns that repacking off; GPUs
    never repack.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def storage_dtype(spec: dict[str, Any] | None) -> torch.dtype | None:
    return None if spec is None else DTYPES[spec["quant_storage"]]


def check_storage_matches_precision(spec: dict[str, Any] | None, trainer: Any) -> None:
    """Under FSDP the 4-bit storage dtype must equal FSDP's ``param_dtype`` (fsdp_qlora README, Limitations)."""
    if spec is None or trainer is None:
        return
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return
    precision = str(trainer.precision)
    param_dtype = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32}.get(precision.split("-")[0])
    storage = DTYPES[spec["quant_storage"]]
    if storage != param_dtype:
        raise ConfigError(
            f"model.quantization.quant_storage={spec['quant_storage']} but trainer.precision={precision} makes FSDP cast "
            f"parameters to {param_dtype}: FSDP would cast the packed 4-bit bytes and destroy the base. Set quant_storage to "
            + {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}.get(param_dtype, "a float dtype")
        )


def _import_class(path: str | type) -> type:
    if isinstance(path, type):
        return path
    import importlib

    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"QLoRAWrapPolicy: cannot import layer class {path!r}") from None


class QLoRAWrapPolicy:
    """FSDP auto-wrap policy for QLoRA: each ``layer_classes`` module is one FSDP unit, every module whose
    own parameters are all trainable (the LoRA ``A``/``B`` linears) is one, and so is every other leaf with
    parameters outside the layers (embeddings, final norm, head).

    The first two rules are Answer.AI's ``get_wrapping_policy`` (``lambda_auto_wrap_policy`` OR
    ``transformer_auto_wrap_policy``): frozen packed storage and trainable adapters live in different
    flat parameters, so the adapters keep their fp32 master copy and no gradient buffer is allocated
    for the frozen base. The third leaves the root unit without parameters of its own: with
    ``use_orig_params=True`` (Lightning's default) a root whose flat parameter is entirely frozen gets no
    post-backward hook, its parameters stay plain tensors after the step, and a full state dict then
    fails ("FSDP assumes ...embed_tokens.weight is in the state_dict"; torch 2.13, reproduced on CPU).
    Leaves holding a tied parameter (tied input/output embeddings) stay in the root, since FSDP cannot
    split one parameter over two units. Pass it as ``trainer.strategy.init_args.auto_wrap_policy``.

    Args:
        layer_classes: dotted class names (or classes) of the decoder layer, e.g.
            ``transformers.models.llama.modeling_llama.LlamaDecoderLayer``.
    """

    def __init__(self, layer_classes: list[str]) -> None:
        self.layer_classes = tuple(_import_class(c) for c in layer_classes)
        self._inside_layers: set[int] = set()
        self._tied: set[int] = set()
        self._root_seen = False

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            # FSDP asks top-down whether to descend before it decides bottom-up whether to wrap, so the
            # first call is the root and a layer is always seen before its children
            if not self._root_seen:
                self._root_seen = True
                counts: dict[int, int] = {}
                for _, param in module.named_parameters(remove_duplicate=False):
                    counts[id(param)] = counts.get(id(param), 0) + 1
                self._tied = {key for key, n in counts.items() if n > 1}
            if isinstance(module, self.layer_classes):
                self._inside_layers.update(id(m) for m in module.modules())
            return True
        if isinstance(module, self.layer_classes):
            return True
        own = list(module.parameters(recurse=False))
        if not own:
            return False
        if all(p.requires_grad for p in own):
            return True
        is_leaf = next(module.children(), None) is None
        return is_leaf and id(module) not in self._inside_layers and not any(id(p) in self._tied for p in own)


__all__ = [
    "ARCHITECTURES",
    "QLoRAWrapPolicy",
    "bnb_config",
    "check_storage_matches_precision",
    "load_causal_lm",
    "quantization_spec",
    "random_architecture",
]
