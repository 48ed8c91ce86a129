"""QLoRA building blocks: the 4-bit base, random-weight architectures, and the FSDP wrapping policy.

What made FSDP + 4-bit work elsewhere (Answer.AI ``fsdp_qlora``; bitsandbytes#970) is reproduced
here without patching anything:

- **Float quant storage, never cast.** FSDP only flattens and shards float tensors, so the packed 4-bit
  weights are stored as a float dtype (bnb's ``Params4bit(quant_storage=...)``; ``float32`` in the FSDP
  config), and FSDP must never cast them as if they were numbers (the base would turn into noise):
  :func:`fsdp_mixed_precision` sets ``param_dtype=None`` with a 4-bit base (compute in autocast) and
  ``buffer_dtype=float32`` (RoPE), and :func:`check_storage_matches_precision` refuses uint8 storage or a
  configured policy whose ``param_dtype`` differs from the storage.
- **Wrapping.** :class:`QLoRAWrapPolicy` makes every decoder layer (with its adapters) one FSDP unit, and
  :func:`unify_layer_dtypes` holds a layer's norms and adapters in the storage dtype (one dtype per flat
  parameter). The FSDP config stores the packed bytes as float32 and :func:`fsdp_mixed_precision` never casts
  parameters (compute in autocast) and keeps buffers (RoPE ``inv_freq``) in float32.
- **No sharding = DDP.** Where the 4-bit base fits one GPU (Llama-3-8B: ~6 GB), ``configs/gpu/llama3_8b_qlora_ddp.yaml``
  replicates it with DDP: only the adapters' gradients are all-reduced, in a few buckets.
- **Random weights without downloads.** ``model: random:llama3-8b`` (or ``random:<config.json>``) builds
  the architecture on the meta device and loads seeded random weights tensor by tensor, quantizing each as
  it loads (like a checkpoint), for speed and memory benchmarks; the same seed gives the same base, so
  adapter-only checkpoints load back onto it.

Lightning's ``BitsandbytesPrecision`` plugin is not used: ``FSDPStrategy`` accepts only its own
precision plugin, and the plugin's ``uint8`` storage cannot be sharded (landscape.md §5.3).
"""

from __future__ import annotations

import json
import os
import zlib
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

    Both go through ``from_pretrained``, which builds the model on the meta device and loads (and quantizes) one
    tensor at a time: from a checkpoint's safetensors, or for ``random:`` from :class:`RandomTensor` values
    generated on demand, on the target device and in the load dtype. On CUDA the weights are placed straight
    onto ``device`` (``device_map``), never held in full precision on the host or all at once. Peak while loading
    ≈ the final size + the largest tensor (``benchmarks/load_memory.py``). Without quantization a checkpoint keeps
    its own dtype.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    on_cuda = device is not None and device.type == "cuda"
    if on_cuda:
        kwargs["device_map"] = {"": device}
    if quantization is not None:
        kwargs["quantization_config"] = bnb_config(quantization)
        # non-quantized parameters (norms, embeddings, head) in the compute dtype, not fp32 (~2 GB more for an 8B model)
        kwargs["dtype"] = compute_dtype(quantization)
    if not is_random(source):
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(source), local_files_only=True, **kwargs)
        return keep_trainable_4bit_layout(model) if quantization is not None else model
    config = random_architecture(source)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]  # no public name-to-class lookup for a config
    kwargs.setdefault("dtype", torch.bfloat16 if on_cuda else torch.float32)
    state = random_state_dict(model_class, config, kwargs["dtype"], device if on_cuda else torch.device("cpu"))
    model = model_class.from_pretrained(None, config=config, state_dict=state, **kwargs)
    if on_cuda:
        torch.cuda.empty_cache()
    return keep_trainable_4bit_layout(model) if quantization is not None else model


class RandomTensor:
    """A state-dict value that becomes a seeded random tensor only when transformers loads it (``value[...]``, the
    way it reads a safetensors slice): N(0, ``initializer_range``) for linear and embedding weights, ones for norm
    weights, zeros for biases. The seed depends on :data:`RANDOM_SEED` and the name only, so every build, rank and
    device order gives the same base."""

    def __init__(self, name: str, shape: tuple[int, ...], kind: str, std: float, dtype: torch.dtype, device: torch.device) -> None:
        self.name, self.shape, self.kind, self.std, self.dtype, self.device = name, tuple(shape), kind, std, dtype, device

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def __getitem__(self, index: Any) -> torch.Tensor:
        if self.kind == "ones":
            return torch.ones(self.shape, dtype=self.dtype, device=self.device)[index]
        if self.kind == "zeros":
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)[index]
        generator = torch.Generator(device=self.device).manual_seed(RANDOM_SEED * 2**32 + zlib.crc32(self.name.encode()))
        return torch.empty(self.shape, dtype=self.dtype, device=self.device).normal_(0.0, self.std, generator=generator)[index]


