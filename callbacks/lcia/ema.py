"""EMA of the *trainable* parameters: ``AdapterEMA`` (fixed weight) and LCIA's ``DynamicEMA``.

Lightning's own ``EMAWeightAveraging`` does not fit continual instruction tuning: it deep-copies the
whole LightningModule (a frozen 8B base included), cannot work on sharded models and has one fixed
decay. Here the average covers only the parameters that train (the LoRA weights under PEFT; every
trainable parameter otherwise), lives next to them on the same device and shard, and is updated with
``torch._foreach_*`` kernels: under FSDP every rank averages its own shard, nothing is gathered.

Per task (task boundaries come from the module's task clock, :class:`lightning_cit.contract.TaskClock`:
one fit per task, one fit with epoch = task, or several epochs per task all work the same):

1. at the start of a task the average restarts from the live weights (``reset_at_task_start``),
   as in the official LCIA code where every task is a fresh process: θ*_0 = the previous task's weights;
2. after every optimizer step (``should_update`` decides) θ* ← (1 − w)·θ* + w·θ, tensor by tensor,
   where w, the weight on the *new* parameters, is ``1 − decay`` here and LCIA's dynamic weight in
   :class:`DynamicEMA`;
3. at the end of the task the average is copied into the model (``copy_at_task_end``; LCIA's
   ``ema_replace``), so the next task and the task-end evaluation start from it. Like Lightning's
   ``WeightAveraging`` the average is also swapped in for validation and testing and copied into
   the model when training ends.

Put it *before* :class:`~lightning_cit.callbacks.ForgettingEvaluator`, ``OnPolicyReplay`` and
``JointFlashbackAdaptation`` (and after ``InstructionGrouping``) in ``trainer.callbacks`` so the task-end
scores, rollouts and snapshots are those of the averaged weights (the contract's order check raises otherwise).

Checkpoint layout (``state_dict``): ``ema`` ({parameter name: tensor}), ``latest_update_step`` (int),
``task`` (task index of the state), ``active`` (bool: averaging in this task), ``tracked`` (the names of
the parameters averaged in this task: those trainable at its start); :class:`DynamicEMA`
adds ``prev_grad`` (and ``prev_param`` for the paper rule) and the running ``stats``.

Not supported: parameters that change shape or name mid-task; under FSDP the average is a per-rank
shard, so checkpoint with ``state_dict_type="sharded"`` (a full state dict keeps rank 0's shard only).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_cit.contract import ContinualCallback, ContractError, Needs, sharded
from lightning_cit.errors import ConfigError

WHEN = ("always", "after_first_task", "reused_group")
RULES = ("code", "paper")


class AdapterEMA(ContinualCallback):
    """Exponential moving average of the trainable parameters with a fixed weight (see module docstring).

    Args:
        decay: β, the weight on the old average: θ* ← β·θ* + (1 − β)·θ.
        update_every_n_steps: optimizer steps between updates.
        when: in which tasks the average runs: ``always``; ``after_first_task`` (the Continual-NExT
            recipe: the first task trains plainly); ``reused_group`` (the CoIN recipe: only in tasks that
            reuse an existing adapter group of :class:`~lightning_cit.callbacks.InstructionGrouping`).
        copy_at_task_end: copy the average into the model when a task ends (LCIA's ``ema_replace``).
        reset_at_task_start: restart the average from the live weights at every task start.
    """

    def __init__(
        self,
        decay: float = 0.99,
        update_every_n_steps: int = 1,
        when: str = "always",
        copy_at_task_end: bool = True,
        reset_at_task_start: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"{type(self).__name__}.decay={decay} must lie in [0, 1)")
        if update_every_n_steps < 1:
            raise ConfigError(f"{type(self).__name__}.update_every_n_steps={update_every_n_steps} must be >= 1")
        if when not in WHEN:
            raise ConfigError(f"{type(self).__name__}.when={when!r} is unknown; valid: {', '.join(WHEN)}")
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.when = when
        self.copy_at_task_end = copy_at_task_end
        self.reset_at_task_start = reset_at_task_start
        self.ema: dict[str, torch.Tensor] = {}
        self.active = False
        self.task = -1
        self._latest_update_step = 0
        self._tracked: list[tuple[str, torch.nn.Parameter]] | None = None
        self._tracked_names: list[str] = []
        self._grouping: Any = None
        self._swapped = False

    needs = Needs()
    roles = ("average",)

    # ------------------------------------------------------------------------- override points
    def should_update(self, step_idx: int, task_index: int) -> bool:
        """Whether to update after optimizer step ``step_idx`` (zero-based) of task ``task_index``."""
        return (step_idx + 1) % self.update_every_n_steps == 0

    def new_weights(self, trainer: pl.Trainer, params: list[torch.Tensor], averages: list[torch.Tensor]) -> list[torch.Tensor] | float:
        """The weight w on the new parameters, one per tensor or one for all: θ* ← (1 − w)·θ* + w·θ."""
        return 1.0 - self.decay

    # ------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.when == "reused_group":
            self._grouping = pl_module.continual.service("instruction_groups")
            if self._grouping is None:
                raise ContractError(f"{type(self).__name__}(when='reused_group') needs an InstructionGrouping callback before it in trainer.callbacks")

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self._latest_update_step = trainer.global_step  # a new fit (one fit per task) restarts the trainer's step count
        self._start_task(pl_module, task)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._ensure_tracked(pl_module)

    def _ensure_tracked(self, pl_module: pl.LightningModule) -> None:
        if self._tracked is None:  # resumed mid-task: the averages and the tracked names came from the checkpoint
            params = dict(pl_module.named_parameters())
            self._tracked = [(n, params[n]) for n in self._tracked_names]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step_idx = trainer.global_step - 1
        if trainer.global_step <= self._latest_update_step:  # no optimizer step in this batch (accumulation)
            return
        self._latest_update_step = trainer.global_step
        if self.active and self.should_update(step_idx, self.task):
            self._update(trainer)

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self._ensure_tracked(pl_module)  # a resume from a checkpoint of the task's last step replays only its end
        if self.copy_at_task_end and self.active:
            self._copy_into_model()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.active and not self.copy_at_task_end:
            self._copy_into_model()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap()

    # ------------------------------------------------------------------------- mechanics
    @staticmethod
    def _trainable(pl_module: pl.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]

    def _is_active(self, task: int) -> bool:
        if self.when == "after_first_task":
            return task > 0
        if self.when == "reused_group":
            return self._grouping.reused(task)
        return True

    def _start_task(self, pl_module: pl.LightningModule, task: int) -> None:
        self.task = task
        self.active = self._is_active(task)
        self._tracked = self._trainable(pl_module)
        if self.reset_at_task_start or any(n not in self.ema for n, _ in self._tracked):
            for name, param in self._tracked:
                if self.reset_at_task_start or name not in self.ema:
                    self.ema[name] = param.detach().clone()
        self.on_average_start(task)
        rank_zero_info(f"{type(self).__name__}: task {task} {'averages' if self.active else 'trains plainly (no average)'} {len(self._tracked)} tensors")

    def on_average_start(self, task: int) -> None:
        """Subclass hook: clear per-task state (called after the average restarted)."""

    def _lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [p.detach() for _, p in self._tracked]
        averages = []
        for (name, param) in self._tracked:
            average = self.ema[name]
            if average.device != param.device:
                average = self.ema[name] = average.to(param.device)
            averages.append(average)
        return params, averages

    @torch.no_grad()
    def _update(self, trainer: pl.Trainer) -> None:
        params, averages = self._lists()
        weights = self.new_weights(trainer, params, averages)
        torch._foreach_lerp_(averages, params, weights)

    @torch.no_grad()
    def _copy_into_model(self) -> None:
        params, averages = self._lists()
        torch._foreach_copy_(params, averages)

    @torch.no_grad()
    def _swap(self) -> None:
        if not self.active or self._tracked is None:
            return
        params, averages = self._lists()
        live = torch._foreach_mul(params, 1.0)
        torch._foreach_copy_(params, averages)
        torch._foreach_copy_(averages, live)

    # ------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": {n: t.detach().cpu() for n, t in self.ema.items()},
            "latest_update_step": self._latest_update_step,
            "task": self.task,
            "active": self.active,
            "tracked": [n for n, _ in self._tracked or []],
            "task_events": self.task_events(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema = {n: t.clone() for n, t in state_dict["ema"].items()}
        self._latest_update_step = int(state_dict["latest_update_step"])
        self.task = int(state_dict["task"])
        self.active = bool(state_dict["active"])
        self._tracked_names = list(state_dict.get("tracked", []))
        self._tracked = None
        self.load_task_events(state_dict)


class DynamicEMA(AdapterEMA):
    """LCIA's self-adaptive EMA weight, one per parameter tensor, from layer-level L1 norms.

    With a = ‖θ_t − θ*_{t−1}‖₁ (distance of the stepped weights to the average), b = ‖g_t‖₁ (the
    gradient after clipping, "L′") and c = ‖g_t − g_{t−1}‖₁ (gradient change, the finite-difference "L″"):

    - ``rule="code"`` (default) follows the official code (``CoIN/peft/tuners/lora.py::ema_update``):
      w = scale·(1 + b)/(a·c) is the weight on the **new** parameters; ``scale`` is 2 in CoIN (0.01 in
      Continual-NExT) and w falls back to ``fallback`` (0.01 in CoIN, 0.001 in NExT) whenever it is not
      in (0, 1), including the first step of a task, which has no previous gradient.
    - ``rule="paper"`` follows the paper's Taylor/Lagrange closed form (methods.md §4a):
      β_t = (L′ + 1)/((θ_t − θ*_{t−1})·L″) is the weight on the **old** average, with the literal
      finite-difference Hessian L″ = c/d, d = ‖θ_t − θ_{t−1}‖₁ (this keeps the previous parameters, one
      more copy); w = 1 − β_t, and the fallback again applies outside (0, 1). ``scale`` multiplies β_t
      (default 1 for this rule).

    Where they differ: the code uses the formula's value as the weight on the new parameters, the
    paper as the weight on the old ones; the code drops the division of c by the parameter change and
    adds a scale. Divisions are guarded explicitly: a zero or non-finite denominator takes the fallback.

    Under DDP every rank holds the same (all-reduced) gradients; the per-tensor norms are still
    averaged over ranks so every rank uses bit-identical weights. Under FSDP each rank holds a shard,
    and the shard norms are summed into the full tensor's L1 norm. One all-reduce of 3-4 floats per
    tensor per step either way.

    Args:
        rule: ``code`` or ``paper`` (see above).
        scale: multiplier of the formula (default 2.0 for ``code``, 1.0 for ``paper``).
        fallback: the weight on the new parameters when the formula leaves (0, 1).
        decay: unused by the dynamic rule (kept for the parent's interface).
        update_every_n_steps, when, copy_at_task_end, reset_at_task_start: as in :class:`AdapterEMA`.
    """

    def __init__(
        self,
        rule: str = "code",
        scale: float | None = None,
        fallback: float = 0.01,
        update_every_n_steps: int = 1,
        when: str = "always",
        copy_at_task_end: bool = True,
        reset_at_task_start: bool = True,
        decay: float = 0.99,
    ) -> None:
        super().__init__(decay, update_every_n_steps, when, copy_at_task_end, reset_at_task_start)
        if rule not in RULES:
            raise ConfigError(f"DynamicEMA.rule={rule!r} is unknown; valid: {', '.join(RULES)}")
        if not 0.0 < fallback < 1.0:
            raise ConfigError(f"DynamicEMA.fallback={fallback} must lie in (0, 1)")
        self.rule = rule
        self.scale = (2.0 if rule == "code" else 1.0) if scale is None else float(scale)
        self.fallback = fallback
        self.prev_grad: dict[str, torch.Tensor] = {}
        self.prev_param: dict[str, torch.Tensor] = {}
        self.stats = _zero_stats()
        self.task_stats: dict[int, dict[str, Any]] = {}  # the same counters per task
        self.last_weights: torch.Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        pl_module.continual.register_scores_section(type(self).__name__, self.scores_section)

    def scores_section(self) -> dict[str, Any]:
        """Written to ``scores.json`` under ``methods.DynamicEMA``: how often the rule acted (the rest is the fallback).

        ``fallback_rate``: mean over updates of the share of tensors whose w was the fallback;
        ``updates_with_fallback_rate``: updates where at least one tensor took it, over all updates;
        ``formula_fallback_rate``: ``fallback_rate`` without the updates that have no previous gradient
        (a task's first, where the fallback is by construction, counted in ``no_history_updates``);
        ``mean_weight``: mean w on the new parameters. The same per task under ``per_task``.
        """
        return {"rule": self.rule, "scale": self.scale, "fallback": self.fallback, "when": self.when,
                **_summary(self.stats), "per_task": {str(t): _summary(v) for t, v in sorted(self.task_stats.items())}}

    def on_average_start(self, task: int) -> None:
        # the official code starts every task in a fresh process: no previous gradient carries over
        self.prev_grad, self.prev_param = {}, {}

    def new_weights(self, trainer: pl.Trainer, params: list[torch.Tensor], averages: list[torch.Tensor]) -> list[torch.Tensor]:
        names = [n for n, _ in self._tracked]
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for _, p in self._tracked]
        have_history = all(n in self.prev_grad for n in names)
        prev_grads = _history(self.prev_grad, names, grads)
        prev_params = _history(self.prev_param, names, params) if self.rule == "paper" else None
        stacked = self._reduce(trainer, self.norms(params, averages, grads, prev_grads, prev_params))
        weights = self.dynamic_weight(*stacked) if have_history else torch.full_like(stacked[0], self.fallback)
        # the history tensors are the stored ones (or the current ones on a task's first step): refill in place
        _remember(self.prev_grad, names, grads, prev_grads)
        if self.rule == "paper":
            _remember(self.prev_param, names, params, prev_params)
        self.last_weights = weights
        # running sums stay tensors: a float() here would synchronize with the GPU at every step
        fell_back = weights == self.fallback
        for stats in (self.stats, self.task_stats.setdefault(self.task, _zero_stats())):
            stats["updates"] += 1
            stats["no_history"] += int(not have_history)
            stats["fallbacks"] = stats["fallbacks"] + fell_back.float().mean()
            stats["updates_with_fallback"] = stats["updates_with_fallback"] + fell_back.any().float()
            stats["weight_sum"] = stats["weight_sum"] + weights.mean()
        pl_module = trainer.lightning_module
        pl_module.log("ema/weight_new_mean", weights.mean(), on_step=True, on_epoch=False, batch_size=1)
        return [w.to(p.dtype) for w, p in zip(weights.unbind(), params)]

    @staticmethod
    def norms(params, averages, grads, prev_grads, prev_params=None, vectorized: bool | None = None) -> torch.Tensor:
        """Per-tensor L1 norms a, b, c (and d with ``prev_params``) as the rows of one tensor.

        ``vectorized`` (default: on CUDA) uses ``torch._foreach_*`` multi-tensor kernels: a handful of
        launches instead of 3-4 per tensor. On CPU the per-tensor loop is faster (its temporaries stay
        in cache; ``python benchmarks/ema_overhead.py`` measured the foreach norms 5x slower there).
        """
        if vectorized is None:
            vectorized = bool(params) and params[0].is_cuda
        if vectorized:
            pairs = [(params, averages), (grads, None), (grads, prev_grads)] + ([(params, prev_params)] if prev_params is not None else [])
            rows = [torch.stack(torch._foreach_norm(x if y is None else torch._foreach_sub(x, y), 1)) for x, y in pairs]
        else:
            rows = [torch.stack([(p - a).abs().sum() for p, a in zip(params, averages)]),
                    torch.stack([g.abs().sum() for g in grads]),
                    torch.stack([(g - h).abs().sum() for g, h in zip(grads, prev_grads)])]
            if prev_params is not None:
                rows.append(torch.stack([(p - q).abs().sum() for p, q in zip(params, prev_params)]))
        return torch.stack(rows).float()

    def dynamic_weight(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        """The weight on the new parameters per tensor from the L1 norms (see the class docstring)."""
        if self.rule == "code":
            denominator = a * c
            numerator = self.scale * (1.0 + b)
        else:
            hessian = torch.where(d > 0, c / d.clamp(min=torch.finfo(d.dtype).tiny), torch.zeros_like(c))
            denominator = a * hessian
            numerator = self.scale * (1.0 + b)
        ok = denominator > 0
        value = torch.where(ok, numerator / denominator.clamp(min=torch.finfo(a.dtype).tiny), torch.full_like(a, float("nan")))
        if self.rule == "paper":
            value = 1.0 - value  # β_t weighs the old average; w = 1 − β_t weighs the new parameters
        valid = ok & torch.isfinite(value) & (value > 0) & (value < 1)
        return torch.where(valid, value, torch.full_like(value, self.fallback))

    @staticmethod
    def _reduce(trainer: pl.Trainer, norms: torch.Tensor) -> torch.Tensor:
        if trainer.world_size <= 1:
            return norms
        # under FSDP each rank holds a shard: the shard norms sum to the full tensor's norm
        return trainer.strategy.reduce(norms, reduce_op="sum" if sharded(trainer) else "mean")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["prev_grad"] = {n: t.detach().cpu() for n, t in self.prev_grad.items()}
        state["prev_param"] = {n: t.detach().cpu() for n, t in self.prev_param.items()}
        state["stats"] = _plain(self.stats)
        state["task_stats"] = {int(t): _plain(v) for t, v in self.task_stats.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.prev_grad = {n: t.clone() for n, t in state_dict.get("prev_grad", {}).items()}
        self.prev_param = {n: t.clone() for n, t in state_dict.get("prev_param", {}).items()}
        self.stats = {**_zero_stats(), **state_dict.get("stats", {})}  # checkpoints before issue 19 lack some counters
        self.task_stats = {int(t): {**_zero_stats(), **v} for t, v in state_dict.get("task_stats", {}).items()}


def _zero_stats() -> dict[str, Any]:
    return {"updates": 0, "no_history": 0, "fallbacks": 0.0, "updates_with_fallback": 0.0, "weight_sum": 0.0}


def _plain(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in stats.items()}


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    s = _plain(stats)
    n, fresh = s["updates"], s["updates"] - s["no_history"]
    return {"updates": n, "no_history_updates": s["no_history"],
            "fallback_rate": s["fallbacks"] / n if n else None,
            "updates_with_fallback_rate": s["updates_with_fallback"] / n if n else None,
            "formula_fallback_rate": (s["fallbacks"] - s["no_history"]) / fresh if fresh else None,
            "mean_weight": s["weight_sum"] / n if n else None}



def _history(store: dict[str, torch.Tensor], names: list[str], current: list[torch.Tensor]) -> list[torch.Tensor]:
    """The stored previous tensor of each name, on its parameter's device (``current``'s where none is stored)."""
    out = []
    for name, tensor in zip(names, current):
        previous = store.get(name)
        if previous is not None and previous.device != tensor.device:  # loaded from a checkpoint on CPU
            previous = store[name] = previous.to(tensor.device)
        out.append(tensor if previous is None else previous)
    return out


def _remember(store: dict[str, torch.Tensor], names: list[str], current: list[torch.Tensor], history: list[torch.Tensor]) -> None:
    """Make ``current`` the stored history: copy into the stored tensors, clone where none is stored yet."""
    for name, tensor, previous in zip(names, current, history):
        if name in store and previous is store[name]:
            previous.copy_(tensor)
        else:
            store[name] = tensor.clone()


__all__ = ["AdapterEMA", "DynamicEMA"]
