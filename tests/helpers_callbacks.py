"""Callbacks used by the tests through class_path (importable because conftest puts tests/ on sys.path)."""

import json
import os

from lightning.pytorch.callbacks import Callback


class RecordSamples(Callback):
    """Writes, per rank, the sample ids and per-sample losses it trained on and the mixtures it used."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.seen: list[list[int]] = []
        self.sources: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert outputs["per_sample_loss"].shape == batch["sample_ids"].shape
        self.seen.append([trainer.current_epoch, trainer.global_step, *batch["sample_ids"].tolist()])
        self.sources.append(batch["source_ids"].tolist())

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        schedule = {str(k): {str(b): w for b, w in v.items()} for k, v in trainer.datamodule.schedule.items()}
        memory = {}
        for callback in trainer.callbacks:  # MSSR memory states, to check that ranks agree
            if hasattr(callback, "memory"):
                memory = {name: {str(t): v.tolist() for t, v in per_task.items()} for name, per_task in callback.memory.state_dict().items()}
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"seen": self.seen, "sources": self.sources, "schedule": schedule, "memory": memory}, handle)


class FailAt(Callback):
    """Raises inside a callback at a given global step (failure injection)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")


class RecordEMA(Callback):
    """Writes, per rank, DynamicEMA's per-tensor weights at every step, whether it averaged each task, and a checksum."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.weights: list[list[float]] = []
        self.active: list[bool] = []

    def _ema(self, trainer):
        return next(c for c in trainer.callbacks if hasattr(c, "ema") and hasattr(c, "should_update"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ema = self._ema(trainer)
        if batch_idx == 0:
            self.active.append(ema.active)
        if ema.active and getattr(ema, "last_weights", None) is not None:
            self.weights.append(ema.last_weights.tolist())

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        ema = self._ema(trainer)
        checksum = {name: float(t.double().sum()) for name, t in sorted(ema.ema.items())}
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"weights": self.weights, "active": self.active, "checksum": checksum}, handle)


class FailAtTaskEnd(Callback):
    """Raises in ``on_train_epoch_end`` of a given task, after the callbacks listed before it ran (a crash during task-end work)."""

    def __init__(self, task: int) -> None:
        self.task = task

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.task:
            raise RuntimeError(f"injected failure at the end of task {self.task}")


class PoisonWeights(Callback):
    """Fills every trainable weight with NaN before optimizer step ``at_step`` (a run whose loss becomes NaN)."""

    def __init__(self, at_step: int = 2) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            import torch

            with torch.no_grad():
                for parameter in pl_module.parameters():
                    if parameter.requires_grad and parameter.is_floating_point():
                        parameter.fill_(float("nan"))
