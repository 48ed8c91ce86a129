"""Per-sample causal-LM losses computed chunk by chunk, never holding full float32 logits.

A full float32 copy of the logits costs ``tokens x vocab x 4`` bytes: ~1 GiB per 2,048 tokens with
Llama-3's 128k vocabulary, ~8 GiB at micro-batch 8, and autograd keeps the float32 log-softmax of it until
the backward. Both functions here go through the target tokens in chunks of ``chunk_tokens`` rows (rows of
one sample at a time, then over its sequence), so the float32 work exists for one chunk at a time.

- :func:`per_sample_loss` starts from the model's logits (any dtype; bf16 under autocast) and gives the same
  values as one ``cross_entropy`` over the float32 logits; with a gradient it holds the logits, one gradient
  buffer of their shape and dtype, and one float32 chunk.
- :func:`per_sample_loss_from_hidden` starts from the decoder's last hidden states and the output head: the
  logits of a chunk exist only while that chunk is processed (forward and recompute), and rows without a
  target (prompts, padding) get no logits at all; each chunk is wrapped in ``torch.utils.checkpoint``
  (non-reentrant), so autograd keeps only the chunk's hidden rows and recomputes its logits in the backward:
  the loss's own memory is a fixed multiple of one chunk (``chunk_tokens x vocab``) whatever the batch and
  sequence. ``ContinualLM(fused_loss=True)`` trains through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lightning_cit.collate import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 1024
"""Rows per chunk: 1,024 x 128,256 x 4 bytes = 0.5 GiB of float32 logits at a time for Llama-3."""
UNCHUNKED_MAX_BYTES = 64 * 2**20
"""Below this size of float32 logits :func:`per_sample_loss` computes in one piece, bit for bit the former loss
(small models' results stay reproducible); any Llama-3 batch (1 GiB per 2,048 tokens) is far above it."""


def _chunk_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def _head_chunk_nll(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def _run(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _check_chunk(chunk_tokens: int) -> None:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")


class _ChunkedLogitsNLL(torch.autograd.Function):
    """Per-sample summed NLL of ``logits`` (batch, seq, vocab) against ``targets`` (batch, seq), chunk by chunk.

    The gradient of each chunk is computed in the forward, while that chunk's float32 copy exists, and written into
    one buffer of the logits' own shape and dtype; the backward scales it by each sample's incoming gradient. Peak:
    the logits, that buffer, and one chunk in float32 (slicing a graph instead would give every chunk a full-size
    zero gradient to add up).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        grad = torch.empty_like(logits)
        sums = torch.zeros(logits.size(0), dtype=torch.float32, device=logits.device)
        for i in range(logits.size(0)):
            for s in range(0, logits.size(1), chunk_tokens):
                with torch.enable_grad():
                    chunk = logits[i, s : s + chunk_tokens].detach().float().requires_grad_()
                    total = F.cross_entropy(chunk, targets[i, s : s + chunk_tokens], ignore_index=IGNORE_INDEX, reduction="sum")
                    (chunk_grad,) = torch.autograd.grad(total, chunk)
                grad[i, s : s + chunk_tokens] = chunk_grad
                sums[i] += total.detach()
        ctx.save_for_backward(grad)
        return sums

    @staticmethod
    def backward(ctx: Any, grad_sums: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_sums.to(grad.dtype)[:, None, None]), None, None


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                    unchunked_max_bytes: int = UNCHUNKED_MAX_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean loss of each sample and its number of target tokens (labels aligned to inputs; position t
    predicts label t+1), computed ``chunk_tokens`` positions of one sample at a time once the float32 logits
    would exceed ``unchunked_max_bytes``."""
    _check_chunk(chunk_tokens)
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    if shift_logits.numel() * 4 <= unchunked_max_bytes:
        token = F.cross_entropy(shift_logits.float().reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="none").view(shift_labels.shape)
        return token.sum(dim=1) / counts.clamp(min=1), counts
    if torch.is_grad_enabled() and logits.requires_grad:
        sums = _ChunkedLogitsNLL.apply(shift_logits, shift_labels, chunk_tokens)
    else:
        sums = torch.stack([
            sum((_chunk_nll(shift_logits[i, s : s + chunk_tokens], shift_labels[i, s : s + chunk_tokens]).sum()
                 for s in range(0, shift_labels.size(1), chunk_tokens)), torch.zeros((), device=logits.device))
            for i in range(logits.size(0))
        ])
    return sums / counts.clamp(min=1), counts


def per_sample_loss_from_hidden(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                                chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_sample_loss` of ``head(hidden)`` without ever holding the logits of more than one chunk.

    ``hidden``: the decoder's last hidden states ``(batch, seq, d)``; ``head``: the output layer (e.g. the
    model's ``lm_head`` module, called on ``(rows, d)`` chunks; any logit scaling or soft-capping must be
    inside it). Only rows with a target are projected.
    """
    _check_chunk(chunk_tokens)
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE_INDEX
    counts = valid.sum(dim=1)
    sums = []
    for i in range(hidden.size(0)):
        rows = valid[i].nonzero().squeeze(1)
        if rows.numel() == 0:
            sums.append(hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden[i, :0].sum())
            continue
        states, targets = hidden[i, :-1].index_select(0, rows), shift_labels[i].index_select(0, rows)
        chunks = [_run(lambda h, t: _head_chunk_nll(head, h, t), states[s : s + chunk_tokens], targets[s : s + chunk_tokens])
                  for s in range(0, rows.numel(), chunk_tokens)]
        sums.append(torch.cat(chunks).sum())
    return torch.stack(sums) / counts.clamp(min=1), counts


__all__ = ["DEFAULT_CHUNK_TOKENS", "UNCHUNKED_MAX_BYTES", "per_sample_loss", "per_sample_loss_from_hidden"]
