"""Guards that stop a run which has gone wrong or been asked to stop, instead of letting it look finished.

``FiniteLossGuard``: a NaN/inf training loss stops the run with a :class:`~lightning_cit.errors.RunError`
naming the first bad step. The check costs no per-step device synchronisation: each step only folds
``isfinite(loss)`` into a flag on the loss's device; the flag is read (one ``.item()``, all-reduced
under DDP) every ``trainer.log_every_n_steps`` steps, where Lightning already reads the logged loss,
before every checkpoint is written, and at every task end. Put it *first* in ``trainer.callbacks``
(the ``lightning-cit`` CLI does) so that its task-end check runs before the evaluator writes a row:
a run with a non-finite loss never writes ``complete: true`` and never checkpoints NaN weights.

``SignalCheckpoint``: what SIGTERM (sent by schedulers before a kill, e.g. SLURM's pre-emption) does.
Lightning's signal connector records it (``trainer.received_sigterm``) and its loops raise
``SIGTERMException`` at the next batch end (or after the task-end hooks, where ``TaskCheckpoint``
has just saved). This callback then writes ``last.ckpt`` if the stop fell mid-task (never on a task's
last batch: resuming from there would skip the task's end, see ``TaskCheckpoint``), so that
``--ckpt_path last`` resumes exactly. The CLI exits with :data:`SIGTERM_EXIT_CODE`. Under DDP it writes
nothing extra (ranks can stop a batch apart and a save is collective): the run resumes, exactly, from
its last periodic or task-end checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_cit.errors import RunError

SIGTERM_EXIT_CODE = 143
"""Exit code of a run stopped by SIGTERM (128 + 15, what a shell reports for a process killed by it)."""


class NonFiniteLossError(RunError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(Callback):
    """Stops training with :class:`NonFiniteLossError` once a step's loss is NaN/inf (see module docstring)."""

    def __init__(self) -> None:
        self._first_bad: torch.Tensor | None = None  # optimizer step (1-based) of the first non-finite loss, -1 if none
        self._checked_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()).all()
        # device-side only: no synchronisation here
        self._first_bad = torch.where(bad & (self._first_bad < 0), torch.full_like(self._first_bad, trainer.global_step), self._first_bad)
        step = trainer.global_step
        if step % max(1, trainer.log_every_n_steps) == 0 and step != self._checked_step:  # once per step (accumulation)
            self._checked_step = step
            self.check(trainer, "at a logging step")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer, "at the end of the task, before it is scored")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check(trainer, "before a checkpoint was written")

    def check(self, trainer: pl.Trainer, where: str) -> None:
        """Raise :class:`NonFiniteLossError` if any step so far had a non-finite loss (on any rank)."""
        if self._first_bad is None:
            return
        bad = bool(trainer.strategy.reduce_boolean_decision(bool(self._first_bad.item() >= 0), all=False))
        if not bad:
            return
        step = int(self._first_bad.item())
        tasks = getattr(trainer.datamodule, "task_names", None)
        clock = getattr(trainer.lightning_module, "task_clock", None)
        index = clock.task_of(trainer) if clock is not None and (clock.style == "epoch" or clock.task >= 0) else trainer.current_epoch
        task = f" (task {tasks[index]!r})" if tasks and 0 <= index < len(tasks) else ""
        raise NonFiniteLossError(
            f"the training loss is not finite (NaN or inf) since step {step}{task}; training stopped "
            f"({where}), no checkpoint or score row was written after it. Lower model.learning_rate, check the data, or "
            "resume from an earlier checkpoint"
        )


class SignalCheckpoint(Callback):
    """On SIGTERM, writes ``last.ckpt`` when the stop falls mid-task (see module docstring).

    Args:
        dirpath: where ``last.ckpt`` goes; default: the directory of ``trainer.checkpoint_callback``
            (``<default_root_dir>/checkpoints`` without one).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved: str | None = None

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        directory = self.dirpath
        callback = trainer.checkpoint_callback
        name = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
        if directory is None and isinstance(callback, ModelCheckpoint) and callback.dirpath:
            directory = callback.dirpath
            name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
        return os.path.join(directory or os.path.join(trainer.default_root_dir, "checkpoints"), name)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        epoch = trainer.fit_loop.epoch_progress.current
        batches = trainer.fit_loop.epoch_loop.batch_progress.current
        mid_task = epoch.processed < epoch.started  # the task's end hooks have not run (else TaskCheckpoint saved)
        between_batches = batches.completed == batches.processed
        if not (mid_task and between_batches and 0 < batches.completed < trainer.num_training_batches):
            rank_zero_info(f"SIGTERM at step {trainer.global_step}: not a safe point for a new checkpoint; the last one stays")
            return
        if trainer.world_size > 1:
            # ranks may stop one batch apart (Lightning broadcasts the signal at the next batch), and a save is collective:
            # no save rather than a hang; the run resumes from its last periodic or task-end checkpoint
            rank_zero_info(f"SIGTERM at step {trainer.global_step} under DDP: no extra checkpoint; the last one stays")
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved = path
        rank_zero_info(f"SIGTERM at step {trainer.global_step}: saved {path}")


__all__ = ["SIGTERM_EXIT_CODE", "FiniteLossGuard", "NonFiniteLossError", "SignalCheckpoint"]
