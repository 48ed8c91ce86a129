"""Guards that stop a run which has gone wrong or been asked to stop, instead of letting it look finished.

``FiniteLossGuard``: a NaN/inf training loss stops the run with a :class:`~lightning_cit.errors.RunError`
naming the first bad step. The check costs no per-step device synchronisation: each step only folds
``isfinite(loss)`` into a flag on the loss's device; the flag is read (one ``.item()``, all-reduced
under DDP) every ``trainer.log_every_n_steps`` steps, where Lightning already reads the logged loss,
before every checkpoint is written, and at every task end. Put it *first* in ``trainer.callbacks``
(the ``lightning-cit`` CLI does) so that its task-end check runs before the evaluator writes a row:
a run with a non-finite loss never writes ``complete: true`` and never checkpoints NaN weights.

``SignalCheckpoint``: what SIGTERM (sent by schedulers before a kill, e.g. SLURM's pre-emption) does.
The run stops at a safe point, writes ``last.ckpt`` there if the stop falls mid-task (never on a task's
last batch: resuming from there would skip the task's end, see ``TaskCheckpoint``), so that
``--ckpt_path last`` resumes exactly, and the CLI exits with :data:`SIGTERM_EXIT_CODE`.

One process: Lightning's signal connector records the signal (``trainer.received_sigterm``) and its loops
raise ``SIGTERMException`` at the next batch end (or after the task-end hooks, where ``TaskCheckpoint`` has
just saved); this callback then saves in ``on_exception``. The stop comes at most one batch after the signal.

Several processes (DDP, FSDP): Lightning 2.6's own SIGTERM handler runs ``dist.broadcast`` *inside* the signal
handler and rank 0 forwards the signal to the other ranks, so when every rank gets SIGTERM (SLURM's ``srun``
signals every task) ranks enter mismatched collectives and the run hangs. From ``on_sanity_check_start`` /
``on_train_start`` (Lightning registers its handler just before; it restores the previous one at teardown)
this callback therefore replaces it with a handler that only sets a flag: no collective, no forwarding. Every
rank all-reduces the flag (``any``) where all ranks are in lockstep: at the end of every
``check_every_n_steps``-th optimizer step (the same ``global_step`` on every rank) and at every task start.
If any rank was signalled, every rank sets ``trainer.received_sigterm`` at that same point, so Lightning's
loops raise ``SIGTERMException`` on every rank at the same batch end, where every rank joins the collective
save of ``last.ckpt``. A poll that falls on a task's last batch is skipped: that task ends, ``TaskCheckpoint``
saves, and the poll at the next task start stops the run (the task-end checkpoint is the resume point).

Cost: one all-reduce of one number every ``check_every_n_steps`` steps (default 10). Lightning 2.6 already
broadcasts rank 0's SIGTERM flag and reads it back on the host before every DDP batch
(``_TrainingEpochLoop._broadcast_sigterm_tensor``), so the host is already synchronised once per batch; the
extra collective adds one small-message latency per ``check_every_n_steps`` steps, not a new pipeline stall.

Maximum delay under DDP between the signal and the stop: ``check_every_n_steps`` optimizer steps (each of
``accumulate_grad_batches`` batches) plus the step in progress; if no poll step is left in the task (the
signal came in its last steps or during its task-end work: evaluation, buffers), the rest of that task and its
task-end work, the stop coming at the next task start (in the last task no poll follows: the run finishes and
exits 0). Then the save. Choose ``check_every_n_steps`` so that this fits the
scheduler's grace period (SLURM: ``KillWait``, or ``--signal=TERM@<seconds>`` for an earlier warning). A
signal before ``on_sanity_check_start``/``on_train_start`` (setup, checkpoint restore) or in ``validate``/``test``
runs still meets Lightning's handler.

``trainer.received_sigterm``: under DDP it becomes True on every rank at the step at which the ranks agreed
to stop (never on one rank alone, which would make Lightning's loops diverge); a rank's own receipt is
``SignalCheckpoint.signalled``.
"""

from __future__ import annotations

