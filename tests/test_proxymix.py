"""ProxyMix: state construction (Eq.3-4), masking (Eq.5), policy files, PPO, DDP agreement, resumable training, mirroring."""

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning_cit.callbacks import LossSlope, MixtureSignals
from lightning_cit.callbacks.proxymix.commands import main as proxymix_main
from lightning_cit.callbacks.proxymix.commands import vulnerability
from lightning_cit.callbacks.proxymix.controller import NormalizedLosses, build_state
from lightning_cit.callbacks.proxymix.policy import (
    ActorCritic,
    PolicySpec,
    PPOConfig,
    load_policy,
    masked_softmax,
    ppo_update,
    save_policy,
)
from test_e2e import STEPS, run, small_config

from lightning_cit.cli import main
from lightning_cit.errors import ConfigError


def write_policy(path: Path, max_tasks: int = 4, bias: list[float] | None = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    policy = ActorCritic(PolicySpec(max_tasks=max_tasks, hidden_size=16))
    if bias is not None:
        with torch.no_grad():
            policy.actor[-1].bias.copy_(torch.tensor(bias))
    save_policy(str(path), policy, {"test": True})
    return path


def proxymix(policy: Path, interval: int = 3, **init_args) -> dict:
    return {"class_path": "lightning_cit.callbacks.ProxyMixController",
            "init_args": {"policy_path": str(policy), "decision_interval": interval, **init_args}}


def test_normalized_losses_follow_eq3_and_the_state_zeroes_future_tasks():
    tracker = NormalizedLosses(std_floor=0.1, clip=5.0, eps=0.0)
    assert tracker.observe([2.0]) == ([0.0], [0.0])  # the first observation normalizes to 0, no trend yet
    levels, trends = tracker.observe([1.0, 3.0])
    # task 0: mean 1.5, population variance 0.25 -> spread 0.5; level (1 - 1.5)/0.5, trend (1 - 2)/0.5
    assert levels[0] == pytest.approx(-1.0) and trends[0] == pytest.approx(-2.0)
    assert levels[1] == 0.0 and trends[1] == 0.0  # task 1's first observation
    levels, trends = tracker.observe([1.0, 3.03])
    # task 1: mean 3.015, variance 0.000225 (spread 0.015) is floored at 0.1 * 3.015
    assert trends[1] == pytest.approx(0.03 / 0.3015)
    # levels and trends are clipped to ±clip
    clipped = NormalizedLosses(std_floor=0.1, clip=0.5)
    clipped.observe([2.0])
    assert clipped.observe([1.0]) == ([-0.5], [-0.5])
    state = build_state([0.5, -0.5], [1.0, 2.0], task_index=1, progress=0.25, max_tasks=4)
    assert state == [0.5, -0.5, 0, 0, 1.0, 2.0, 0, 0, 0, 1.0, 0, 0, 0.25]
    assert len(state) == PolicySpec(max_tasks=4).state_dim
    weights = masked_softmax(torch.tensor([0.0, 0.0, 50.0, 50.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert weights.tolist() == [0.5, 0.5, 0.0, 0.0]


def test_future_tasks_never_get_weight_and_are_never_sampled(tmp_path):
    # a policy that would put nearly everything on the last task: before that task it must get exactly 0
    policy = write_policy(tmp_path / "policy.pt", max_tasks=4, bias=[0.0, 0.0, 8.0, 8.0])
    dump = {"class_path": "helpers_proxymix.DumpController", "init_args": {"out_dir": str(tmp_path / "dump")}}
    record = {"class_path": "helpers_callbacks.RecordSamples", "init_args": {"out_dir": str(tmp_path / "rec")}}
    scores = run(small_config(tmp_path, proxymix(policy), [dump, record]), tmp_path / "run")
    state = json.loads((tmp_path / "dump" / "rank0.json").read_text())
    assert len(state["decisions"]) == 3 * (STEPS // 3)  # one at every task start and every 3 steps after
    for decision in state["decisions"]:
        task, weights = decision["task"], decision["weights"]
        assert len(weights) == 3 and math.isclose(sum(weights), 1.0, rel_tol=1e-6)
        assert all(w == 0.0 for w in weights[task + 1 :])
    assert [d["weights"] for d in state["decisions"] if d["task"] == 0] == [[1.0, 0.0, 0.0]] * (STEPS // 3)
    # the mean action with this bias: the last task's logit dominates once it is current
    assert all(d["weights"][2] > 0.99 for d in state["decisions"] if d["task"] == 2)
    seen = json.loads((tmp_path / "rec" / "rank0.json").read_text())
    for (task, *_), sources in zip(seen["seen"], seen["sources"]):
        assert max(sources) <= task  # source ids: the task a sample came from
    # the deterministic controller records no rollout; its decisions are reported in scores.json
    assert state["rollout"] == []
    section = scores["methods"]["ProxyMixController"]
    assert section["decisions"] == len(state["decisions"]) and section["explore"] is False
    assert set(section["mean_replay_share_per_task"]) == {"0", "1", "2"}


def test_policy_file_round_trip_and_clear_errors_for_bad_files(tmp_path):
    path = write_policy(tmp_path / "p.pt", max_tasks=3, seed=3)
    policy, meta = load_policy(str(path))
    assert meta == {"test": True}
    torch.manual_seed(3)
    reference = ActorCritic(PolicySpec(max_tasks=3, hidden_size=16))
    states = torch.randn(5, policy.spec.state_dim)
    assert torch.equal(policy(states)[0], reference(states)[0]) and torch.equal(policy(states)[1], reference(states)[1])
    # tampered files: garbage, a truncated file, a pickle that would run code, a foreign checkpoint
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a policy" * 10)
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:200])

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "exploit.pt").write_bytes(pickle.dumps(Exploit()))
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    for name, message in [("garbage.pt", "not a readable"), ("truncated.pt", "not a readable"), ("exploit.pt", "not a readable"),
                          ("foreign.pt", "not a ProxyMix policy"), ("missing.pt", "does not exist")]:
        with pytest.raises(ConfigError, match=message):
            load_policy(str(tmp_path / name))
    assert not (tmp_path / "pwned").exists()


def test_a_policy_built_for_fewer_tasks_is_a_clear_error(tmp_path, capsys):
    policy = write_policy(tmp_path / "small.pt", max_tasks=2)
    code = main(["fit", "--config", str(small_config(tmp_path, proxymix(policy))), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "at most 2 tasks" in err and "trains 3" in err and "max_tasks >= 3" in err
    assert not list((tmp_path / "run").rglob("scores.json"))  # refused before the base row is written


def test_ppo_learns_a_bandit_with_a_known_optimum():
    # one state, three sources; the reward is the mixture weight of source 1: the optimum puts everything there
    torch.manual_seed(0)
    spec = PolicySpec(max_tasks=3, hidden_size=32, init_log_std=0.0)
    policy = ActorCritic(spec)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    config = PPOConfig(epochs=4, minibatch_size=32, normalize_rewards=True)
    generator = torch.Generator().manual_seed(0)
    state = torch.tensor(build_state([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 2, 0.5, 3))
    mask = torch.ones(3)
    for _ in range(40):
        rollout = []
        for _ in range(32):
            step = policy.act(state, mask, deterministic=False, generator=generator)
            weights = masked_softmax(step["action"], mask)
            rollout.append({"state": state.tolist(), "action": step["action"].tolist(), "mask": mask.tolist(),
                            "log_prob": step["log_prob"], "value": step["value"], "reward": float(weights[1]), "done": True})
        ppo_update(policy, optimizer, rollout, config, generator)
    weights = masked_softmax(policy.act(state, mask, deterministic=True)["action"], mask)
    assert weights[1] > 0.9, weights


def test_loss_slope_replays_the_tasks_whose_loss_rises():
    controller = LossSlope(replay_ratio=0.3, decision_interval=5)

    def signals(losses):
        return MixtureSignals(task_index=2, num_tasks=4, batch_in_task=0, step=0, steps_in_task=10, progress=0.0,
                              probe_losses=losses, source_sizes=[10, 10, 100])

    assert controller.decide(signals([1.0, 1.0, 3.0, None])) == pytest.approx([0.15, 0.15, 0.7, 0.0])  # no trend yet: uniform
    weights = controller.decide(signals([1.5, 0.9, 2.0, None]))  # task 0 rises, task 1 falls
    assert weights == pytest.approx([0.3, 0.0, 0.7, 0.0])
    with pytest.raises(ConfigError, match="replay_ratio"):
        LossSlope(replay_ratio=1.5)


def test_mirror_ranks_task_vulnerability(tmp_path, capsys):
    def scores(matrix):
        return {"tasks": ["a", "b", "c", "d"], "matrix": matrix, "complete": True}

    proxy = scores([[0] * 4, [80, 0, 0, 0], [40, 90, 0, 0], [30, 60, 70, 0], [20, 45, 63, 99]])
    target = scores([[0] * 4, [90, 0, 0, 0], [70, 95, 0, 0], [50, 80, 80, 0], [40, 70, 76, 90]])
    assert vulnerability(proxy) == pytest.approx({"a": 0.75, "b": 0.5, "c": 0.1})
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "scores.json").write_text(json.dumps(proxy))
    (tmp_path / "target.json").write_text(json.dumps(target))
    assert proxymix_main(["mirror", str(tmp_path / "proxy"), str(tmp_path / "target.json"), "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["tasks"] == ["a", "b", "c"] and result["spearman_rho"] == pytest.approx(1.0)
    assert result["ci95"][1] == pytest.approx(1.0) and result["proxy_runs"] == 1
    (tmp_path / "broken.json").write_text("{")
    assert proxymix_main(["mirror", str(tmp_path / "broken.json"), str(tmp_path / "target.json")]) == 2
    assert "broken.json" in capsys.readouterr().err


def test_two_ddp_ranks_take_identical_decisions(tmp_path):
    policy = write_policy(tmp_path / "policy.pt", max_tasks=4, seed=5)
    dump = {"class_path": "helpers_proxymix.DumpController", "init_args": {"out_dir": str(tmp_path / "dump")}}
    config = small_config(tmp_path, proxymix(policy, interval=3, explore=True), [dump])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"),
           "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "dump" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["decisions"] and r0["decisions"] == r1["decisions"] and r0["schedule"] == r1["schedule"]
    assert r0["losses"] == r1["losses"]  # the normalization statistics read all-reduced probes
    assert r0["rollout"] == r1["rollout"] and len(r0["rollout"]) == 2 * (STEPS // 3)  # tasks 2 and 3 have a choice
    assert len(list((tmp_path / "run").rglob("scores.json"))) == 1


def test_a_mid_task_resume_reproduces_an_exploring_run(tmp_path):
    policy = write_policy(tmp_path / "policy.pt", max_tasks=4, seed=1)
    dump = {"class_path": "helpers_proxymix.DumpController", "init_args": {"out_dir": str(tmp_path / "full_dump")}}
    full = run(small_config(tmp_path, proxymix(policy, explore=True), [dump]), tmp_path / "full")
    checkpoint = next((tmp_path / "full").rglob("epoch=1-step=20.ckpt"))  # mid-task 2, between decisions
    dump["init_args"]["out_dir"] = str(tmp_path / "resumed_dump")
    resumed = run(small_config(tmp_path, proxymix(policy, explore=True), [dump]), tmp_path / "resumed", "--ckpt_path", str(checkpoint))
    assert resumed["matrix"] == full["matrix"]
    a, b = (json.loads((tmp_path / d / "rank0.json").read_text()) for d in ("full_dump", "resumed_dump"))
    assert a["rollout"] == b["rollout"] and a["decisions"] == b["decisions"] and a["losses"] == b["losses"]
    # resuming with another policy file is refused
    other = write_policy(tmp_path / "other.pt", max_tasks=4, seed=2)
    code = main(["fit", "--config", str(small_config(tmp_path, proxymix(other, explore=True))), "--trainer.default_root_dir",
                 str(tmp_path / "other_run"), "--ckpt_path", str(checkpoint)])
    assert code == 2


def _train_config(tmp_path: Path, work: str, episodes: int) -> Path:
    fit = small_config(tmp_path, proxymix(tmp_path / "unused.pt"))
    data = yaml.safe_load(fit.read_text())
    for task in data["data"]["tasks"]:  # the smallest episodes that still score every task
        task.update(eval_size=4, probe_size=4, max_new_tokens=4)
    fit.write_text(yaml.safe_dump(data))
    config = {"fit_config": str(fit), "fit_args": ["--data.steps_per_task", "6"], "episodes": episodes, "seed": 0,
              "out": str(tmp_path / work / "controller.pt"), "work_dir": str(tmp_path / work), "progress": False,
              "policy": {"max_tasks": 4, "hidden_size": 32}, "ppo": {"minibatch_size": 8}}
    path = tmp_path / f"{work}-{episodes}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_controller_training_resumes_where_it_stopped(tmp_path, capsys):
    assert proxymix_main(["train", "--config", str(_train_config(tmp_path, "straight", 2))]) == 0
    # the same training interrupted after its first episode, then started again
    assert proxymix_main(["train", "--config", str(_train_config(tmp_path, "resumed", 1))]) == 0
    assert proxymix_main(["train", "--config", str(_train_config(tmp_path, "resumed", 1)), "--episodes", "2"]) == 0
    straight, meta = load_policy(str(tmp_path / "straight" / "controller.pt"))
    resumed, _ = load_policy(str(tmp_path / "resumed" / "controller.pt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    history = json.loads((tmp_path / "straight" / "history.json").read_text())["episodes"]
    assert [h["episode"] for h in history] == [0, 1] and all(h["decisions"] == 2 * 2 for h in history)
    assert meta["episodes"] == 2 and meta["optimizer_steps"] == 2 * 3 * 6 and meta["seconds"] > 0
    assert all("update" in h for h in history)  # one PPO update per episode
    # different settings in the same work_dir are refused rather than mixed
    code = proxymix_main(["train", "--config", str(_train_config(tmp_path, "resumed", 1)), "--episodes", "3", "--seed", "1"])
    assert code == 2 and "other settings" in capsys.readouterr().err


# ------------------------------------------------------------------------ budget-constrained action (issue 19)
def _constant_policy(logits: list[float]) -> ActorCritic:
    """A policy whose mean action is ``logits`` whatever the state (last actor layer: weight 0, bias = logits)."""
    torch.manual_seed(0)
    policy = ActorCritic(PolicySpec(max_tasks=len(logits), hidden_size=8))
    with torch.no_grad():
        policy.actor[-1].weight.zero_()
        policy.actor[-1].bias.copy_(torch.tensor(logits))
    return policy.eval()


def _signals(task: int, num_tasks: int = 4) -> MixtureSignals:
    return MixtureSignals(task_index=task, num_tasks=num_tasks, batch_in_task=0, step=100 * task, steps_in_task=100, progress=0.0,
                          probe_losses=[1.0 + j if j <= task else None for j in range(num_tasks)], source_sizes=[10] * (task + 1))


def test_replay_share_fixes_the_share_and_the_policy_splits_it_over_earlier_tasks():
    from lightning_cit.callbacks.proxymix.controller import ProxyMixController

    # logits: old tasks 0 and log 3, the current task (2) and the future task would dominate if they counted
    controller = ProxyMixController(policy_path=None, replay_share=0.2)
    controller.use_policy(_constant_policy([0.0, math.log(3.0), 9.0, 9.0]), explore=False, seed=0)
    assert controller.decide(_signals(0)) == [1.0, 0.0, 0.0, 0.0]  # task 0: only itself
    assert controller.decide(_signals(1)) == pytest.approx([0.2, 0.8, 0.0, 0.0])  # one old task takes the whole share
    weights = controller.decide(_signals(2))
    # renormalised softmax over tasks < 2: e^0 / (1 + 3) = 0.25 and 0.75 of the share 0.2
    assert weights == pytest.approx([0.05, 0.15, 0.8, 0.0])
    assert weights[3] == 0.0 and sum(weights) == pytest.approx(1.0)
    # without the constraint the same policy puts nearly everything on the current task (the paper's action)
    free = ProxyMixController(policy_path=None)
    free.use_policy(_constant_policy([0.0, math.log(3.0), 9.0, 9.0]), explore=False, seed=0)
    assert free.decide(_signals(2))[2] > 0.99
    with pytest.raises(ConfigError, match="replay_share"):
        ProxyMixController(policy_path=None, replay_share=1.5)


def test_replay_share_in_explore_mode_samples_and_records_only_the_split():
    from lightning_cit.callbacks.proxymix.controller import ProxyMixController

    policy = _constant_policy([0.5, -0.5, 2.0, 0.0])
    controller = ProxyMixController(policy_path=None, replay_share=0.3)
    controller.use_policy(policy, explore=True, seed=7)
    controller.decide(_signals(1))
    assert controller.pending is None  # one old task: nothing to choose
    weights = controller.decide(_signals(3))
    pending = controller.pending
    assert pending["mask"] == [1.0, 1.0, 1.0, 0.0]  # the logits that act: tasks < 3
    action = torch.tensor(pending["action"])
    split = torch.softmax(action[:3], dim=0)  # the sampled logits, renormalised over the old tasks
    assert weights == pytest.approx([0.3 * float(v) for v in split] + [0.7])
    assert sum(weights) == pytest.approx(1.0)
    # its log-probability is over those three logits only (std = e^0 = 1)
    expected = torch.distributions.Normal(torch.tensor([0.5, -0.5, 2.0]), 1.0).log_prob(action[:3]).sum()
    assert pending["log_prob"] == pytest.approx(float(expected), rel=1e-6)
    assert controller.scores_section()["replay_share"] == 0.3


def test_learning_curve_plateau_rule_by_hand():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from proxymix_curve import moving_average, plateau
    finally:
        sys.path.pop(0)
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plateau([0.0] * 5, 3)["verdict"] == "too short"
    flat = plateau([1.0, 3.0] * 10, 10)  # both windows: mean 2, sd sqrt(10/9)
    assert flat["verdict"] == "plateau" and flat["difference"] == 0.0 and flat["sd_last"] == pytest.approx((10 / 9) ** 0.5)
    rising = plateau([float(i) for i in range(20)], 10)  # means 4.5 -> 14.5, variances 55/6: t = 10 / sqrt(2 * 55/6 / 10)
    assert rising["verdict"] == "rising" and rising["welch_t"] == pytest.approx(10 / (2 * 55 / 6 / 10) ** 0.5)
