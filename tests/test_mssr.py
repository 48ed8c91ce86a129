"""MSSR: memory dynamics against hand computations, the scheduler, sampling by m^-zeta, exact resume."""

import json
import math
from collections import Counter

import pytest
import torch
from lightning_cit.callbacks.mssr import MemoryStates, MSSRReplay, replay_event_steps, replay_ratio

from lightning_cit.errors import ConfigError
from lightning_cit.sampler import MixtureSampler


def test_closed_form_equals_step_by_step_decay():
    memory = MemoryStates()
    memory.add_task(0, 3, step=10)
    memory.review(0, torch.tensor([0, 1, 2]), torch.tensor([0.1, 1.0, 5.0]), step=10)
    hazard = memory.hazard[0].clone()
    m = torch.ones(3, dtype=torch.float64)
    for _ in range(37):  # Eq.4 one step at a time
        m = m * torch.exp(-hazard)
    assert torch.allclose(memory.log_strength(0, 47).exp(), m, rtol=1e-12)


def test_review_follows_eq4_eq5_by_hand():
    mem = MemoryStates(alpha=0.01, gamma_d=0.2, k=10, c=0.5, eta_s=0.05, beta=0.5, rho=0.01, gamma_s=1.0, s_min=1, s_max=10)
    mem.add_task(0, 4, step=0)
    # first reviews give the EMA losses 1, 2, 3, 4 (an unseen EMA starts at the loss itself)
    mem.review(0, torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]), step=0)
    h0 = mem.hazard[0].clone()
    # entry 3 is reviewed again 20 steps later with loss 4
    m_before = math.exp(-float(h0[3]) * 20)
    s_expected = min(10.0, 1.0 + 0.05 * (10 - 1.0) ** 0.5 * math.exp(-0.01 * 20) * (1 - m_before) ** 1.0)
    mem.review(0, torch.tensor([3]), torch.tensor([4.0]), step=20)
    assert float(mem.stability[0][3]) == pytest.approx(s_expected)
    assert float(mem.log_strength(0, 20)[3]) == 0.0  # reset: m = 1
    # EMA 0.95*4 + 0.05*4 = 4; quantiles of {1,2,3,4}: q05 = 1.15, q95 = 3.85 -> normalized loss clipped to 1
    phi = 1 / (1 + math.exp(-10 * (1.0 - 0.5)))
    assert float(mem.hazard[0][3]) == pytest.approx((0.01 + 0.2 * phi) / s_expected)
    # weak memories consolidate more than strong ones: a review right away (m ~ 1) barely moves S
    mem.review(0, torch.tensor([2]), torch.tensor([3.0]), step=0)
    assert float(mem.stability[0][2]) == pytest.approx(1.0)


def test_rescoring_keeps_strength_continuous_and_raises_the_hazard_of_forgotten_entries():
    mem = MemoryStates()
    mem.add_task(0, 4, step=0)
    mem.review(0, torch.arange(4), torch.tensor([0.1, 0.1, 2.0, 3.0]), step=0)
    before = mem.log_strength(0, 30).clone()
    hazard_before = mem.hazard[0][0].item()
    mem.rescore(0, torch.tensor([5.0, 0.1, 2.0, 3.0]), step=30)  # entry 0 has been forgotten since
    assert torch.allclose(mem.log_strength(0, 30), before)  # no jump in m
    assert mem.hazard[0][0].item() > hazard_before
    assert torch.equal(mem.t_review[0], torch.zeros(4, dtype=torch.float64))  # not a review


def test_expanding_intervals_and_ratios_by_hand():
    # Eq.8 with Δt(1) = 100, η_p = 0.5, ρ_p = 0.05, k from 1: intervals 100, 147.6, 214.3, ...
    d1 = 100.0
    d2 = d1 * (1 + 0.5 * math.exp(-0.05 * 1))
    d3 = d2 * (1 + 0.5 * math.exp(-0.05 * 2))
    assert replay_event_steps(100, 0.5, 0.05, until=500) == [100, round(d1 + d2), round(d1 + d2 + d3)]
    assert replay_ratio(1000, 0.3, 0.05, 1e-5) == pytest.approx(0.3 * math.exp(-0.01) + 0.05)
    assert replay_ratio(1000, 0.3, 0.05, 1e-5, "eq29") == pytest.approx(0.05 + 0.25 * math.exp(-0.01))


