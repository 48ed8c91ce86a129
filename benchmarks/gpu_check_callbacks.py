"""The per-step statistics callback of benchmarks/gpu_check.sh's fits (``gpu_check_callbacks.StepStats``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

CUDA = torch.cuda.is_available()


def gib(x: float) -> float:
    return round(x / 2**30, 3)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _dump(obj: Any, path: str) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


class StepStats(pl.Callback):
    """Per-step loss, time, tokens and peak memory of a fit, plus what it ran with (rank 0 writes JSON every step)."""

    def __init__(self, path: str) -> None:
        self.path, self.rows, self.info, self.t = path, [], {}, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        units = [m for m in trainer.strategy.model.modules() if isinstance(m, FSDP)]
        kinds: dict[str, int] = {}
        for unit in units:
            flat = getattr(getattr(unit, "_handle", None), "flat_param", None)  # no public accessor
            if flat is not None:
                key = f"{flat.dtype}/grad={flat.requires_grad}"
                kinds[key] = kinds.get(key, 0) + 1
        model = getattr(pl_module, "model", None)
        self.info.update(strategy=type(trainer.strategy).__name__, resumed_at=trainer.global_step, fsdp_units=len(units), fsdp_flat_params=kinds,
                         mixed_precision=str(getattr(trainer.strategy, "mixed_precision", None)),
                         gradient_checkpointing=getattr(pl_module, "gradient_checkpointing", None), fused_loss=getattr(pl_module, "fused_loss", None),
                         checkpointing_active=bool(model is not None and getattr(model, "is_gradient_checkpointing", False)),
                         mem_at_start_gib=gib(torch.cuda.memory_allocated()) if CUDA else None)

    def on_train_batch_start(self, *args: Any) -> None:
        sync()
        self.t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        sync()
        if not self.rows:  # FSDP casts buffers to the policy's buffer_dtype at the first forward
            self.info["inv_freq_dtype"] = sorted({str(b.dtype) for n, b in pl_module.named_buffers() if n.endswith("inv_freq")})
        self.rows.append({"step": trainer.global_step, "loss": float(outputs["loss"]), "s": round(time.perf_counter() - self.t, 4),
                          "tokens": int(batch["attention_mask"].sum()), "max_alloc_gib": gib(torch.cuda.max_memory_allocated()) if CUDA else None})
        if trainer.is_global_zero:
            _dump({"info": self.info, "rows": self.rows}, self.path)
