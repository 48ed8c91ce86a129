"""lightning-cit compare: grid files, the measured budget, paired statistics and a real two-run grid."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from lightning_cit.compare import (
    Grid,
    Method,
    RunSpec,
    Setting,
    bootstrap_interval,
    load_grid,
    mean_se,
    quick_grid,
    resolved,
    run_config,
    summarize,
    verdict,
)
from lightning_cit.errors import ConfigError

TINY = {
    "trainer": {"enable_progress_bar": False, "log_every_n_steps": 5},
    "model": {"tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}, "eval_batch_size": 16},
    "data": {
        "global_batch_size": 8, "steps_per_task": 6, "buffer_size": 8,
        "tasks": [
            {"name": "cipher_a", "source": "synth:cipher_a", "metric": "edit_similarity", "train_size": 32, "eval_size": 4, "probe_size": 4, "max_new_tokens": 8},
            {"name": "compare", "source": "synth:compare", "metric": "mc_accuracy", "train_size": 32, "eval_size": 4, "probe_size": 4},
        ],
    },
}
FIXED = {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": "{budget}"}}


def write_grid(tmp_path: Path, **changes) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    grid = {
        "title": "test grid",
        "settings": {"tiny": {"title": "two tiny tasks", "config": ["configs/quickstart.yaml", str(tmp_path / "tiny.yaml")]}},
        "methods": {
            "No replay": {"budget": "none", "callbacks": [{"class_path": "lightning_cit.callbacks.NoReplay"}]},
            "Fixed ratio": {"callbacks": [FIXED]},
        },
        "budgets": [0.5], "main_budget": 0.5, "seeds": [0], "budget_seeds": [0],
    }
    grid.update(changes)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_bootstrap_interval_and_verdicts_by_hand():
    low, high = bootstrap_interval([1.0, 2.0, 3.0])
    assert 1.0 <= low < 2.0 < high <= 3.0  # percentile interval of the resampled means lies within the data's range
    assert verdict(low, high) == "wins" and verdict(low, high, higher_is_better=False) == "loses"
    low, high = bootstrap_interval([-1.0, 1.0])
    assert low == -1.0 and high == 1.0 and verdict(low, high) == "tie"  # the means of 2-point resamples are -1, 0, 1
    assert bootstrap_interval([0.0, 0.0, 0.0]) == (0.0, 0.0)  # identical pairs: a degenerate interval, a tie
    assert all(math.isnan(v) for v in bootstrap_interval([4.0])) and verdict(float("nan"), float("nan")) == "n/a"
    mean, se = mean_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))


def _record(setting, method, budget, seed, acc, bwt, share, flops, cpu):
    return {"setting": setting, "method": method, "budget": budget, "seed": seed, "wall_s": 1.0, "tasks": ["a", "b"],
            "matrix": [[0, 0], [90, 0], [80, 95]], "rows": ["base", "a", "b"], "summary": {"acc": acc, "bwt_gem": bwt, "nta": 92.5},
            "cost": {"replay_share": share, "optimizer_steps": 10, "tokens": 100, "cpu_s": {"total": cpu, "evaluation": 1.0},
                     "forward_positions": {"train": flops, "evaluation": 20, "rollout": 7}, "backward_positions": {"train": flops, "evaluation": 0}}}


def test_summary_pairs_methods_by_seed_and_divides_cost_by_the_baseline():
    s = Setting("s", "s", [])
    grid = Grid("t", [s], [Method("No replay", [{}], "none"), Method("Fixed ratio", [{}]), Method("M", [{}])], [0.05], 0.05,
                [0, 1, 2], [0], "Fixed ratio", "No replay", {}, "grid.yaml")
    records = [_record("s", "No replay", None, k, 50, -40, 0.0, 110.0, 11.0) for k in range(3)]
    records += [_record("s", "Fixed ratio", 0.05, k, 70 + k, -10, 0.05, 120.0, 13.0) for k in range(3)]
    records += [_record("s", "M", 0.05, k, 72 + 2 * k, -8 - k, 0.049, 210.0, 21.0) for k in range(3)]
    cells = {c["method"]: c for c in summarize(grid, records)["cells"]}
    m = cells["M"]
    assert m["acc"] == 74.0 and m["acc_se"] == pytest.approx(math.sqrt(4 / 3))  # 72, 74, 76
    assert m["replay_share"] == pytest.approx(0.049)
    assert m["flops_ratio"] == pytest.approx((6 * 210 + 2 * 7) / (6 * 110 + 2 * 7))  # 2 per forward + 4 per backward position; evaluation left out
    assert m["cpu_ratio"] == pytest.approx(20.0 / 10.0)
    assert m["extra_forward_positions"] == 7  # rollout; neither the training step nor evaluation
    diff = m["vs_reference"]["acc"]  # M - Fixed ratio per seed: 2, 3, 4 -> all positive, a win
    assert diff["mean"] == 3.0 and diff["pairs"] == 3 and diff["verdict"] == "wins"
    bwt = m["vs_reference"]["bwt_gem"]  # 2, 1, 0 -> the interval reaches 0: a tie
    assert bwt["mean"] == 1.0 and bwt["low"] >= 0.0 and bwt["verdict"] in ("tie", "wins")
    assert "vs_reference" not in cells["Fixed ratio"] and "vs_reference" not in cells["No replay"]
    assert m["diagonal"] == [90.0, 95.0]


@pytest.mark.parametrize("change, message", [
    ({"budgets": [0.0]}, "budgets must be replay shares"),
    ({"main_budget": 0.3}, "main_budget 0.3 is not one of budgets"),
    ({"reference": "Missing"}, "reference 'Missing' is not a method"),
    ({"methods": {"Fixed ratio": {"callbacks": [{"class_path": "lightning_cit.callbacks.FixedRatio"}]}, "No replay": {"budget": "none", "callbacks": [{"class_path": "x.Y"}]}}},
     "no init arg is '{budget}'"),
    ({"methods": {"Fixed ratio": {"callbacks": [FIXED, {"class_path": "lightning_cit.callbacks.ForgettingEvaluator"}]}, "No replay": {"budget": "none", "callbacks": [{"class_path": "x.Y"}]}}},
     "is the grid's own"),
    ({"seed": 3}, "unknown keys ['seed']"),
])
def test_bad_grid_files_are_refused_naming_the_field(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")):
        load_grid(write_grid(tmp_path, **change), REPO)


def test_a_setting_can_run_more_seeds_at_the_other_budgets(tmp_path):
    tiny = {"config": ["configs/quickstart.yaml", str(tmp_path / "tiny.yaml")]}
    settings = {"a": {**tiny, "budget_seeds": [0, 1, 2]}, "b": dict(tiny)}
    grid = load_grid(write_grid(tmp_path, settings=settings, budgets=[0.1, 0.5], main_budget=0.5, seeds=[0, 1], budget_seeds=[0]), REPO)
    plan = sorted((r.setting.name, r.method.name, r.budget, r.seed) for r in grid.runs())
    fixed = [(s, b, seed) for s, m, b, seed in plan if m == "Fixed ratio"]
    assert fixed == [("a", 0.1, 0), ("a", 0.1, 1), ("a", 0.1, 2), ("a", 0.5, 0), ("a", 0.5, 1),
                     ("b", 0.1, 0), ("b", 0.5, 0), ("b", 0.5, 1)]
    quick = quick_grid(grid)  # the quick size keeps its own seeds everywhere
    assert sorted(r.seed for r in quick.runs() if r.setting.name == "a" and r.budget == 0.1) == [0]
    with pytest.raises(ConfigError, match=r"settings.a: unknown keys \['seeds'\]"):
        load_grid(write_grid(tmp_path, settings={"a": {**tiny, "seeds": [1]}}), REPO)


def test_a_run_keeps_the_settings_evaluator_and_adds_the_cost_meter(tmp_path):
    grid = load_grid(write_grid(tmp_path), REPO)
    setting = grid.settings[0]
    fixed = next(m for m in grid.methods if m.name == "Fixed ratio")
    data = run_config(resolved(setting.config, REPO), RunSpec(setting, fixed, 0.5, 7))
    names = [c["class_path"] for c in data["trainer"]["callbacks"]]
    assert names == ["lightning_cit.callbacks.FixedRatio", "lightning_cit.callbacks.ForgettingEvaluator", "lightning_cit.callbacks.CostMeter"]
    assert data["trainer"]["callbacks"][0]["init_args"]["ratio"] == 0.5
    assert data["seed_everything"] == 7 and data["data"]["seed"] == 7 and data["trainer"]["enable_checkpointing"] is False


def test_compare_runs_a_grid_measures_the_budget_and_reuses_finished_runs(tmp_path):
    grid = write_grid(tmp_path)
    cmd = [sys.executable, "-m", "lightning_cit.cli", "compare", str(grid), "--runs", str(tmp_path / "runs"),
           "--out", str(tmp_path / "out" / "compare"), "--parallel", "2"]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("] tiny · ") == 2  # one progress line per run
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    cells = {c["method"]: c for c in report["cells"]}
    assert cells["No replay"]["replay_share"] == 0.0
    assert 0.3 < cells["Fixed ratio"]["replay_share"] < 0.7  # measured: 48 samples of task 2, each replayed with p = 0.5
    run = next(r for r in report["runs"] if r["method"] == "Fixed ratio")
    assert run["cost"]["replay_share"] == cells["Fixed ratio"]["replay_share"]
    assert cells["No replay"]["flops_ratio"] == 1.0
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "| Fixed ratio | 50% |" in text and "Regenerate: `lightning-cit compare" in text
    for figure in ("pareto_tiny.png", "cost_tiny.png", "curves_tiny.png"):
        assert (tmp_path / "out" / "compare" / figure).stat().st_size > 1000
    again = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count(": reused;") == 2  # finished runs are never redone
    changed = write_grid(tmp_path, methods={"No replay": {"budget": "none", "callbacks": [{"class_path": "lightning_cit.callbacks.NoReplay"}]},
                                            "Fixed ratio": {"callbacks": [FIXED], "data": {"buffer_size": 4}}})
    assert changed == grid
    refused = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "used another config" in refused.stderr


def test_method_facts_average_numbers_over_seeds_and_keep_agreeing_labels():
    from lightning_cit.compare import method_facts

    records = [{"setting": "s", "method": "LCIA", "budget": None, "methods": {"DynamicEMA": {"fallback_rate": rate, "rule": "code", "per_task": {}}}}
               for rate in (0.2, 0.4)]
    records.append({"setting": "s", "method": "No replay", "budget": None, "methods": {}})
    (fact,) = method_facts(records)
    assert fact["section"] == "DynamicEMA" and fact["seeds"] == 2
    assert fact["values"] == {"fallback_rate": pytest.approx(0.3), "rule": "code"}  # nested per_task left to compare.json


def test_the_shipped_grid_loads_and_every_run_composes():
    grid = load_grid(REPO / "configs" / "compare" / "grid.yaml", REPO)
    runs = grid.runs()
    assert {r.setting.name for r in runs} == {s.name for s in grid.settings}
    assert all(m.settings is None or set(m.settings) <= {s.name for s in grid.settings} for m in grid.methods)
    for run in {(r.setting.name, r.method.name): r for r in runs}.values():  # one run per (setting, method): its config resolves
        data = run_config(resolved(run.setting.config, REPO), run)
        names = [c["class_path"] for c in data["trainer"]["callbacks"]]
        assert names[-2:] == ["lightning_cit.callbacks.ForgettingEvaluator", "lightning_cit.callbacks.CostMeter"], (run.label(), names)
        assert "{budget}" not in json.dumps(data)
