"""Per-sample token-mean losses from logits (the loss every step and every probe uses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_cit.collate import IGNORE_INDEX


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean loss of each sample and its number of target tokens (labels already aligned to inputs)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts


__all__ = ["per_sample_loss"]
