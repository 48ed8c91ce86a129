"""Test-only helpers for the QLoRA/FSDP tests: Lightning's FSDPStrategy on a CPU (gloo), and a loss recorder.

Lightning refuses ``FSDPStrategy`` without a CUDA accelerator (an exact-type check in its accelerator
connector), and it passes ``device_id=root_device.index`` to FSDP, which is ``None`` on CPU, where
torch's FSDP then stops with "FSDP needs a non-CPU accelerator device". torch's FSDP itself runs on
CPU when told ``device_id=cpu``. :class:`CPUFSDPStrategy` therefore wraps the module itself with
exactly the arguments Lightning would use (precision plugin's mixed-precision config, sharding
strategy, auto-wrap policy, ``use_orig_params``) plus ``device_id=cpu``, then hands the wrapped module to
Lightning's own ``_setup_model`` (which accepts pre-wrapped modules). Everything else, the FSDP
precision plugin, full-state-dict checkpointing and the training loop, is Lightning's code unchanged.
Lightning's ``FSDPPrecision`` autocasts with ``torch.autocast("cuda")`` only, which does nothing to CPU ops,
so peft's LoRA layers would see fp32 inputs and FSDP's bf16 weights; :class:`CPUFSDPPrecision` autocasts on
the CPU instead (what the CUDA plugin does on a GPU). These exist so the GPU config's FSDP path has a CPU
twin in CI; they are not part of the library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy


class CPUFSDPPrecision(FSDPPrecision):
    """``FSDPPrecision`` whose ``*-mixed`` forward autocasts on the CPU (see module docstring)."""

    def forward_context(self):
        if "mixed" in self.precision:
            return torch.autocast("cpu", dtype=torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16)
        return super().forward_context()


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` with ``device_id=cpu`` (see module docstring)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        self.kwargs.pop("auto_wrap_policy", None)  # already applied
        return super()._setup_model(wrapped)


class RecordLosses(pl.Callback):
    """Writes the training loss of every step (rank 0) to ``path`` as a JSON list, after every step, and what the
    first step ran with (dtypes of the RoPE ``inv_freq`` buffers and of the flat parameters, FSDP units, the
    checkpointing mode) to ``path`` + ``.setup.json``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        if not trainer.is_global_zero:
            return
        Path(self.path).write_text(json.dumps(self.losses))
        if len(self.losses) == 1:
            from torch.distributed.fsdp import FullyShardedDataParallel

            units = [m for m in trainer.strategy.model.modules() if isinstance(m, FullyShardedDataParallel)]
            flat = [u._handle.flat_param for u in units if getattr(u, "_handle", None) is not None]  # no public accessor
            setup = {
                "strategy": type(trainer.strategy).__name__,
                "inv_freq": sorted({str(b.dtype) for n, b in pl_module.named_buffers() if n.endswith("inv_freq")}),
                "fsdp_units": len(units),
                "flat_params": sorted({f"{p.dtype}/requires_grad={p.requires_grad}" for p in flat}),
                "adapters": sorted({str(p.dtype) for n, p in pl_module.named_parameters() if ".lora_" in n}),
            }
            Path(self.path + ".setup.json").write_text(json.dumps(setup))
