"""MSSR: memory-strength replay (Lu, He, Chen, Zha; arXiv 2603.09892), as a mixture controller.

Every buffer entry carries a memory state: strength ``m`` and stability ``S``. Between reviews ``m``
decays with a hazard driven by the entry's loss; a review (the entry is replayed and trained on)
resets ``m`` to 1 and consolidates ``S`` so later decay is slower. The **sampler** part draws weak
memories more often (``p_i ∝ m_i^-ζ``, Eq.10); the **scheduler** part sets the replay ratio
``λ(t)`` (Eq.9) and the expanding replay events (Eq.8). Both run through the ordinary mixture
protocol: per-source weights plus per-entry weights inside the buffers, decided ahead and keyed by
batch, so decisions are identical on every rank and reproduce exactly on resume.

Equations (paper numbering) and where they live:

- Eq.4 hazard ``h_i = (α + γ_d φ(ℓ̂_i)) / S_i`` with ``φ(x) = 1/(1+e^{-k(x-c)})`` (Eq.20): :meth:`MemoryStates.review`.
- Eq.13-14 loss denoising: EMA ``ℓ̃`` (β_ema = 0.95), normalized by the 5th/95th percentiles of the
  buffer's EMA losses and clipped to [0, 1]: :meth:`MemoryStates.review`.
- Lemma A.1 closed form between reviews, evaluated lazily when read: ``m(t) = m* e^{-h (t - t*)}``
  (kept in log space, so long gaps cannot underflow): :meth:`MemoryStates.log_strength`.
- Eq.5 review and consolidation ``S⁺ = clip(S + η_s (S_max - S)^β e^{-ρ Δt} (1 - m⁻)^{γ_s}, S_min, S_max)``,
  then ``m ← 1``, ``t* ← t`` (σ_s = 0, so no noise term): :meth:`MemoryStates.review`.
- Eq.8 expanding intervals ``Δt(k+1) = Δt(k) (1 + η_p e^{-ρ_p k})``, ``Δt(1) = 100``, k from 1
  (100, 148, 214, 307, ...): :func:`replay_event_steps`.
- Eq.9 ratio ``λ(t) = λ0 e^{-β_r t} + λ_min``; Appendix Eq.29's ``λ_min + (λ0 - λ_min) e^{-β_r t}`` is
  ``ratio_formula="eq29"``: :func:`replay_ratio`.
- Eq.10 sampling ``p_i ∝ m_i^-ζ`` (not §3.3's ``(1-m)^β e^{ρΔt}``; Table 12 confirms Eq.10): :meth:`MSSRReplay.entry_weights`.

Choices where the paper contradicts itself or is silent (methods.md §7f):

- *When replay happens* (``replay_mode``): ``"every_batch"`` (default; Table 12: every batch mixes
  replay at ratio λ(t), re-decided every ``decision_interval`` steps) or ``"event"`` (Algorithm 1:
  replay only at the Eq.8 event steps, each for ``event_length`` steps at ratio λ(t_k)). The default
  follows the training table because a handful of one-step events replays almost nothing at
  benchmark scale; the event reading stays available for the ablation.
- *Time* ``t`` is the global optimizer step (the paper's λ decays over the whole run).
- *Unseen losses*: an entry never reviewed has no EMA loss; it gets ``ℓ̂ = c`` (the sigmoid's centre),
  i.e. the median hazard. Its initial state is ``m = 1``, ``S = S_min`` at the step its task ended.
- *Allocation across tasks*: the paper keeps one pooled buffer; here each finished task has its own
  buffer, and a buffer's source weight is proportional to the sum of its entries' ``m^-ζ``, so the
  per-entry probability over the pooled entries is exactly Eq.10.
- *Re-scoring* (Table 12: "refresh every 50 steps; recompute stale losses"): every ``rescore_interval``
  steps every buffer entry's loss is recomputed (no gradient) and fed to its EMA and hazard; ``m`` stays
  continuous (the closed form is re-anchored). This is not a review: ``m`` is not reset, ``S`` unchanged.
  The staleness cap is implied (every entry is re-scored); buffer refresh (adding/replacing entries)
  is not done: buffers are filled once, when their task ends.

Hazards per review interval (``hazard_unit``, issue 19). Eq.4's hazard is a rate per optimizer step,
and Table 9's defaults were set where an entry is reviewed about every ``R_paper = 1024 / (256 × 0.3) ≈ 13.3``
steps (1024 entries, batch 256, λ ≈ 0.3). With ``hazard_unit="review"`` the per-step rates are read as
"per step at the paper's review interval" and converted at every task start to the run's expected
review interval ``R = N / (B λ̄)`` (``N`` entries in all buffers, ``B`` the global batch, ``λ̄`` the mean
of ``ratio_at`` over the task's steps): a rate ``r`` becomes ``r R_paper / R`` per step, so the decay
*between two reviews* is the paper's at any scale. Which rates, equation by equation:

- Eq.4 ``h = (α + γ_d φ(ℓ̂)) / S``: ``α`` and ``γ_d`` are per-step rates (``m`` decays as ``e^{-h Δt}``, Lemma
  A.1): converted. ``φ`` (``k``, ``c``) maps a normalized loss to [0, 1] and ``S`` is a divisor: unitless.
- Eq.5 ``S⁺ = S + η_s (S_max - S)^β e^{-ρ Δt} (1 - m⁻)^{γ_s}``: ``ρ`` multiplies the gap ``Δt`` in steps, the
  same argument as ``α`` (at ``R ≈ 30 R_paper`` an unconverted ``e^{-ρ Δt}`` is ``e^{-4}`` and no review
  consolidates): converted. ``η_s`` is a gain per review, ``β``, ``γ_s``, ``S_min``, ``S_max`` are unitless: kept.
- Eq.13 ``β_ema``: one EMA update per review (or re-scoring), not per step: kept.
- Not memory rates, so kept in steps: Eq.8's ``first_interval`` and Eq.9's ``β_r`` (the schedule; see
  ``budget``) and ``rescore_interval`` (how stale a loss may get, a cost knob).

The conversion is fixed for a whole task (hazards stay piecewise constant, so Lemma A.1's closed form
holds): ``λ̄`` averages the ratio the schedule will use over the task's steps (in ``event`` mode the
zero steps between events count, so ``R`` is the expected interval of the replay actually drawn). At a
task start the existing entries are re-anchored (``m`` continuous) and their hazards multiplied by
new/old scale. Where ``R`` is undefined (task 0: no buffers; a task where ``λ̄ = 0``: no reviews
expected) the previous scale stays (1 before the first replay task; no entry exists before it).

Budget (``budget``): the schedule's free parameter (``lambda_0``, or ``fixed_ratio`` with
``schedule="fixed"``) is solved at setup so that the mean of ``ratio_at`` over every step where replay
is possible (tasks 2..T, 1-based) equals ``budget``; ``λ_min``, ``β_r`` and the event steps stay as
configured. ``ratio_at`` is affine in that parameter, so two evaluations give the solution exactly; a
budget outside the range the parameter's [0, 1] (and λ(t) ≤ 1) can reach is refused naming the range.
In ``every_batch`` mode the ratio drawn is ``ratio_at`` of each decision step held for
``decision_interval`` steps, so the drawn mean differs from ``budget`` by at most about
``λ0 β_r decision_interval`` (plus the sampler's randomness); ``event`` mode uses the per-step value.

Ablations (methods.md §7a): ``sampler="memory", schedule="fixed"`` is MSSR_spl (memory-aware sampling
at a constant ``fixed_ratio``); ``sampler="uniform", schedule="adaptive"`` is MSSR_sch; both memory
and adaptive is the full method.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning_cit.callbacks.mixture import MixtureController, MixtureSignals

from lightning_cit.contract import DATA_MIXTURE, ContractError, Needs, ShardPlan, gather_objects
from lightning_cit.errors import ConfigError

REPLAY_MODES = ("every_batch", "event")
HAZARD_UNITS = ("step", "review")
RATIO_FORMULAS = ("eq9", "eq29")


def replay_event_steps(first_interval: float, eta_p: float, rho_p: float, until: int) -> list[int]:
    """Eq.8 event steps ``t_1 = Δt(1)``, ``t_{k+1} = t_k + Δt(k+1)``, rounded, up to ``until``."""
    steps, interval, t, k = [], float(first_interval), float(first_interval), 1
    while t <= until:
        steps.append(round(t))
        interval *= 1.0 + eta_p * math.exp(-rho_p * k)
        t += interval
        k += 1
    return steps


def replay_ratio(step: int, lambda_0: float, lambda_min: float, beta_r: float, formula: str = "eq9") -> float:
    """Eq.9 ``λ0 e^{-β_r t} + λ_min`` or Appendix Eq.29 ``λ_min + (λ0 - λ_min) e^{-β_r t}``."""
    decay = math.exp(-beta_r * step)
    if formula == "eq9":
        return lambda_0 * decay + lambda_min
    return lambda_min + (lambda_0 - lambda_min) * decay


class MemoryStates:
    """Per-entry memory state of every buffer: lazy strength, stability, loss EMA (all float64)."""

    def __init__(
        self,
        alpha: float = 0.01,
        gamma_d: float = 0.2,
        k: float = 10.0,
        c: float = 0.5,
        beta_ema: float = 0.95,
        quantiles: tuple[float, float] = (0.05, 0.95),
        eta_s: float = 0.05,
        beta: float = 0.5,
        rho: float = 0.01,
        gamma_s: float = 1.0,
        s_min: float = 1.0,
        s_max: float = 10.0,
    ) -> None:
        self.alpha, self.gamma_d, self.k, self.c = alpha, gamma_d, k, c
        self.beta_ema, self.quantiles = beta_ema, quantiles
        self.eta_s, self.beta, self.rho, self.gamma_s = eta_s, beta, rho, gamma_s
        self.rates = (alpha, gamma_d, rho)  # the per-step rates as configured; set_time_scale multiplies them
        self.time_scale = 1.0
        self.s_min, self.s_max = s_min, s_max
        # per task: log m at the anchor step t* (the last review or hazard change), S, t*, the hazard h
        # in force since t*, the step of the last review, and the EMA loss (nan = never scored)
        self.log_m: dict[int, torch.Tensor] = {}
        self.stability: dict[int, torch.Tensor] = {}
        self.t_star: dict[int, torch.Tensor] = {}
        self.hazard: dict[int, torch.Tensor] = {}
        self.t_review: dict[int, torch.Tensor] = {}
        self.ema: dict[int, torch.Tensor] = {}

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.k * (x - self.c))

    def add_task(self, task: int, size: int, step: int) -> None:
        f64 = torch.float64
        self.log_m[task] = torch.zeros(size, dtype=f64)
        self.stability[task] = torch.full((size,), self.s_min, dtype=f64)
        self.t_star[task] = torch.full((size,), float(step), dtype=f64)
        self.t_review[task] = torch.full((size,), float(step), dtype=f64)
        # unseen loss: ℓ̂ = c, the median hazard
        self.hazard[task] = (self.alpha + self.gamma_d * self.phi(torch.full((size,), self.c, dtype=f64))) / self.s_min
        self.ema[task] = torch.full((size,), float("nan"), dtype=f64)

    def set_time_scale(self, scale: float, step: int) -> None:
        """Per-step ``α``, ``γ_d`` (Eq.4) and ``ρ`` (Eq.5) become ``scale`` × their configured values.

        Every entry is re-anchored at ``step`` (``m`` continuous) and its hazard, which is linear in
        ``α`` and ``γ_d``, is multiplied by new/old scale. The same scale again changes nothing.
        """
        if scale == self.time_scale:
            return
        factor = scale / self.time_scale
        for task in self.hazard:
            self.log_m[task] = self.log_strength(task, step)
            self.t_star[task] = torch.full_like(self.t_star[task], float(step))
            self.hazard[task] = self.hazard[task] * factor
        self._apply_time_scale(scale)

    def _apply_time_scale(self, scale: float) -> None:
        self.time_scale = float(scale)
        self.alpha, self.gamma_d, self.rho = (rate * self.time_scale for rate in self.rates)

    def log_strength(self, task: int, step: int) -> torch.Tensor:
        """Lemma A.1: ``log m(t) = log m* - h (t - t*)`` for every entry, without stepping through time."""
        return self.log_m[task] - self.hazard[task] * (step - self.t_star[task]).clamp(min=0)

    def _normalized(self, ema: torch.Tensor) -> torch.Tensor:
        known = torch.cat([e[~e.isnan()] for e in self.ema.values()]) if self.ema else ema.new_empty(0)
        if known.numel() < 2:
            return torch.full_like(ema, self.c)
        low, high = torch.quantile(known, torch.tensor(self.quantiles, dtype=known.dtype))
        if high <= low:
            return torch.full_like(ema, self.c)
        return ((ema - low) / (high - low)).clamp(0.0, 1.0)

    def _update_ema(self, task: int, positions: torch.Tensor, losses: torch.Tensor) -> None:
        old = self.ema[task][positions]
        losses = losses.to(torch.float64)
        self.ema[task][positions] = torch.where(old.isnan(), losses, self.beta_ema * old + (1 - self.beta_ema) * losses)

    def rescore(self, task: int, losses: torch.Tensor, step: int) -> None:
        """Fresh losses of every entry (no review): update the EMA and the hazard, keep ``m`` continuous.

        The hazard is piecewise constant (Lemma A.1); a change re-anchors ``m* = m(t)``, ``t* = t``.
        Without this, an entry that was easy when last replayed keeps a low hazard however much it
        has been forgotten since, and is never drawn again (the paper re-scores every 50 steps).
        """
        positions = torch.arange(losses.numel())
        self._update_ema(task, positions, losses)
        self.log_m[task] = self.log_strength(task, step)
        self.t_star[task] = torch.full_like(self.t_star[task], float(step))
        self.hazard[task] = (self.alpha + self.gamma_d * self.phi(self._normalized(self.ema[task]))) / self.stability[task]

    def review(self, task: int, positions: torch.Tensor, losses: torch.Tensor, step: int) -> None:
        """Eq.5 (+ Eq.4, Eq.13-14) for the entries of ``task`` at ``positions`` trained on at ``step``."""
        positions = positions.long()
        self._update_ema(task, positions, losses)
        m_before = self.log_strength(task, step)[positions].exp()
        gap = (step - self.t_review[task][positions]).clamp(min=0)
        s = self.stability[task][positions]
        growth = self.eta_s * (self.s_max - s).clamp(min=0) ** self.beta * torch.exp(-self.rho * gap) * (1 - m_before) ** self.gamma_s
        s_new = (s + growth).clamp(self.s_min, self.s_max)
        self.stability[task][positions] = s_new
        self.log_m[task][positions] = 0.0
        self.t_star[task][positions] = float(step)
        self.t_review[task][positions] = float(step)
        normalized = self._normalized(self.ema[task][positions])
        self.hazard[task][positions] = (self.alpha + self.gamma_d * self.phi(normalized)) / s_new

    def state_dict(self) -> dict[str, Any]:
        return {name: {int(t): v.clone() for t, v in getattr(self, name).items()} for name in ("log_m", "stability", "t_star", "hazard", "t_review", "ema")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, per_task in state.items():
            setattr(self, name, {int(t): v.clone().to(torch.float64) for t, v in per_task.items()})


class MSSRReplay(MixtureController):
    """MSSR as a mixture controller: memory-aware sampler + adaptive replay scheduler (see module docstring).

    Args:
        replay_mode: ``every_batch`` (replay at ratio λ(t) in every batch) or ``event`` (only at Eq.8 events).
        sampler: ``memory`` (p ∝ m^-ζ) or ``uniform``.
        schedule: ``adaptive`` (λ(t), Eq.9) or ``fixed`` (``fixed_ratio`` every batch).
        fixed_ratio: replay share with ``schedule: fixed``.
        lambda_0, lambda_min, beta_r: Eq.9 (paper: 0.3, 0.05, 1e-5 per step over 2000-step stages).
        ratio_formula: ``eq9`` or ``eq29``.
        first_interval, eta_p, rho_p: Eq.8 (paper: 100 steps, 0.5, 0.05).
        event_length: optimizer steps each replay event lasts in ``event`` mode.
        zeta: sampling sharpness of Eq.10 (0 = uniform).
        decision_interval: optimizer steps between re-decisions in ``every_batch`` mode.
        rescore_interval: optimizer steps between loss re-scorings of every buffer entry (paper: 50); null = never.
        alpha, gamma_d, k, c, beta_ema, eta_s, beta, rho, gamma_s, s_min, s_max: memory dynamics (Table 9 defaults).
        hazard_unit: ``step`` (``alpha``, ``gamma_d``, ``rho`` are per optimizer step of this run) or ``review``
            (per step at the paper's review interval, converted at every task start; module docstring).
        paper_review_interval: ``R_paper``, the steps between two reviews of an entry in the paper's setting
            (1024 entries / (batch 256 × λ 0.3)); only with ``hazard_unit="review"``.
        budget: mean replay share over the steps of tasks 2..T; solves ``lambda_0`` (or ``fixed_ratio``); None = as configured.
    """

    def __init__(
        self,
        replay_mode: str = "every_batch",
        sampler: str = "memory",
        schedule: str = "adaptive",
        fixed_ratio: float = 0.05,
        lambda_0: float = 0.3,
        lambda_min: float = 0.05,
        beta_r: float = 1e-5,
        ratio_formula: str = "eq9",
        first_interval: int = 100,
        eta_p: float = 0.5,
        rho_p: float = 0.05,
        event_length: int = 1,
        zeta: float = 1.0,
        decision_interval: int = 10,
        rescore_interval: int | None = 50,
        alpha: float = 0.01,
        gamma_d: float = 0.2,
        k: float = 10.0,
        c: float = 0.5,
        beta_ema: float = 0.95,
        eta_s: float = 0.05,
        beta: float = 0.5,
        rho: float = 0.01,
        gamma_s: float = 1.0,
        s_min: float = 1.0,
        s_max: float = 10.0,
        hazard_unit: Literal["step", "review"] = "step",
        paper_review_interval: float = 1024 / (256 * 0.3),
        budget: float | None = None,
    ) -> None:
        super().__init__(decision_interval=decision_interval if replay_mode == "every_batch" else None)
        for name, value, valid in (("replay_mode", replay_mode, REPLAY_MODES), ("sampler", sampler, ("memory", "uniform")),
                                   ("schedule", schedule, ("adaptive", "fixed")), ("ratio_formula", ratio_formula, RATIO_FORMULAS),
                                   ("hazard_unit", hazard_unit, HAZARD_UNITS)):
            if value not in valid:
                raise ConfigError(f"MSSRReplay.{name}={value!r} is unknown; valid: {', '.join(valid)}")
        for name, value in (("fixed_ratio", fixed_ratio), ("lambda_0", lambda_0), ("lambda_min", lambda_min)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"MSSRReplay.{name}={value} must lie in [0, 1]")
        if budget is not None and not 0.0 <= budget <= 1.0:
            raise ConfigError(f"MSSRReplay.budget={budget} must lie in [0, 1] (a mean replay share) or be null")
        if not paper_review_interval > 0:
            raise ConfigError(f"MSSRReplay.paper_review_interval={paper_review_interval} must be a positive number of steps")
        if not s_min <= s_max or s_min <= 0:
            raise ConfigError(f"MSSRReplay needs 0 < s_min <= s_max, got {s_min}, {s_max}")
        self.replay_mode, self.sampler, self.schedule = replay_mode, sampler, schedule
        self.fixed_ratio, self.lambda_0, self.lambda_min, self.beta_r = fixed_ratio, lambda_0, lambda_min, beta_r
        self.ratio_formula = ratio_formula
        self.first_interval, self.eta_p, self.rho_p, self.event_length = first_interval, eta_p, rho_p, event_length
        self.zeta = zeta
        self.rescore_interval = rescore_interval
        self.memory = MemoryStates(alpha, gamma_d, k, c, beta_ema, (0.05, 0.95), eta_s, beta, rho, gamma_s, s_min, s_max)
        self.hazard_unit, self.paper_review_interval, self.budget = hazard_unit, float(paper_review_interval), budget
        self.review_intervals: list[dict[str, Any]] = []  # hazard_unit="review": R and the scale chosen at every task start
        self._positions: dict[int, dict[int, int]] = {}  # task -> sample_id -> buffer position
        self._versions: dict[int, int] = {}  # task -> the memory version _positions was built from
        self._event_steps: set[int] = set()

    # ------------------------------------------------------------------------------------ scheduling
    needs = Needs(module=("sample_losses",), data=DATA_MIXTURE + ("buffer_samples", "sample_id_of", "global_batch_size"),
                  batch=("sample_ids", "source_ids", "is_replay"), step_outputs=("per_sample_loss",))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            dm = trainer.datamodule
            total = sum(dm.steps_for(k) for k in range(dm.num_tasks))
            self._event_steps = set(replay_event_steps(self.first_interval, self.eta_p, self.rho_p, total))
            if self.budget is not None:
                self.match_budget(range(dm.task_start_step(1) if dm.num_tasks > 1 else total, total))
            pl_module.continual.register_scores_section(type(self).__name__, self.scores_section)

    def scores_section(self) -> dict[str, Any]:
        """Written to ``scores.json`` under ``methods.MSSRReplay``: the schedule as solved and the hazard scale per task."""
        return {"schedule": self.schedule, "budget": self.budget, "lambda_0": self.lambda_0, "lambda_min": self.lambda_min,
                "fixed_ratio": self.fixed_ratio, "hazard_unit": self.hazard_unit, "review_intervals": list(self.review_intervals)}

    def match_budget(self, steps: range) -> None:
        """Set ``lambda_0`` (``fixed_ratio`` with ``schedule="fixed"``) so that the mean ``ratio_at`` over ``steps`` is ``budget``.

        ``ratio_at`` is affine in that parameter ``x`` (Eq.9, Eq.29, fixed, each times the event
        indicator), so ``mean(x) = m0 + (m1 - m0) x`` from ``x = 0`` and ``x = 1``. ``x`` is kept in [0, 1]
        and every step's ratio at most 1; outside the reachable means the budget is refused.
        """
        name = "fixed_ratio" if self.schedule == "fixed" else "lambda_0"
        if not len(steps):
            raise ConfigError("MSSRReplay.budget needs a sequence of at least 2 tasks (replay is possible from task 2 on)")
        per_x = []
        for x in (0.0, 1.0):
            setattr(self, name, x)
            per_x.append([self.ratio_at(s) for s in steps])
        r0, r1 = per_x
        m0, m1 = sum(r0) / len(steps), sum(r1) / len(steps)
        high = min([1.0] + [(1.0 - a) / (b - a) for a, b in zip(r0, r1) if b > a and a + (b - a) > 1.0])
        low_mean, high_mean = sorted((m0, m0 + (m1 - m0) * high))
        if not low_mean - 1e-12 <= self.budget <= high_mean + 1e-12:
            setattr(self, name, 0.0)
            raise ConfigError(
                f"MSSRReplay.budget={self.budget} cannot be reached by {name} in [0, {high:g}] with this schedule "
                f"(replay_mode={self.replay_mode}, lambda_min={self.lambda_min}, beta_r={self.beta_r}, {len(steps)} replay steps): "
                f"achievable mean replay shares are [{low_mean:.6g}, {high_mean:.6g}]"
            )
        setattr(self, name, min(max((self.budget - m0) / (m1 - m0), 0.0), high) if m1 != m0 else 0.0)

    def _in_event(self, step: int) -> bool:
        return any(e <= step < e + self.event_length for e in self._event_steps)

    def is_decision_batch(self, trainer: pl.Trainer, batch_in_task: int) -> bool:
        if self.replay_mode == "every_batch":
            return super().is_decision_batch(trainer, batch_in_task)
        if batch_in_task % trainer.accumulate_grad_batches:
            return False
        # an event switches replay on at its first step and off after its last
        step = self.global_step_of(trainer, batch_in_task)
        return self._in_event(step) != self._in_event(step - 1)

    def ratio_at(self, step: int) -> float:
        if self.replay_mode == "event" and not self._in_event(step):
            return 0.0
        if self.schedule == "fixed":
            return self.fixed_ratio
        return replay_ratio(step, self.lambda_0, self.lambda_min, self.beta_r, self.ratio_formula)

    # ------------------------------------------------------------------------------------ decisions
    def _sync_buffers(self, trainer: pl.Trainer) -> None:
        """Follow the replay memory: a buffer rewritten since we cached it (its version changed) is re-indexed.

        A buffer whose size changed gets fresh memory states (its entries are new samples); one rewritten
        in place with the same size keeps them (position i is still the i-th selected sample's slot).
        """
        dm = trainer.datamodule
        for task, buffer in dm.memory.items():
            version = dm.memory.version(task)
            if task not in self.memory.log_m or self.memory.log_m[task].numel() != len(buffer):
                self.memory.add_task(task, len(buffer), step=dm.task_start_step(task + 1))
            if self._versions.get(task) != version:
                self._positions[task] = {dm.sample_id_of(task, entry, i): i for i, entry in enumerate(buffer.entries)}
                self._versions[task] = version

    def _entry_log_weights(self, task: int, step: int) -> torch.Tensor:
        if self.sampler == "uniform":
            return torch.zeros_like(self.memory.log_m[task])
        return -self.zeta * self.memory.log_strength(task, step)

    def expected_review_interval(self, trainer: pl.Trainer, task: int) -> float | None:
        """``R = N / (B λ̄)``: entries in all buffers over the replayed samples per step, λ̄ the task's mean ``ratio_at``.

        None where no review is expected (task 0, empty buffers, or ``λ̄ = 0``).
        """
        dm = trainer.datamodule
        entries = sum(dm.memory.size(j) for j in range(task))
        start, steps = dm.task_start_step(task), dm.steps_for(task)
        mean_ratio = sum(self.ratio_at(s) for s in range(start, start + steps)) / steps if task > 0 and steps else 0.0
        if entries == 0 or mean_ratio == 0.0:
            return None
        return entries / (dm.global_batch_size * mean_ratio)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = pl_module.task_clock.task_of(trainer)
        if self.hazard_unit == "review" and task != self._started_task:  # once per task; a resumed task keeps its scale
            interval = self.expected_review_interval(trainer, task)
            scale = self.memory.time_scale if interval is None else self.paper_review_interval / interval
            self.memory.set_time_scale(scale, step=trainer.datamodule.task_start_step(task))
            self.review_intervals.append({"task": task, "review_interval": interval, "scale": scale,
                                          "alpha": self.memory.alpha, "gamma_d": self.memory.gamma_d, "rho": self.memory.rho})
        self._sync_buffers(trainer)  # buffers of finished tasks exist once the task's loader is built
        super().on_train_epoch_start(trainer, pl_module)

    def decide(self, signals: MixtureSignals) -> list[float]:
        k = signals.task_index
        step = signals.step
        ratio = self.ratio_at(step) if k > 0 else 0.0
        if k == 0 or ratio == 0.0:
            return [1.0 if j == k else 0.0 for j in range(signals.num_tasks)]
        # a buffer's share is the sum of its entries' m^-ζ, so entries are drawn ∝ m^-ζ over the pooled buffers (Eq.10)
        logs = [self._entry_log_weights(j, step) for j in range(k)]
        top = max(float(v.max()) for v in logs if v.numel())
        mass = [float(torch.exp(v - top).sum()) if v.numel() else 0.0 for v in logs]
        total = sum(mass)
        replay = [ratio * m / total for m in mass] if total > 0 else [0.0] * k
        return replay + [1.0 - ratio] + [0.0] * (signals.num_tasks - k - 1)

    def entry_weights(self, signals: MixtureSignals) -> dict[int, list[float]] | None:
        if self.sampler == "uniform" or signals.task_index == 0:
            return None
        step = signals.step
        out = {}
        for j in range(signals.task_index):
            v = self._entry_log_weights(j, step)
            out[j] = torch.exp(v - v.max()).tolist() if v.numel() else []
        return out

    # ------------------------------------------------------------------------------------ reviews
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._review(trainer, outputs, batch)
        step = pl_module.task_clock.sequence_step(trainer, trainer.datamodule)
        if self.rescore_interval and step % self.rescore_interval == 0 and step != getattr(self, "_last_rescore", -1):
            self._last_rescore = step
            self._rescore(trainer, pl_module, step)

    def _rescore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Teacher-forced loss of every buffer entry, split over the ranks; every rank applies the same numbers.

        Each rank scores an equal, padded shard (:class:`~lightning_cit.contract.ShardPlan`): under FSDP FULL_SHARD
        every forward is a collective, so all ranks must run the same number of them. The shards' losses are
        gathered in rank order and put back in entry order, so the memory states agree on every rank.
        """
        self._sync_buffers(trainer)
        dm = trainer.datamodule
        world, rank = trainer.world_size, trainer.global_rank
        was_training = pl_module.training
        pl_module.eval()
        with pl_module.continual.cost_scope("rescore"):
            for task in sorted(self.memory.log_m):
                entries = dm.buffer_samples(task)
                shard = ShardPlan(entries, world, rank)  # rank r scores entries[r::world], padded to equal length
                local = shard.keep(pl_module.sample_losses(shard.local)) if shard.local else []
                losses = [0.0] * len(entries)
                for r, part in enumerate(gather_objects(local)):
                    for i, loss in zip(range(r, len(entries), world), part):
                        losses[i] = loss
                self.memory.rescore(task, torch.tensor(losses, dtype=torch.float64), step)
        if was_training:
            pl_module.train()

    def _review(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> None:
        if not isinstance(outputs, dict) or "per_sample_loss" not in outputs or "sample_ids" not in outputs and "sample_ids" not in batch:
            raise ContractError(
                "MSSRReplay reviews replayed samples from training_step's outputs: return "
                "ContinualModule.continual_loss(batch, logits) (it holds 'per_sample_loss') from training_step"
            )
        tensors = torch.stack([batch["sample_ids"].double(), batch["source_ids"].double(), batch["is_replay"].double(),
                               outputs["per_sample_loss"].double()])
        if trainer.world_size > 1:  # every rank applies every rank's reviews, so memory states agree
            tensors = trainer.strategy.all_gather(tensors).permute(1, 0, 2).reshape(4, -1)
        sample_ids, sources, replayed, losses = tensors.cpu()
        if not replayed.any():
            return
        self._sync_buffers(trainer)
        step = trainer.lightning_module.task_clock.sequence_step(trainer, trainer.datamodule)
        for task in sources[replayed.bool()].long().unique().tolist():
            mask = replayed.bool() & (sources.long() == task)
            index = self._positions[task]
            seen: dict[int, float] = {}
            for sid, loss in zip(sample_ids[mask].long().tolist(), losses[mask].tolist()):
                seen.setdefault(index[sid], loss)  # an entry drawn twice in one step is reviewed once
            self.memory.review(task, torch.tensor(list(seen)), torch.tensor(list(seen.values())), step)

    # ------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "memory": self.memory.state_dict(),
            "last_rescore": getattr(self, "_last_rescore", -1),
            "time_scale": self.memory.time_scale,
            "review_intervals": list(self.review_intervals),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.memory.load_state_dict(state_dict["memory"])
        self._last_rescore = int(state_dict.get("last_rescore", -1))
        self.memory._apply_time_scale(float(state_dict.get("time_scale", 1.0)))
        self.review_intervals = list(state_dict.get("review_intervals", []))
