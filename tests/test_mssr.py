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


@pytest.mark.parametrize("mode", ["every_batch", "event"])
def test_resume_mid_schedule_reproduces_replay_decisions(tmp_path, mode):
    from test_e2e import run, small_config

    args = {"replay_mode": mode, "lambda_0": 0.3, "lambda_min": 0.1, "beta_r": 0.01, "first_interval": 14,
            "eta_p": 0.5, "event_length": 3, "decision_interval": 4, "rescore_interval": 5}
    controller = {"class_path": "lightning_cit.callbacks.MSSRReplay", "init_args": args}
    record = {"class_path": "helpers_callbacks.RecordSamples", "init_args": {"out_dir": str(tmp_path / "rec_full")}}
    full = run(small_config(tmp_path, controller, [record]), tmp_path / "full")
    ckpt = next((tmp_path / "full").rglob("epoch=2-step=30.ckpt"))  # mid task 3, memories of two buffers
    record["init_args"]["out_dir"] = str(tmp_path / "rec_resumed")
    resumed = run(small_config(tmp_path, controller, [record]), tmp_path / "resumed", "--ckpt_path", str(ckpt))
    assert resumed["matrix"] == full["matrix"]
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
