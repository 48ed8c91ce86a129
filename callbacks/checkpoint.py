"""``TaskCheckpoint``: Lightning's ``ModelCheckpoint`` with the task end as a checkpoint boundary.

Lightning does not run ``on_train_epoch_end`` again when it resumes from a checkpoint written in
``on_train_batch_end`` of an epoch's last batch: it counts the epoch as finished. In lightning-cit an
epoch is a task, and its end is where the evaluator writes the task's score row, buffers are filled
or rebuilt (OPR, JFA) and averages are copied into the model (LCIA). A step checkpoint on a task's last
step (``every_n_train_steps: 100`` with 300 steps per task) or a crash during the task-end evaluation
followed by ``--ckpt_path last`` would silently skip all of that.

``TaskCheckpoint`` therefore never saves on a task's last batch, and always saves (``save_top_k``
and ``last.ckpt``) at the end of every task, after every other callback's task-end hook (Lightning
runs checkpoint callbacks last). Every other option is ``ModelCheckpoint``'s. A run killed during the
task-end work resumes from the previous step checkpoint and replays the end of the task.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class TaskCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves at every task end and never on a task's last step (see module docstring)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the task-end checkpoint replaces it, written once the task-end hooks have run
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


__all__ = ["TaskCheckpoint"]
