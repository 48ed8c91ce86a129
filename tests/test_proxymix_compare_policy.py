"""ProxyMix for comparison setting A (issue 19): the proxy of setting A's own sequence, its training config, the grid
entry the learned policy runs under, and the split the controller reports (docs/results/proxymix-compare-policy.md)."""

import sys

import pytest
from conftest import REPO

from lightning_cit.cli import resolve_config

SETTING_A = ["configs/quickstart.yaml", "configs/compare/full.yaml"]
TRAIN = "configs/compare/proxymix_train.yaml"
CONTROLLER = "lightning_cit.callbacks.ProxyMixController"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths (and fit_config) are relative to the repository root


def _episode_configs() -> tuple[list[str], object]:
    """The --config files of one training episode (fit_config, then the --config files of fit_args), and the parsed train config."""
    from lightning_cit.callbacks.proxymix.commands import train_parser

    args = train_parser().parse_args(["--config", TRAIN])
    fit_args = list(args.fit_args)
    return [args.fit_config] + [fit_args[i + 1] for i, arg in enumerate(fit_args) if arg == "--config"], args


def test_the_proxy_trains_setting_a_sequence_under_the_grid_share():
    configs, args = _episode_configs()
    assert configs[:2] == SETTING_A and configs[2] == "configs/compare/proxymix_proxy.yaml"
    assert args.out == "runs/proxymix/compare-full/controller.pt" and args.work_dir == "runs/proxymix/compare-full"
    assert args.policy.max_tasks >= 5
    proxy, target = resolve_config(configs), resolve_config(SETTING_A)
    # the same tasks, in the same order, from the same sources, metrics and sizes (the whole task spec is inherited)
    assert [t["name"] for t in proxy["data"]["tasks"]] == ["safety", "cipher_a", "cipher_b", "shift", "compare"]
    assert proxy["data"]["tasks"] == target["data"]["tasks"]
    # one controller, the grid's 5% share, exploring; 6 decisions per task like the target's 50 in 300 steps
    controller = proxy["trainer"]["callbacks"][0]
    assert controller["class_path"] == CONTROLLER
    init = controller["init_args"]
    assert init["replay_share"] == 0.05 and init["explore"] is True and init["policy_path"] == args.out
    assert proxy["data"]["steps_per_task"] / init["decision_interval"] == target["data"]["steps_per_task"] / 50 == 6
    # smaller and cheaper than the target, but the same kind of training: full fine-tuning of a random-init tiny Llama
    assert proxy["model"]["model"] == target["model"]["model"] == "tiny" and proxy["model"]["lora"] is None is target["model"]["lora"]
    assert (proxy["model"]["tiny"]["hidden_size"], proxy["model"]["tiny"]["num_hidden_layers"]) == (64, 1)
    assert (target["model"]["tiny"]["hidden_size"], target["model"]["tiny"]["num_hidden_layers"]) == (128, 2)
    assert proxy["data"]["global_batch_size"] * proxy["data"]["steps_per_task"] == 16 * 120
    # the evaluator the reward needs: the controller's fresh probes and the safety rows; no checkpoints to write
    evaluator = proxy["trainer"]["callbacks"][1]
    assert evaluator["class_path"] == "lightning_cit.callbacks.ForgettingEvaluator" and evaluator["init_args"]["score"] == "needed"
    assert len(proxy["trainer"]["callbacks"]) == 2 and proxy["trainer"]["enable_checkpointing"] is False


def test_the_grid_entry_runs_the_learned_policy_on_setting_a_at_five_percent(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import proxymix_compare_policy as bench
    finally:
        sys.path.pop(0)
    from lightning_cit.compare import resolved, run_config

    grid = bench.grid_with_method(tmp_path / "grid.yaml")
    runs = [r for r in grid.runs() if r.method.name == bench.METHOD_NAME]
    assert [(r.setting.name, r.budget, r.seed) for r in runs] == [("full", 0.05, 0), ("full", 0.05, 1), ("full", 0.05, 2)]
    data = run_config(resolved(runs[1].setting.config, REPO), runs[1])
    assert [c["class_path"] for c in data["trainer"]["callbacks"]] == [
        CONTROLLER, "lightning_cit.callbacks.ForgettingEvaluator", "lightning_cit.callbacks.CostMeter"]
    assert data["trainer"]["callbacks"][0]["init_args"] == {
        "policy_path": "runs/proxymix/compare-full/controller.pt", "replay_share": 0.05, "decision_interval": 50}
    assert (data["seed_everything"], data["data"]["seed"], data["data"]["steps_per_task"]) == (1, 1, 300)
    _, args = _episode_configs()
    assert data["trainer"]["callbacks"][0]["init_args"]["policy_path"] == args.out  # the grid reads what the training writes


def test_scores_section_reports_the_split_over_earlier_tasks():
    from lightning_cit.callbacks.proxymix.controller import ProxyMixController

    controller = ProxyMixController(policy_path=None, replay_share=0.2)
    controller.decisions = [
        {"task": 0, "batch": 0, "weights": [1.0, 0.0, 0.0]},
        {"task": 1, "batch": 5, "weights": [0.2, 0.8, 0.0]},
        {"task": 2, "batch": 10, "weights": [0.05, 0.15, 0.8]},  # split 0.25 / 0.75
        {"task": 2, "batch": 15, "weights": [0.1, 0.1, 0.8]},  # split 0.5 / 0.5
    ]
    section = controller.scores_section()
    assert section["mean_split_per_task"] == {"1": [1.0], "2": [pytest.approx(0.375), pytest.approx(0.625)]}
    assert section["mean_replay_share_per_task"] == {"0": 0.0, "1": pytest.approx(0.2), "2": pytest.approx(0.2)}
