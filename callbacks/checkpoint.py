"""``TaskCheckpoint``: Lightning's ``ModelCheckpoint`` with the task end as a checkpoint boundary.

Lightning does not run ``on_train_epoch_end`` again when it resumes from a checkpoint written in
``on_train_batch_end`` of an epoch's last batch: it counts the epoch as finished. In lightning-cit an
epoch is a task, and its end is where the evaluator writes the task's score row, buffers are filled
or rebuilt (OPR, JFA) and averages are copied into the model (LCIA). A step checkpoint on a task's last
step (``every_n_train_steps: 100`` with 300 steps per task) or a crash during the task-end evaluation
followed by ``--ckpt_path last`` would silently skip all of that.

``TaskCheckpoint`` therefore never saves on a task's last batch, and always saves (``save_top_k``
and ``last.ckpt``) at the end of every task, after every other callback's task-end hook (Lightning
runs checkpoint callbacks last). Every other option is ``ModelCheckpoint``'s.

Retention (why: the shipped configs kept a file every 100 steps forever, 16 files for the quickstart and
568 MB per file for a 135M model): ``keep_mid_task: N`` keeps only the last N mid-task (step)
checkpoints; task-end checkpoints follow ``save_top_k`` as before. The callback removes only files it
recorded as mid-task saves (the list is in its state, the file being written included, so a resumed run
goes on pruning them); files of a crashed run written after the checkpoint it resumes from are left alone. At the start of ``fit`` it prints
what the run's checkpoints will take on disk (:func:`checkpoint_disk_estimate`), weight-sized callback states (EMA copies, JFA's reference) included (:func:`callback_state_bytes`). A run killed during the
task-end work resumes from the previous step checkpoint and replays the end of the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from lightning_cit.errors import ConfigError
from lightning_cit.results import human_size


@dataclass(frozen=True)
class DiskEstimate:
    per_file: int
    """Bytes of one checkpoint (weights stored, AdamW moments of the trainable ones, the callback states counted by :func:`callback_state_bytes`)."""
    files: int
    """Most checkpoint files on disk at once."""

    @property
    def total(self) -> int:
        return self.per_file * self.files


def checkpoint_disk_estimate(param_bytes: int, trainable_bytes: int, adapter_only: bool, tasks: int, save_top_k: int,
                             mid_task_saves: int, keep_mid_task: int | None, save_last: bool, state_bytes: int = 0) -> DiskEstimate:
    """What a run's checkpoints take: one file's size times the most files kept at once (a pure helper, tested)."""
    stored = trainable_bytes if adapter_only else param_bytes
    per_file = stored + 2 * trainable_bytes + state_bytes  # AdamW keeps two moments per trainable weight
    task_ends = tasks if save_top_k < 0 else min(save_top_k, tasks)
    mid = mid_task_saves if keep_mid_task is None else min(keep_mid_task, mid_task_saves)
    return DiskEstimate(per_file, task_ends + mid + int(bool(save_last)))


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def callback_state_bytes(callbacks: list[Any], trainable_bytes: int) -> tuple[int, list[str]]:
    """Bytes the callbacks' weight-sized states add to every checkpoint, known at the start of ``fit``, and what they are.

    Counted: ``AdapterEMA`` (one copy of the trainable weights; ``DynamicEMA`` also the previous gradients
    and, with ``rule: paper``, the previous weights) and ``JointFlashbackAdaptation``'s reference (the frozen
    model copy or the adapter snapshot it holds at the start, else one copy of the trainable weights).
    Not counted: the other states (decisions, histories, probe losses, score rows, buffer indices, MSSR's
    per-task values), which grow with the tasks but not with the model, and a generated replay buffer's text.
    """
    from lightning_cit.callbacks.jfa import JointFlashbackAdaptation
    from lightning_cit.callbacks.lcia.ema import AdapterEMA, DynamicEMA

    total, parts = 0, []
    for callback in callbacks:
        name = type(callback).__name__
        if isinstance(callback, AdapterEMA):
            copies = 1 + (1 + int(callback.rule == "paper") if isinstance(callback, DynamicEMA) else 0)
            size = copies * (_tensor_bytes(callback.ema.values()) or trainable_bytes)
            parts.append(f"{name} {copies} cop{'y' if copies == 1 else 'ies'} {human_size(size)}")
        elif isinstance(callback, JointFlashbackAdaptation):
            size = callback.reference_bytes(trainable_bytes)
            parts.append(f"{name} reference {human_size(size)}")
        else:
            continue
        total += size
    return total, parts


class TaskCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves at every task end and never on a task's last step (see module docstring).

    Args:
        keep_mid_task: mid-task checkpoints to keep (the newest); null keeps all.
        **kwargs: ``ModelCheckpoint``'s.
    """

    def __init__(self, *args: Any, keep_mid_task: int | None = None, **kwargs: Any) -> None:
        if keep_mid_task is not None and (isinstance(keep_mid_task, bool) or not isinstance(keep_mid_task, int) or keep_mid_task < 0):
            raise ConfigError(f"TaskCheckpoint.keep_mid_task must be an int >= 0 or null, got {keep_mid_task!r}")
        if keep_mid_task == 0 and kwargs.get("save_last") == "link":
            raise ConfigError("TaskCheckpoint: save_last: link with keep_mid_task: 0 would link last.ckpt to removed files; keep at least 1")
        super().__init__(*args, **kwargs)
        self.keep_mid_task = keep_mid_task
        self.mid_task_paths: list[str] = []  # mid-task checkpoints written (and not yet removed), oldest first
        self._mid_task = False
        self._pending: str | None = None

    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None, ver: int | None = None, **kwargs: Any) -> str:
        path = super().format_checkpoint_name(metrics, filename, ver, **kwargs)
        if self._mid_task and filename is None:  # the step checkpoint's name (not last.ckpt): the last one formatted is saved
            self._pending = path
        return path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the task-end checkpoint replaces it, written once the task-end hooks have run
        self._mid_task, self._pending = True, None
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if self._pending is not None and self._pending not in self.mid_task_paths:
                self.mid_task_paths.append(self._pending)
        finally:
            self._mid_task, self._pending = False, None
        if self.keep_mid_task is not None:
            stale, self.mid_task_paths = split_stale(self.mid_task_paths, self.keep_mid_task)
            for path in stale:
                if path != self.last_model_path:
                    trainer.strategy.remove_checkpoint(path)  # rank 0 removes

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._print_disk_estimate(trainer, pl_module)

    @rank_zero_only
    def _print_disk_estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_cit.callbacks.adapter_checkpoint import AdapterOnlyCheckpoint

        params = list(pl_module.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        adapter_only = any(isinstance(c, AdapterOnlyCheckpoint) for c in trainer.callbacks)
        dm = trainer.datamodule
        tasks = int(getattr(dm, "num_tasks", 0) or trainer.max_epochs or 1)
        steps = sum(int(dm.steps_for(i)) for i in range(tasks)) if hasattr(dm, "steps_for") else int(trainer.estimated_stepping_batches)
        every = self._every_n_train_steps or 0
        state_bytes, parts = callback_state_bytes(list(trainer.callbacks), trainable_bytes)
        estimate = checkpoint_disk_estimate(param_bytes, trainable_bytes, adapter_only, tasks, self.save_top_k,
                                            steps // every if every else 0, self.keep_mid_task, bool(self.save_last), state_bytes)
        states = f"callback states: {', '.join(parts)}" if parts else "no weight-sized callback state"
        print(f"checkpoints: about {human_size(estimate.per_file)} each ({'adapters only' if adapter_only else 'all weights'} + optimizer; "
              f"{states}; small states such as histories and buffer indices not counted), "
              f"at most {estimate.files} files, about {human_size(estimate.total)} in {self.dirpath} "
              f"(keep_mid_task={self.keep_mid_task}, save_top_k={self.save_top_k})", flush=True)

    def state_dict(self) -> dict[str, Any]:
        # the file being written is in its own list: a run resumed from it removes it in its turn
        paths = self.mid_task_paths + ([self._pending] if self._mid_task and self._pending and self._pending not in self.mid_task_paths else [])
        return {**super().state_dict(), "mid_task_paths": list(paths)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            self.mid_task_paths = list(state_dict.get("mid_task_paths", []))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


def split_stale(paths: list[str], keep: int) -> tuple[list[str], list[str]]:
    """``(to remove, to keep)``: all but the newest ``keep`` of ``paths`` (oldest first) are stale."""
    cut = max(0, len(paths) - keep)
    return paths[:cut], paths[cut:]




__all__ = ["DiskEstimate", "TaskCheckpoint", "callback_state_bytes", "checkpoint_disk_estimate", "split_stale"]


def _signature_with_keep_mid_task() -> Any:
    """``ModelCheckpoint``'s parameters plus ``keep_mid_task``: what the CLI and the config-comment check read."""
    import inspect

    base = inspect.signature(ModelCheckpoint.__init__)
    params = list(base.parameters.values())
    params.append(inspect.Parameter("keep_mid_task", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=int | None))
    return base.replace(parameters=params)


TaskCheckpoint.__init__.__signature__ = _signature_with_keep_mid_task()  # type: ignore[attr-defined]
