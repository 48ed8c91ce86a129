"""Building the models lightning-cit trains: the built-in tiny Llama (``model: tiny`` / ``aligned-base``).

Named offline models live in :mod:`lightning_cit.named_models`, random architectures and 4-bit loading in
:mod:`lightning_cit.quant`, the aligned base's recipe in :mod:`lightning_cit.base`.
"""

from __future__ import annotations

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


__all__ = ["TinyLlama", "build_tiny_llama"]