import os
import signal
import threading
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
    """On SIGTERM, stops at a safe point and writes ``last.ckpt`` when the stop falls mid-task (see module docstring).

    Args:
        dirpath: where ``last.ckpt`` goes; default: the directory of ``trainer.checkpoint_callback``
            (``<default_root_dir>/checkpoints`` without one).
        check_every_n_steps: under DDP/FSDP, how often (in optimizer steps) the ranks agree on whether any of
            them was signalled; also the bound on the delay between the signal and the stop (module docstring).
    """

    def __init__(self, dirpath: str | None = None, check_every_n_steps: int = 10) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.dirpath = dirpath
        self.check_every_n_steps = check_every_n_steps
        self.saved: str | None = None
        self.signalled = False  # this process received SIGTERM (set by our handler, multi-process runs only)
        self._installed = False  # our recording handler replaces Lightning's for this fit
        self._agreed = False  # all ranks decided to stop at the same point (so a collective save is safe)
        self._polled_step = -1

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        directory = self.dirpath
        callback = trainer.checkpoint_callback
        name = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
        if directory is None and isinstance(callback, ModelCheckpoint) and callback.dirpath:
            directory = callback.dirpath
            name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
        return os.path.join(directory or os.path.join(trainer.default_root_dir, "checkpoints"), name)

    # ------------------------------------------------------------------ multi-process: record, then agree

    def _record(self, signum: int, frame: Any) -> None:
        # a signal handler: only set a flag (no collective, no logging lock, no forwarding to other ranks)
        self.signalled = True

    def _install(self, trainer: pl.Trainer) -> None:
        if self._installed or trainer.world_size <= 1 or threading.current_thread() is not threading.main_thread():
            return  # one process: Lightning's own handler is safe (no collective) and stays
        if not hasattr(trainer._signal_connector, "received_sigterm"):
            # the flag Lightning's loops stop on; without it the agreed stop below cannot be expressed
            raise RuntimeError("SignalCheckpoint: this Lightning version has no _signal_connector.received_sigterm")
        # Lightning registered its handler in Trainer._run and restores the previous one at teardown
        signal.signal(signal.SIGTERM, self._record)
        self.signalled = False
        self._agreed = False
        self._polled_step = -1
        self._installed = True

    def _any_rank_signalled(self, trainer: pl.Trainer) -> bool:
        # a collective: called only where every rank is at the same point (same global_step / task start)
        return bool(trainer.strategy.reduce_boolean_decision(self.signalled, all=False))

    def _agree_to_stop(self, trainer: pl.Trainer) -> None:
        self._agreed = True
        # the flag Lightning's loops read to raise SIGTERMException at their next safe point; set on every rank at
        # the same step, so every rank raises at the same batch end
        trainer._signal_connector.received_sigterm = True
        rank_zero_info(f"SIGTERM received (by at least one rank): stopping every rank at step {trainer.global_step}")

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a task start: the previous task's end hooks (and TaskCheckpoint's save) are done on every rank
        if self._installed and self._any_rank_signalled(trainer):
            self._agree_to_stop(trainer)
            raise SIGTERMException()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._installed or batch_idx + 1 >= trainer.num_training_batches:
            return  # a task's last batch: no stop here (resuming would skip the task end); the next task start polls
        step = trainer.global_step
        if step % self.check_every_n_steps or step == self._polled_step:  # once per step (gradient accumulation)
            return
        self._polled_step = step
        if self._any_rank_signalled(trainer):
            self._agree_to_stop(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.signalled and not self._agreed:
            rank_zero_info("SIGTERM arrived after the last stop point: the run finished")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning has restored the handler it found (its teardown runs first); a later fit installs ours again
        self._installed = False

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
        if trainer.world_size > 1 and not self._agreed:
            # Lightning's own handler stopped this rank (a signal before our handler was installed): ranks may stop a
            # batch apart and a save is collective, so no save rather than a hang; the last checkpoint stays
            rank_zero_info(f"SIGTERM at step {trainer.global_step} under DDP: no extra checkpoint; the last one stays")
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # under DDP every rank is here, at the same step (see _agree_to_stop)
        self.saved = path
        rank_zero_info(f"SIGTERM at step {trainer.global_step}: saved {path}")


__all__ = ["SIGTERM_EXIT_CODE", "FiniteLossGuard", "NonFiniteLossError", "SignalCheckpoint"]
