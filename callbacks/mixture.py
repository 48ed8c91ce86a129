"""Mixture controllers: decide, from training signals, how much each source contributes to a batch.

A controller is a Lightning callback with one override point, :meth:`MixtureController.decide`:
signals in (the current task, progress, the latest probe loss of every task), weights out (one per
trained task; earlier tasks are replayed from their buffers, later tasks must get 0). The base class
does the rest: it asks for a decision at the start of every task and then every
``decision_interval`` optimizer steps, runs :meth:`decide` on every rank and broadcasts rank 0's
answer (so ranks always agree), and schedules the weights on the DataModule's sampler
(:meth:`~lightning_cit.datamodules.ContinualInstructionDataModule.set_mixture`).

Timing: batches are drawn ahead of the step that trains on them (``datamodule.draw_ahead``: the one
Lightning prefetches plus the one in flight), so the decision for batch ``b`` is taken at the start
of batch ``b - draw_ahead`` and keyed by ``b``. Probe signals therefore lag a decision by
``draw_ahead`` batches; in exchange a run is bit-for-bit reproducible and resumes exactly.

Controllers shipped here (the paper baselines; ProxyMix and MSSR build on the same protocol):

- :class:`NoReplay`: only the current task.
- :class:`FixedRatio`: ``ratio`` of every batch spread uniformly over the earlier tasks.
- :class:`Proportional`: every accessible source weighted by its latest probe loss.
- :class:`SizeProportional`: every accessible source weighted by its size (concatenate and shuffle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl

from lightning_cit.contract import DATA_MIXTURE, ContinualCallback, ContractError, Needs
from lightning_cit.errors import ConfigError


@dataclass
class MixtureSignals:
    """What a controller sees at a decision point."""

    task_index: int
    """0-based index of the task being trained."""
    num_tasks: int
    """Trained tasks in the sequence."""
    batch_in_task: int
    """First batch (within the task) the decision applies to."""
    step: int
    """Global optimizer step of that batch (the run's clock, across tasks)."""
    steps_in_task: int
    """Optimizer steps of the current task."""
    progress: float
    """``batch_in_task / batches_in_task`` in [0, 1)."""
    probe_losses: list[float | None]
    """Latest probe loss per task (None before the first probe of that task; future tasks None)."""
    source_sizes: list[int]
    """Entries per accessible source (buffers of earlier tasks, then the current task's data)."""


class MixtureController(ContinualCallback):
    """Base class: override :meth:`decide`. ``decision_interval`` is in optimizer steps (None: once per task).

    It owns the data's mixture plan (the ``mixture`` service: a second controller in the same run is
    refused at setup) and reads probe losses from the ``probes`` service (``ForgettingEvaluator``).
    """

    needs = Needs(data=DATA_MIXTURE)

    needs_probes = False
    fresh_probes = False
    """Probe the seen tasks at every decision (see ForgettingEvaluator.ensure_fresh_probe): for loss-trend controllers."""

    def __init__(self, decision_interval: int | None = None) -> None:
        if decision_interval is not None and decision_interval < 1:
            raise ConfigError(f"decision_interval must be a positive number of optimizer steps or null, got {decision_interval}")
        self.decision_interval = decision_interval
        self.decisions: list[dict[str, Any]] = []

    def decide(self, signals: MixtureSignals) -> list[float]:
        """Mixture weights over all trained tasks (future ones 0) for the coming interval."""
        raise NotImplementedError

    def entry_weights(self, signals: MixtureSignals) -> dict[int, list[float]] | None:
        """Optional per-entry draw weights inside the buffers (``{task: weights}``); None = uniform."""
        return None

    @staticmethod
    def global_step_of(trainer: pl.Trainer, batch_in_task: int) -> int:
        """Global optimizer step of a batch of the current task."""
        task = trainer.lightning_module.task_clock.task_of(trainer)
        return trainer.datamodule.task_start_step(task) + batch_in_task // trainer.accumulate_grad_batches

    def is_decision_batch(self, trainer: pl.Trainer, batch_in_task: int) -> bool:
        """Whether a decision applies from this batch on (besides batch 0). Default: every ``decision_interval`` steps."""
        if self.decision_interval is None:
            return False
        return batch_in_task % (self.decision_interval * trainer.accumulate_grad_batches) == 0

    # -------------------------------------------------------------------------------------- plumbing
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        pl_module.continual.register_service("mixture", self)  # one owner of the mixture plan
        dm = trainer.datamodule
        if self.decision_interval is not None:
            interval_batches = self.decision_interval * trainer.accumulate_grad_batches
            if interval_batches < dm.draw_ahead:
                raise ConfigError(
                    f"{type(self).__name__}.decision_interval={self.decision_interval} steps is shorter than the "
                    f"{dm.draw_ahead} batches the loader draws ahead; use a decision_interval of at least {dm.draw_ahead}"
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.needs_probes and pl_module.continual.service("probes") is None:  # every callback is set up by now
            raise ContractError(f"{type(self).__name__} reads probe losses: add lightning_cit.callbacks.ForgettingEvaluator to trainer.callbacks")

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self._decide_for(trainer, batch=0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        dm = trainer.datamodule
        target = batch_idx + dm.draw_ahead
        if target < dm.batches_for(pl_module.task_clock.task_of(trainer)) and self.is_decision_batch(trainer, target):
            self._decide_for(trainer, batch=target)

    def _decide_for(self, trainer: pl.Trainer, batch: int) -> None:
        dm = trainer.datamodule
        task = trainer.lightning_module.task_clock.task_of(trainer)
        if dm.has_decision(task, batch):  # already taken before a resume
            return
        evaluator = _find_evaluator(trainer)
        if self.fresh_probes and evaluator is not None:
            evaluator.ensure_fresh_probe(trainer, trainer.lightning_module)
        losses = evaluator.latest_probe_losses(dm.num_tasks) if evaluator is not None else [None] * dm.num_tasks
        batches = dm.batches_for(task)
        signals = MixtureSignals(
            task_index=task,
            num_tasks=dm.num_tasks,
            batch_in_task=batch,
            step=self.global_step_of(trainer, batch),
            steps_in_task=dm.steps_for(task),
            progress=batch / batches,
            probe_losses=[loss if j <= task else None for j, loss in enumerate(losses)],
            source_sizes=[dm.memory.size(j) for j in range(task)] + [len(dm.train_tasks[task].train)],
        )
        weights = [float(w) for w in self.decide(signals)]
        entry_weights = self.entry_weights(signals)
        weights, entry_weights = trainer.strategy.broadcast((weights, entry_weights), src=0)
        dm.set_mixture(weights, from_batch=batch, task_index=task, entry_weights=entry_weights)
        self.decisions.append({"task": task, "batch": batch, "weights": weights})

    def state_dict(self) -> dict[str, Any]:
        return {"decisions": list(self.decisions), "task_events": self.task_events()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.decisions = list(state_dict.get("decisions", []))
        self.load_task_events(state_dict)


def _find_evaluator(trainer: pl.Trainer) -> Any:
    """The registered ``probes`` service (the ForgettingEvaluator), or None."""
    module = trainer.lightning_module
    return module.continual.service("probes") if hasattr(module, "continual") else None


def _only_current(signals: MixtureSignals) -> list[float]:
    return [1.0 if j == signals.task_index else 0.0 for j in range(signals.num_tasks)]


class NoReplay(MixtureController):
    """Sequential fine-tuning: every sample comes from the current task."""

    def decide(self, signals: MixtureSignals) -> list[float]:
        return _only_current(signals)


class FixedRatio(MixtureController):
    """A fixed share ``ratio`` of each batch is replay, spread uniformly over the earlier tasks.

    Args:
        ratio: fraction of each batch drawn from replay buffers, in [0, 1].
    """

    def __init__(self, ratio: float = 0.2) -> None:
        super().__init__(decision_interval=None)
        if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
            raise ConfigError(f"FixedRatio.ratio={ratio!r} must lie in [0, 1]")
        self.ratio = float(ratio)

    def decide(self, signals: MixtureSignals) -> list[float]:
        k = signals.task_index
        if k == 0:
            return _only_current(signals)
        return [self.ratio / k if j < k else (1.0 - self.ratio if j == k else 0.0) for j in range(signals.num_tasks)]


class Proportional(MixtureController):
    """Each accessible source (earlier buffers and the current task) weighted by its latest probe loss.

    Sources not probed yet get the mean of the probed ones (uniform before any probe).

    Args:
        decision_interval: optimizer steps between decisions.
    """

    needs_probes = True

    def __init__(self, decision_interval: int = 50) -> None:
        super().__init__(decision_interval=decision_interval)

    def decide(self, signals: MixtureSignals) -> list[float]:
        k = signals.task_index
        seen = [signals.probe_losses[j] for j in range(k + 1)]
        known = [loss for loss in seen if loss is not None and loss > 0]
        fill = sum(known) / len(known) if known else 1.0
        weights = [(loss if loss is not None and loss > 0 else fill) for loss in seen]
        return weights + [0.0] * (signals.num_tasks - k - 1)


class SizeProportional(MixtureController):
    """Each accessible source weighted by its number of entries: replay buffers and the current task's data.

    This is "concatenate the buffers with the new task's data and shuffle" (OPR's and most replay
    codebases' mixing, methods.md §5f.6) expressed as mixture weights: a sample is equally likely to
    be any entry of the union. The replay share is ``Σ|buffer_j| / (Σ|buffer_j| + |task_k|)``, decided
    once per task, from the sizes the buffers have when the task starts.
    """

    def __init__(self) -> None:
        super().__init__(decision_interval=None)

    def decide(self, signals: MixtureSignals) -> list[float]:
        k = signals.task_index
        weights = [float(size) for size in signals.source_sizes[: k + 1]]
        return weights + [0.0] * (signals.num_tasks - k - 1)
