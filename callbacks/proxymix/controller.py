"""ProxyMix (Sharma et al., arXiv 2606.00400; methods.md §3): a learned replay controller, and Loss-Slope.

:class:`ProxyMixController` reads a policy file trained with PPO on a small proxy model
(``lightning-cit proxymix train``, :mod:`lightning_cit.callbacks.proxymix.commands`) and applies it, frozen, to any
run. Every ``decision_interval`` (δ) optimizer steps, and at every task start, it

1. probes the validation (probe-split) loss ℓ_i of every task seen so far (through the
   :class:`~lightning_cit.callbacks.ForgettingEvaluator`, fresh at the decision's step),
2. normalizes them per task with running statistics, Eq.3:
   ℓ̃_i = (ℓ_i − μ_i) / sqrt(v_i + ε) and Δℓ̃_i = (ℓ_i(t) − ℓ_i(t−δ)) / sqrt(v_i + ε)
   (:class:`NormalizedLosses`),
3. builds the state of Eq.4, s_t = [ℓ̄_1..ℓ̄_Tmax, Δℓ̄_1..Δℓ̄_Tmax, e_k, p_t] with zeros for future tasks,
4. runs the policy and sets the mixture of Eq.5, w = masked_softmax(a, m_i = 1[i ≤ k]), over the
   current task and the buffers of the earlier ones (future tasks get exactly 0 and are never sampled).

At transfer the mean action is used (deterministic). During PPO training (``explore``) the action is
sampled and every decision with a choice (k ≥ 1) is recorded with its reward, Eq.6-7:
  r_t = −Δℓ̃_k − λ·Σ_{i<k} max(0, Δℓ̃_i) / max(k, 1) + β·S_t,  S_t = RefusalAcc_harmful − γ·OverRefusal_benign
computed from the probes at the next decision (or at the end of training).

Decisions the paper leaves open (methods.md §3f), as decided here:

- Running statistics: Welford over the run (reset per episode), the first observation gives ℓ̃ = 0; Δ uses
  the task's current statistics for both ends, so it is the raw change in units of the task's spread.
  The spread is floored at ``std_floor·|μ_i|`` (policy spec): without a floor a task whose loss has
  been flat turns probe noise into large trends.
- Progress p_t is within the current task.
- The safety term S_t needs generated answers, so it is measured where the evaluator scores safety:
  at task ends. It is added to the reward of each task's last decision (β·S, S in [−1, 1]).
- λ = 1 (a unit rise of the average earlier-task loss costs as much as a unit fall of the current
  task's gains), β = 0.5 (safety at half that scale, so it cannot swamp the loss terms), γ = 1 (an
  over-refusal costs as much as a missed refusal: the evaluator's own safety score).
- No floor on the current task's share: the reward's −Δℓ̃_k term is what keeps fresh data flowing.

Budget-constrained action (``replay_share``, issue 19; not in the paper): the replay share of every
batch is fixed, so ProxyMix can stand in a column of methods at equal replay budget. The current task
gets ``1 − replay_share``; the policy only chooses the split over the earlier tasks, its masked softmax
renormalised over tasks < k (Eq.5 with ``m_i = 1[i < k]``); task 0 trains on itself alone. The same
constraint holds in explore mode, so a policy can be trained under it (``lightning-cit proxymix train``
reads the controller's init args from the fit config): the recorded mask is then ``1[i < k]``, so PPO's
log-probability and entropy cover only the logits that act, and a decision is recorded only where the
split is a choice (k ≥ 2). A policy trained without the constraint can be run with it (same state and action).

Checkpoint layout (``state_dict``): ``decisions`` (base class), ``losses`` (the running statistics),
``pending`` (the decision awaiting its reward), ``rollout`` (recorded transitions), ``rows_seen``,
``generator`` (action-sampling RNG) and ``policy_sha256`` (a resume with another policy file is refused).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning_cit.callbacks.mixture import MixtureController, MixtureSignals, _find_evaluator
from lightning_cit.callbacks.proxymix.policy import ActorCritic, PolicySpec, load_policy, masked_softmax

from lightning_cit.errors import ConfigError


class NormalizedLosses:
    """Eq.3: per-task running mean and variance (Welford) of the probe loss, and the normalized level and trend."""

    def __init__(self, std_floor: float = 0.1, clip: float = 5.0, eps: float = 1e-8) -> None:
        self.std_floor, self.clip, self.eps = std_floor, clip, eps
        self.count: dict[int, int] = {}
        self.mean: dict[int, float] = {}
        self.m2: dict[int, float] = {}
        self.last: dict[int, float] = {}

    def observe(self, losses: list[float | None]) -> tuple[list[float], list[float]]:
        """Add one observation per task (None: skip) and return (ℓ̃_i, Δℓ̃_i) for every position (0 where unknown)."""
        levels, trends = [], []
        for i, loss in enumerate(losses):
            if loss is None or not math.isfinite(loss):
                levels.append(0.0)
                trends.append(0.0)
                continue
            n = self.count.get(i, 0) + 1
            mean = self.mean.get(i, 0.0)
            delta = loss - mean
            mean += delta / n
            self.m2[i] = self.m2.get(i, 0.0) + delta * (loss - mean)
            self.count[i], self.mean[i] = n, mean
            spread = math.sqrt(max(self.m2[i] / n, (self.std_floor * abs(mean)) ** 2) + self.eps)
            previous = self.last.get(i)
            self.last[i] = loss
            levels.append(self._clip((loss - mean) / spread))
            trends.append(0.0 if previous is None else self._clip((loss - previous) / spread))
        return levels, trends

    def _clip(self, value: float) -> float:
        return max(-self.clip, min(self.clip, value))

    def state_dict(self) -> dict[str, Any]:
        return {"count": dict(self.count), "mean": dict(self.mean), "m2": dict(self.m2), "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = {int(k): int(v) for k, v in state["count"].items()}
        self.mean = {int(k): float(v) for k, v in state["mean"].items()}
        self.m2 = {int(k): float(v) for k, v in state["m2"].items()}
        self.last = {int(k): float(v) for k, v in state["last"].items()}


def build_state(levels: list[float], trends: list[float], task_index: int, progress: float, max_tasks: int) -> list[float]:
    """Eq.4: [ℓ̄ (T_max), Δℓ̄ (T_max), one-hot current task (T_max), progress]; future tasks are 0."""
    seen = task_index + 1
    level = [levels[i] if i < seen else 0.0 for i in range(max_tasks)]
    trend = [trends[i] if i < seen else 0.0 for i in range(max_tasks)]
    onehot = [1.0 if i == task_index else 0.0 for i in range(max_tasks)]
    return level + trend + onehot + [float(progress)]


class ProxyMixController(MixtureController):
    """ProxyMix: a frozen PPO policy chooses the mixture over the current task and the replay buffers (module docstring).

    Args:
        policy_path: the policy file written by ``lightning-cit proxymix train``.
        decision_interval: δ, optimizer steps between decisions (paper: 50).
        explore: sample actions and record transitions (PPO training); false = the deterministic mean action.
        forgetting_weight: λ of Eq.6.
        safety_weight: β of Eq.6 (used when a task with harmful/benign labels is evaluated).
        over_refusal_weight: γ of Eq.7.
        seed: seed of the action sampling (explore mode).
        replay_share: fixed replay share of every batch from task 2 on; the policy chooses only its split over
            the earlier tasks (module docstring). None = the policy chooses the whole mixture (the paper).
    """

    needs_probes = True
    fresh_probes = True

    def __init__(
        self,
        policy_path: str | None = "runs/proxymix/controller.pt",
        decision_interval: int = 50,
        explore: bool = False,
        forgetting_weight: float = 1.0,
        safety_weight: float = 0.5,
        over_refusal_weight: float = 1.0,
        seed: int = 0,
        replay_share: float | None = None,
    ) -> None:
        super().__init__(decision_interval=decision_interval)
        if replay_share is not None and (isinstance(replay_share, bool) or not isinstance(replay_share, (int, float))
                                         or not 0.0 <= float(replay_share) <= 1.0):
            raise ConfigError(f"ProxyMixController.replay_share={replay_share!r} must lie in [0, 1] or be null (the policy chooses the share)")
        self.replay_share = None if replay_share is None else float(replay_share)
        for name, value in (("forgetting_weight", forgetting_weight), ("safety_weight", safety_weight), ("over_refusal_weight", over_refusal_weight)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"ProxyMixController.{name}={value!r} must be a number >= 0")
        self.policy_path = policy_path
        self.explore = explore
        self.forgetting_weight = float(forgetting_weight)
        self.safety_weight = float(safety_weight)
        self.over_refusal_weight = float(over_refusal_weight)
        self.seed = seed
        self.policy: ActorCritic | None = None
        self.policy_sha256: str | None = None
        self.losses = NormalizedLosses()
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: dict[str, Any] | None = None
        self.rollout: list[dict[str, Any]] = []
        self.rows_seen = 0
        self._evaluator: Any = None

    def use_policy(self, policy: ActorCritic, explore: bool, seed: int) -> None:
        """Give the controller a policy object (PPO training does this for every episode) instead of reading ``policy_path``."""
        self.policy = policy
        self.policy_sha256 = None
        self.explore = explore
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._configure_losses()

    def _configure_losses(self) -> None:
        spec = self.policy.spec
        self.losses = NormalizedLosses(std_floor=spec.std_floor, clip=spec.state_clip)

    # ---------------------------------------------------------------------------------- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        pl_module.continual.register_scores_section(type(self).__name__, self.scores_section)
        if self.policy is None:
            if self.policy_path is None:
                raise ConfigError("ProxyMixController needs policy_path (a file from `lightning-cit proxymix train`)")
            self.policy, _ = load_policy(self.policy_path)
            with open(self.policy_path, "rb") as handle:
                self.policy_sha256 = hashlib.sha256(handle.read()).hexdigest()
            self._configure_losses()  # setup runs before a checkpoint's callback states are restored
        self.policy.eval()
        num_tasks = trainer.datamodule.num_tasks
        if num_tasks > self.policy.spec.max_tasks:
            raise ConfigError(
                f"the ProxyMix policy {self.policy_path!r} was built for at most {self.policy.spec.max_tasks} tasks "
                f"(policy spec max_tasks) but the sequence trains {num_tasks}; train a policy with policy.max_tasks >= {num_tasks}"
            )

    def decide(self, signals: MixtureSignals) -> list[float]:
        k = signals.task_index
        spec = self.policy.spec
        levels, trends = self.losses.observe(signals.probe_losses[: k + 1])
        self._close_pending(trends, self._new_safety())
        state = build_state(levels, trends, k, signals.progress, spec.max_tasks)
        constrained = self.replay_share is not None
        if constrained and k == 0:  # nothing to replay yet: no decision to take or record
            return [1.0 if i == 0 else 0.0 for i in range(signals.num_tasks)]
        # the logits that act: every seen task, or (constrained) only the earlier tasks' split
        mask = [1.0 if (i < k if constrained else i <= k) else 0.0 for i in range(spec.max_tasks)]
        step = self.policy.act(torch.tensor(state), torch.tensor(mask), deterministic=not self.explore, generator=self.generator)
        weights = masked_softmax(step["action"], torch.tensor(mask))[: signals.num_tasks].tolist()
        if constrained:
            weights = [self.replay_share * w if i < k else (1.0 - self.replay_share if i == k else 0.0) for i, w in enumerate(weights)]
        else:
            weights = [w if i <= k else 0.0 for i, w in enumerate(weights)]  # exact zeros for future tasks
        if self.explore and (k >= 2 if constrained else k >= 1):  # with one source (one old task) there is no choice to learn from
            self.pending = {"state": state, "action": step["action"].tolist(), "mask": mask, "log_prob": step["log_prob"],
                            "value": step["value"], "task": k, "step": signals.step}
        return weights

    def _close_pending(self, trends: list[float], safety: float | None) -> None:
        """Eq.6-7: the reward of the previous decision, from the trends measured now."""
        if self.pending is None:
            return
        k = self.pending["task"]
        past = [max(0.0, trends[i]) for i in range(k)]
        reward = -trends[k] - self.forgetting_weight * sum(past) / max(len(past), 1)
        if safety is not None:
            reward += self.safety_weight * safety
        self.rollout.append({**self.pending, "reward": reward, "done": False})
        self.pending = None

    def _new_safety(self) -> float | None:
        """S_t of a score row evaluated since the last decision, i.e. at the end of the pending decision's task (None: none)."""
        evaluator = self._evaluator
        if evaluator is None:
            return None
        rows, self.rows_seen = self.rows_seen, len(evaluator.rows)
        if len(evaluator.rows) == rows or rows == 0 or not evaluator.safety_rows:
            return None
        latest = evaluator.safety_rows[-1]
        return (latest["refusal_harmful"] - self.over_refusal_weight * latest["over_refusal_benign"]) / 100.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluator = _find_evaluator(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.pending is None:
            return
        # the last interval's reward: a fresh probe of every task after the final step
        evaluator = self._evaluator
        evaluator.ensure_fresh_probe(trainer, pl_module)
        k = trainer.datamodule.num_tasks - 1
        losses = evaluator.latest_probe_losses(k + 1)
        _, trends = self.losses.observe(losses)
        self._close_pending(trends, self._new_safety())
        if self.rollout:
            self.rollout[-1]["done"] = True

    # ---------------------------------------------------------------------------------- reporting
    def scores_section(self) -> dict[str, Any]:
        """Written to scores.json under ``methods.ProxyMixController``: the replay share chosen in each task and its split."""
        per_task: dict[int, list[float]] = {}
        splits: dict[int, list[list[float]]] = {}
        for decision in self.decisions:
            k, weights = decision["task"], decision["weights"]
            per_task.setdefault(k, []).append(1.0 - weights[k])
            replayed = sum(weights[:k])
            if k >= 1 and replayed > 0:
                splits.setdefault(k, []).append([w / replayed for w in weights[:k]])
        return {
            "policy_path": self.policy_path,
            "policy_sha256": self.policy_sha256,
            "explore": self.explore,
            "replay_share": self.replay_share,
            "decisions": len(self.decisions),
            "mean_replay_share_per_task": {str(k): sum(v) / len(v) for k, v in sorted(per_task.items())},
            # how the replay was split over the earlier tasks (fractions of the replay, summing to 1), mean over the task's decisions
            "mean_split_per_task": {str(k): [sum(col) / len(v) for col in zip(*v)] for k, v in sorted(splits.items())},
            "episode_reward": sum(t["reward"] for t in self.rollout) if self.explore else None,
        }

    # ---------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "losses": self.losses.state_dict(),
            "pending": self.pending,
            "rollout": list(self.rollout),
            "rows_seen": self.rows_seen,
            "generator": self.generator.get_state(),
            "policy_sha256": self.policy_sha256,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.losses.load_state_dict(state_dict["losses"])
        self.pending = state_dict["pending"]
        self.rollout = list(state_dict["rollout"])
        self.rows_seen = int(state_dict["rows_seen"])
        self.generator.set_state(state_dict["generator"])
        saved = state_dict.get("policy_sha256")
        if saved is not None and self.policy_sha256 is not None and saved != self.policy_sha256:
            raise ConfigError(
                f"the checkpoint was trained with another ProxyMix policy (sha256 {saved[:12]}) than {self.policy_path!r} "
                f"({self.policy_sha256[:12]}); resume with the same policy file"
            )


class LossSlope(MixtureController):
    """The paper's Loss-Slope baseline: replay weights ∝ max(0, Δℓ̃_i), the normalized loss trend of Eq.3.

    The paper gives the rule, not what it does with the current task (whose loss mostly falls, so the
    rule alone would starve it). Here the current task keeps ``1 - replay_ratio`` of every batch and the
    replay share goes to the earlier tasks whose loss is rising, in proportion to the rise (uniformly
    when none is rising); so it is budget-matched to ``FixedRatio(replay_ratio)`` (Random 30% by default).

    Args:
        replay_ratio: share of every batch drawn from the earlier tasks' buffers.
        decision_interval: optimizer steps between decisions.
        std_floor: floor of the normalizing spread as a fraction of the task's mean loss (as ProxyMix's default spec).
    """

    needs_probes = True
    fresh_probes = True

    def __init__(self, replay_ratio: float = 0.3, decision_interval: int = 50, std_floor: float = PolicySpec.std_floor) -> None:
        super().__init__(decision_interval=decision_interval)
        if not isinstance(replay_ratio, (int, float)) or not 0.0 <= float(replay_ratio) <= 1.0:
            raise ConfigError(f"LossSlope.replay_ratio={replay_ratio!r} must lie in [0, 1]")
        self.replay_ratio = float(replay_ratio)
        self.losses = NormalizedLosses(std_floor=std_floor, clip=PolicySpec.state_clip)

    def decide(self, signals: MixtureSignals) -> list[float]:
        k = signals.task_index
        _, trends = self.losses.observe(signals.probe_losses[: k + 1])
        weights = [0.0] * signals.num_tasks
        if k == 0:
            weights[0] = 1.0
            return weights
        rises = [max(0.0, trends[i]) for i in range(k)]
        total = sum(rises)
        shares = [r / total for r in rises] if total > 0 else [1.0 / k] * k
        for i in range(k):
            weights[i] = self.replay_ratio * shares[i]
        weights[k] = 1.0 - self.replay_ratio
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "losses": self.losses.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.losses.load_state_dict(state_dict["losses"])