def random_state_dict(model_class: type, config: Any, dtype: torch.dtype, device: torch.device) -> dict[str, RandomTensor]:
    """Every parameter of ``model_class(config)`` (built on the meta device, no memory) as a :class:`RandomTensor`."""
    with torch.device("meta"):
        skeleton = model_class(config)
    std = float(getattr(config, "initializer_range", 0.02))
    state: dict[str, RandomTensor] = {}
    for module_name, module in skeleton.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if name == "bias":
                kind = "zeros"
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                kind = "normal"
            else:
                kind = "ones"  # RMSNorm / LayerNorm weights
            state[full] = RandomTensor(full, param.shape, kind, std, dtype, device)
    return state


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


def fsdp_mixed_precision(spec: dict[str, Any] | None, trainer: Any) -> Any:
    """The FSDP mixed-precision policy lightning-cit runs with, set on ``trainer.strategy`` when the config gives none.

    Lightning's ``FSDPPrecision`` for ``bf16-mixed`` casts *buffers* to bf16 too, so the rotary embedding's
    ``inv_freq`` turns bf16 at the first forward (with Llama-3's ``rope_theta`` 500k the phase at position
    2047 is then off by up to 3.7 rad). The policy set here keeps ``buffer_dtype=float32`` and:

    - without quantization, the precision plugin's ``param_dtype``/``reduce_dtype`` (bf16 under ``bf16-mixed``);
    - with a 4-bit base, ``param_dtype=None`` (no cast): FSDP never casts the packed 4-bit bytes, each unit
      keeps its own dtype (the decoder layers the storage dtype, embeddings and head bf16), and the compute
      runs in the plugin's autocast, as on a single device. This is Answer.AI ``fsdp_qlora``'s
      ``mp_bf16_autocast`` mode.

    A policy given in the config (``strategy.init_args.mixed_precision``) is kept and checked instead.
    Returns the policy in force (None outside FSDP).
    """
    if trainer is None:
        return None
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, FSDPStrategy):
        return None
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

    if strategy.sharding_strategy == ShardingStrategy.NO_SHARD:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn("FSDP with sharding_strategy NO_SHARD replicates the model like DDP, with a collective per FSDP unit: "
                       "use trainer.strategy: ddp (configs/gpu/llama3_8b_qlora_ddp.yaml); torch deprecates NO_SHARD")
    if strategy.mixed_precision is None:  # FSDPStrategy's public constructor argument, read by its mixed_precision_config
        plugin = strategy.mixed_precision_config
        if spec is not None:
            strategy.mixed_precision = MixedPrecision(param_dtype=None, reduce_dtype=None, buffer_dtype=torch.float32)
        else:
            strategy.mixed_precision = MixedPrecision(
                param_dtype=plugin.param_dtype if plugin else None, reduce_dtype=plugin.reduce_dtype if plugin else None, buffer_dtype=torch.float32
            )
    return strategy.mixed_precision


def check_storage_matches_precision(spec: dict[str, Any] | None, trainer: Any) -> None:
    """Under FSDP the packed 4-bit storage must be a float dtype that FSDP never casts (fsdp_qlora README, Limitations),
    and the policy must keep buffers (RoPE ``inv_freq``) in float32."""
    policy = fsdp_mixed_precision(spec, trainer)
    if policy is None:
        return
    if policy.buffer_dtype not in (None, torch.float32):
        raise ConfigError(
            f"trainer.strategy.init_args.mixed_precision has buffer_dtype={policy.buffer_dtype}: the rotary embedding's inv_freq "
            "would be rounded (phase errors of radians at long positions); use buffer_dtype float32"
        )
    if spec is None:
        return
    storage = DTYPES[spec["quant_storage"]]
    if not storage.is_floating_point:
        raise ConfigError(
            f"model.quantization.quant_storage={spec['quant_storage']} under FSDP: FSDP only flattens and shards float tensors; "
            "set quant_storage to float32 (adapters keep fp32 weights) or bfloat16 (adapters in bf16)"
        )
    if policy.param_dtype is not None and policy.param_dtype != storage:
        name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}.get(policy.param_dtype, str(policy.param_dtype))
        raise ConfigError(
            f"model.quantization.quant_storage={spec['quant_storage']} but the FSDP mixed-precision policy casts parameters to "
            f"{policy.param_dtype}: FSDP would cast the packed 4-bit bytes and destroy the base. Set quant_storage to {name}, "
            "or leave trainer.strategy.init_args.mixed_precision unset (lightning-cit's policy never casts the 4-bit storage)"
        )