def test_sampling_frequencies_follow_m_to_the_minus_zeta():
    memory = MemoryStates()
    memory.add_task(0, 3, step=0)
    memory.log_m[0] = torch.log(torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    memory.hazard[0].zero_()
    weights = torch.exp(-1.0 * memory.log_strength(0, 0))  # zeta = 1: 1, 2, 4
    sampler = MixtureSampler([3, 10], lambda b: [1.0, 0.0], 1, 500, 14, entry_weights_for_batch=lambda b: [weights.tolist(), None])
    counts = Counter(pos for batch in sampler for _, pos in batch)
    total = sum(counts.values())
    for pos, expected in enumerate([1 / 7, 2 / 7, 4 / 7]):
        assert counts[pos] / total == pytest.approx(expected, abs=0.02)


def test_bad_options_are_reported():
    with pytest.raises(ConfigError, match="replay_mode"):
        MSSRReplay(replay_mode="sometimes")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        MSSRReplay(lambda_0=2.0)


@pytest.mark.parametrize("mode,unit", [("every_batch", "step"), ("event", "step"), ("every_batch", "review")])
def test_resume_mid_schedule_reproduces_replay_decisions(tmp_path, mode, unit):
    from test_e2e import run, small_config

    args = {"replay_mode": mode, "lambda_0": 0.3, "lambda_min": 0.1, "beta_r": 0.01, "first_interval": 14,
            "eta_p": 0.5, "event_length": 3, "decision_interval": 4, "rescore_interval": 5, "hazard_unit": unit}
    controller = {"class_path": "lightning_cit.callbacks.MSSRReplay", "init_args": args}
    record = {"class_path": "helpers_callbacks.RecordSamples", "init_args": {"out_dir": str(tmp_path / "rec_full")}}
    full = run(small_config(tmp_path, controller, [record]), tmp_path / "full")
    ckpt = next((tmp_path / "full").rglob("epoch=2-step=30.ckpt"))  # mid task 3, memories of two buffers
    record["init_args"]["out_dir"] = str(tmp_path / "rec_resumed")
    resumed = run(small_config(tmp_path, controller, [record]), tmp_path / "resumed", "--ckpt_path", str(ckpt))
    assert resumed["matrix"] == full["matrix"]
    section = full["methods"]["MSSRReplay"]  # the solved schedule and, per review interval, the hazard scale of every task
    assert section["hazard_unit"] == unit and section["lambda_0"] == 0.3
    assert [r["task"] for r in section["review_intervals"]] == ([0, 1, 2] if unit == "review" else [])  # one record per task start
    a = json.loads((tmp_path / "rec_full" / "rank0.json").read_text())
    b = json.loads((tmp_path / "rec_resumed" / "rank0.json").read_text())
    assert b["schedule"] == a["schedule"]
    assert b["seen"] == [s for s in a["seen"] if s[1] > 30]
    replayed = [src for srcs, step in zip(a["sources"], a["seen"]) if step[0] == 2 for src in srcs if src < 2]
    assert replayed  # the schedule did replay in task 3
    if mode == "event":
        steps_with_replay = {step[1] for srcs, step in zip(a["sources"], a["seen"]) if any(s < step[0] for s in srcs)}
        events = replay_event_steps(14, 0.5, 0.05, until=36)
        allowed = {e + i + 1 for e in events for i in range(3)}  # global_step after the step = step index + 1
        assert steps_with_replay <= allowed


# ------------------------------------------------------------------------ hazards per review interval (issue 19)
def _fake_trainer(buffer_sizes, batch, steps, start):
    from types import SimpleNamespace

    memory = SimpleNamespace(size=lambda j: buffer_sizes[j])
    dm = SimpleNamespace(memory=memory, global_batch_size=batch, steps_for=lambda k: steps, task_start_step=lambda k: start)
    return SimpleNamespace(datamodule=dm)


def test_default_hazards_stay_per_step():
    mssr = MSSRReplay()
    assert mssr.hazard_unit == "step" and mssr.budget is None
    assert (mssr.memory.alpha, mssr.memory.gamma_d, mssr.memory.rho, mssr.memory.time_scale) == (0.01, 0.2, 0.01, 1.0)
    assert mssr.state_dict()["time_scale"] == 1.0


def test_expected_review_interval_and_per_step_hazards_by_hand():
    # cit-synth task 3 (k = 2): buffers of 100 + 100, batch 32, 300 steps from step 600, λ(t) = 0.04 e^-0.001t + 0.01
    mssr = MSSRReplay(lambda_0=0.04, lambda_min=0.01, beta_r=1e-3, hazard_unit="review")
    trainer = _fake_trainer([100, 100], 32, 300, 600)
    q = math.exp(-1e-3)
    mean_ratio = 0.01 + 0.04 * math.exp(-0.6) * (1 - q ** 300) / (1 - q) / 300  # geometric series over t = 600..899
    interval = 200 / (32 * mean_ratio)
    assert interval == pytest.approx(215.70, abs=0.01)
    assert mssr.expected_review_interval(trainer, 2) == pytest.approx(interval, rel=1e-12)
    scale = (1024 / (256 * 0.3)) / interval  # R_paper / R
    mssr.memory.set_time_scale(scale, step=600)
    assert mssr.memory.alpha == pytest.approx(0.01 * 0.061816, rel=1e-4)  # 0.000618 per step (the hand scaling was 0.0003)
    assert mssr.memory.gamma_d == pytest.approx(0.2 * scale) and mssr.memory.rho == pytest.approx(0.01 * scale)
    # undefined R: task 0 (no buffers) and a task without replay (λ = 0)
    assert mssr.expected_review_interval(_fake_trainer([], 32, 300, 0), 0) is None
    assert MSSRReplay(lambda_0=0.0, lambda_min=0.0, hazard_unit="review").expected_review_interval(trainer, 2) is None


def test_time_scale_keeps_strength_continuous_and_scales_the_hazard():
    mem = MemoryStates()
    mem.add_task(0, 3, step=0)
    mem.review(0, torch.arange(3), torch.tensor([0.5, 1.0, 4.0]), step=0)
    hazard = mem.hazard[0].clone()
    at_10 = mem.log_strength(0, 10).clone()
    mem.set_time_scale(0.25, step=10)
    assert torch.allclose(mem.log_strength(0, 10), at_10, rtol=0, atol=1e-15)  # no jump in m
    assert torch.allclose(mem.hazard[0], hazard * 0.25)
    assert torch.allclose(mem.log_strength(0, 50), at_10 - hazard * 0.25 * 40)  # decays at the new rate from step 10
    assert (mem.alpha, mem.gamma_d, mem.rho) == (0.01 * 0.25, 0.2 * 0.25, 0.01 * 0.25)
    # a new entry gets (α + γ_d φ(c)) / S_min at the new scale: (0.0025 + 0.05 * 0.5) / 1
    mem.add_task(1, 1, step=10)
    assert float(mem.hazard[1][0]) == pytest.approx(0.0025 + 0.05 * 0.5)
    before = {k: v.clone() for k, v in mem.log_m.items()}
    mem.set_time_scale(0.25, step=30)  # the same scale again (a resumed task) changes nothing
    assert all(torch.equal(mem.log_m[k], before[k]) for k in before)


# ------------------------------------------------------------------------ budget matching (issue 19)
@pytest.mark.parametrize("args", [
    {"ratio_formula": "eq9"},
    {"ratio_formula": "eq29"},
    {"schedule": "fixed"},
    {"replay_mode": "event", "first_interval": 20, "event_length": 5},
])
def test_budget_sets_the_mean_ratio_over_the_replay_steps(args):
    budget = 0.005 if args.get("replay_mode") == "event" else 0.03  # events cover under 1% of the steps here
    mssr = MSSRReplay(lambda_min=0.01, beta_r=1e-3, budget=budget, **args)
    mssr._event_steps = set(replay_event_steps(mssr.first_interval, mssr.eta_p, mssr.rho_p, 1500))  # what setup does
    steps = range(300, 1500)  # tasks 2..5 of 5 x 300 steps
    mssr.match_budget(steps)
    assert sum(mssr.ratio_at(s) for s in steps) / len(steps) == pytest.approx(budget, abs=1e-6)
    if args == {"ratio_formula": "eq9"}:  # λ0 = (budget - λ_min) / mean e^-βt, by hand
        q = math.exp(-1e-3)
        decay = math.exp(-0.3) * (1 - q ** 1200) / (1 - q) / 1200
        assert mssr.lambda_0 == pytest.approx((0.03 - 0.01) / decay, rel=1e-9)
    if args.get("schedule") == "fixed":
        assert mssr.fixed_ratio == pytest.approx(0.03)


def test_impossible_budgets_are_refused_with_the_achievable_range():
    mssr = MSSRReplay(lambda_min=0.05, beta_r=1e-3, budget=0.02)  # below the floor λ_min
    with pytest.raises(ConfigError, match=r"budget=0.02 .*achievable mean replay shares are \[0.05, "):
        mssr.match_budget(range(300, 1500))
    event = MSSRReplay(replay_mode="event", first_interval=100, event_length=1, budget=0.5)  # a few one-step events
    event._event_steps = set(replay_event_steps(100, 0.5, 0.05, 1500))
    with pytest.raises(ConfigError, match="MSSRReplay.budget=0.5 cannot be reached"):
        event.match_budget(range(300, 1500))
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        MSSRReplay(budget=0.1).match_budget(range(300, 300))
    with pytest.raises(ConfigError, match="budget"):
        MSSRReplay(budget=1.5)
    with pytest.raises(ConfigError, match="hazard_unit"):
        MSSRReplay(hazard_unit="hour")
