"""Building the models lightning-cit trains (``ContinualLM.configure_model`` calls :func:`build_causal_lm`).

Sources: the built-in tiny Llama (``model: tiny``), the aligned tiny base (``aligned-base``, :mod:`lightning_cit.base`),
a named offline model (:mod:`lightning_cit.named_models`), a local Hugging Face checkpoint directory, or a
``random:<architecture>`` (:mod:`lightning_cit.quant`, which also loads 4-bit bases); then optional gradient
checkpointing and peft LoRA adapters, with the check that every LoRA tensor gets a gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TinyLlama:
    """Shape of the built-in tiny Llama (``model: tiny`` / ``aligned-base``)."""

    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 256
    """Width of the MLP."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Attention heads (no grouped-query attention)."""
    max_position_embeddings: int = 256
    """Longest sequence the rotary embedding is set up for."""


def build_tiny_llama(tokenizer: Any, shape: TinyLlama) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def model_source(name: str, model_dir: str | None, tiny: TinyLlama, cache_dir: str | None) -> str | None:
    """The base's source: None for ``tiny``, a directory, or ``random:<architecture>``."""
    if name == "tiny":
        return None
    if name.startswith("random:"):
        return name
    from lightning_cit.base import RECIPES, ensure_aligned_base

    if name in RECIPES:
        return ensure_aligned_base(tiny, cache_dir=cache_dir, recipe=name)
    return model_dir or os.path.expanduser(name)


def load_tokenizer(name: str, model_dir: str | None, tokenizer: str | None) -> Any:
    """The tokenizer: the built-in character tokenizer for tiny/aligned/random models, else the checkpoint's (offline)."""
    from lightning_cit.base import RECIPES

    if tokenizer is None and (name == "tiny" or name in RECIPES or name.startswith("random:")):
        from lightning_cit.synth import build_char_tokenizer

        return build_char_tokenizer()  # the aligned base is saved with this same tokenizer
    from transformers import AutoTokenizer

    source = os.path.expanduser(tokenizer or model_dir or name)
    loaded = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if loaded.pad_token is None:
        loaded.pad_token = loaded.eos_token
    return loaded


def build_causal_lm(source: str | None, tokenizer: Any, tiny: TinyLlama, quantization: Any, lora: dict[str, Any] | None,
                    gradient_checkpointing: bool | str, trainer: Any, device: torch.device) -> torch.nn.Module:
    """The model to train: built or loaded (quantized onto this rank's device), checkpointed, with LoRA adapters."""
    if source is None:
        model = build_tiny_llama(tokenizer, tiny)
    else:
        from lightning_cit.quant import check_storage_matches_precision, load_causal_lm

        check_storage_matches_precision(quantization, trainer)
        # quantize straight onto this rank's GPU (outside a trainer: the module's device); on CPU load on the host
        model = load_causal_lm(source, quantization, trainer.strategy.root_device if trainer is not None else device)
    from lightning.pytorch.strategies import FSDPStrategy

    fsdp = trainer is not None and isinstance(trainer.strategy, FSDPStrategy)
    if gradient_checkpointing:
        # non-reentrant wherever it works (no need for input grads, composes with DDP); under FSDP reentrant (as
        # fsdp_qlora recommends with bitsandbytes): non-reentrant there leaves the frozen layer units' norms
        # unregistered under use_orig_params and full state dicts fail. Reentrant needs the embeddings' output to
        # require grad (transformers hooks that in); check_trainable_get_gradients below proves it did.
        reentrant = gradient_checkpointing == "reentrant" or (gradient_checkpointing is True and fsdp)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if lora:
        from peft import LoraConfig, get_peft_model

        # no prepare_model_for_kbit_training: its fp32 upcast of embeddings and head would add ~2 GB for an
        # 8B model; peft freezes the base itself
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        if fsdp and quantization is not None:
            from lightning_cit.quant import QLoRAWrapPolicy, unify_layer_dtypes

            policy = trainer.strategy.kwargs.get("auto_wrap_policy")
            unify_layer_dtypes(model, quantization, policy.layer_classes if isinstance(policy, QLoRAWrapPolicy) else None)
        from lightning_cit.quant import check_trainable_get_gradients

        check_trainable_get_gradients(model, trainer.precision_plugin.forward_context() if trainer is not None else None)
    return model


__all__ = ["TinyLlama", "build_causal_lm", "build_tiny_llama", "load_tokenizer", "model_source"]
