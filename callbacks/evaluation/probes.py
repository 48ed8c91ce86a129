"""The probe service: cheap loss-only probes of the seen tasks, the signals that loss-reading controllers use.

``ForgettingEvaluator`` owns one :class:`ProbeLosses` and registers itself as the module's ``probes``
service (``pl_module.continual.service("probes")``); controllers call ``latest_probe_losses`` and
``ensure_fresh_probe`` on it. A probe is the teacher-forced loss of each seen task's ``probe`` split,
computed on equal-sized shards (padded with a repeat whose loss is dropped: under FSDP every rank must
run the same forwards) and summed over ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_cit.contract import ShardPlan


class ProbeLosses:
    """The latest probe loss per task, with the step it was measured at (checkpointed by the evaluator)."""

    def __init__(self) -> None:
        self.losses: dict[int, tuple[int, float]] = {}
        self.last_probe_step = -1
        self.fresh = (-1, 0)  # (step, tasks covered) of the latest probe-split losses, if they are still the latest

    def latest(self, num_tasks: int) -> list[float | None]:
        """The latest probe loss of each trained task (None where none was measured yet)."""
        return [self.losses[j][1] if j in self.losses else None for j in range(num_tasks)]

    def probe(self, trainer: Any, pl_module: Any, tasks: list[Any], current: int) -> dict[str, float]:
        """Loss-only probe of ``tasks[: current + 1]`` (every rank must call it); returns the metrics to log."""
        step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        metrics = {}
        for j, task in enumerate(tasks[: current + 1]):
            shard = ShardPlan(task.probe, trainer.world_size, trainer.global_rank)
            local = shard.keep(pl_module.sample_losses(shard.local)) if shard.local else []
            # the rank's mean times its count (not a plain sum): the same float arithmetic as before the probe service
            loss_sum = float(sum(local) / len(local)) * len(local) if local else 0.0
            totals = trainer.strategy.reduce(torch.tensor([loss_sum, float(len(local))], device=pl_module.device), reduce_op="sum")
            loss = float(totals[0] / totals[1].clamp(min=1))
            self.losses[j] = (step, loss)
            metrics[f"probe/loss/{task.spec.name}"] = loss
        self.fresh = (step, current + 1)
        if was_training:
            pl_module.train()
        return metrics

    def is_fresh(self, step: int, tasks_covered: int) -> bool:
        return self.fresh == (step, tasks_covered)

    def record_row(self, step: int, losses: list[float | None]) -> None:
        """A score row's eval-split losses become the signals too (the controllers' view at a task start); unscored cells are skipped."""
        for j, loss in enumerate(losses):
            if loss is not None:
                self.losses[j] = (step, loss)
        self.fresh = (-1, 0)  # eval-split losses: a trend against the probe split would mean nothing

    def state_dict(self) -> dict[str, Any]:
        return {"probe": {int(k): [int(v[0]), float(v[1])] for k, v in self.losses.items()}, "last_probe_step": self.last_probe_step,
                "fresh_probe": list(self.fresh)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = {int(k): (int(v[0]), float(v[1])) for k, v in state.get("probe", {}).items()}
        self.last_probe_step = int(state.get("last_probe_step", -1))
        self.fresh = tuple(int(v) for v in state.get("fresh_probe", (-1, 0)))


__all__ = ["ProbeLosses"]