def decoder_layers(model: torch.nn.Module, layer_classes: tuple[type, ...] | None = None) -> list[torch.nn.Module]:
    """The decoder layers of a (peft-wrapped) HF model: ``layer_classes`` or the model's ``_no_split_modules``."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if (isinstance(m, layer_classes) if layer_classes else type(m).__name__ in names)]


def unify_layer_dtypes(model: torch.nn.Module, spec: dict[str, Any], layer_classes: tuple[type, ...] | None = None) -> int:
    """Hold every non-quantized parameter inside a decoder layer (norms, LoRA A/B) in the 4-bit storage dtype.

    Under FSDP each decoder layer is one unit and one flat parameter, and a flat parameter has one dtype:
    with ``quant_storage: float32`` (the FSDP config) the norms are upcast (exact) and the adapters keep
    fp32 weights; with ``bfloat16`` the adapters train in bf16. Returns the number of tensors cast.
    """
    import bitsandbytes as bnb

    storage = DTYPES[spec["quant_storage"]]
    cast = 0
    for layer in decoder_layers(model, layer_classes):
        for param in layer.parameters():
            if not isinstance(param, bnb.nn.Params4bit) and param.is_floating_point() and param.dtype != storage:
                param.data = param.data.to(storage)
                cast += 1
    return cast


def check_trainable_get_gradients(model: torch.nn.Module, context: Any = None) -> None:
    """Fail loudly at setup if a trainable tensor (a LoRA ``A``/``B``) would get no gradient.

    One forward and backward of four tokens (RNG states restored, gradients cleared). The classic silent failure:
    reentrant activation checkpointing whose checkpointed inputs do not require grad (a frozen embedding's output)
    runs the layers' backward not at all, so no adapter inside a checkpointed layer ever trains. ``context``: the
    trainer's forward context (autocast under ``*-mixed``), as in a training step.
    """
    import contextlib

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    devices = [device.index or 0] if device.type == "cuda" else []
    kept = [p.grad for _, p in trainable]
    for _, p in trainable:
        p.grad = None
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), context or contextlib.nullcontext():
            out = model(input_ids=torch.arange(1, 5, device=device).unsqueeze(0), use_cache=False)
            if out.logits.requires_grad:  # not even that when every adapter sits in a layer the graph skipped
                out.logits.float().sum().backward()
        missing = [n for n, p in trainable if p.grad is None]
    finally:
        for (_, p), grad in zip(trainable, kept):
            p.grad = grad
        model.train(was_training)
    if missing:
        raise ConfigError(
            f"{len(missing)} of {len(trainable)} trainable tensors get no gradient (e.g. {missing[0]}): with reentrant "
            "activation checkpointing the layers' inputs must require grad (model.enable_input_require_grads()); use "
            "model.gradient_checkpointing: non_reentrant, or keep the embeddings' output requiring grad"
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
    """FSDP auto-wrap policy for QLoRA: each ``layer_classes`` module (a decoder layer, with its LoRA adapters
    and norms) is one FSDP unit, and so is every leaf with parameters outside the layers (embeddings, final
    norm, head).

    One unit per layer means one all-gather and one reduce-scatter per layer (32 for Llama-3-8B), instead of
    Answer.AI ``fsdp_qlora``'s extra unit per LoRA ``A``/``B`` (448 tiny units and collectives). A flat
    parameter has one dtype, so :func:`unify_layer_dtypes` holds a layer's norms and adapters in the 4-bit
    storage dtype (float32 in the FSDP config: fp32 adapters, packed bytes never cast, see
    :func:`fsdp_mixed_precision`). Frozen storage and trainable adapters then share a flat parameter: with
    ``use_orig_params=True`` (Lightning's default) FSDP supports that, and its gradient buffer spans the
    layer's storage too (one layer unsharded at a time, the rest sharded).

    The outside leaves get units so that the root keeps no parameters of its own: with ``use_orig_params=True``
    a root whose flat parameter is entirely frozen gets no post-backward hook, its parameters stay plain tensors
    after the step, and a full state dict then fails ("FSDP assumes ...embed_tokens.weight is in the state_dict";
    torch 2.13, reproduced on CPU). Leaves holding a tied parameter (tied input/output embeddings) stay in the
    root, since FSDP cannot split one parameter over two units. Pass it as
    ``trainer.strategy.init_args.auto_wrap_policy``.

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
                self._inside_layers.update(id(m) for m in module.modules() if m is not module)
                return True  # a layer answers "wrap?" after its children, which all say no
            return id(module) not in self._inside_layers  # nothing inside a layer is wrapped on its own
        if isinstance(module, self.layer_classes):
            return True
        own = list(module.parameters(recurse=False))
        if not own or id(module) in self._inside_layers:
            return False
        is_leaf = next(module.children(), None) is None
        return is_leaf and not any(id(p) in self._tied for p in own)


__all__ = [
    "ARCHITECTURES",
    "QLoRAWrapPolicy",
    "bnb_config",
    "check_storage_matches_precision",
    "check_trainable_get_gradients",
    "decoder_layers",
    "fsdp_mixed_precision",
    "load_causal_lm",
    "quantization_spec",
    "random_architecture",
    "unify_layer_dtypes",
]
