"""benchmarks/proxymix_mirror.py: φ, Spearman ρ and its exact permutation p-value on hand-computed score matrices,
the verdict rule, the shipped sequence, and the resumability rule (a run with a complete scores.json is never redone).
No training."""

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import REPO
from scipy.stats import spearmanr

sys.path.insert(0, str(REPO / "benchmarks"))
import proxymix_mirror as pm

sys.path.remove(str(REPO / "benchmarks"))

TASKS = ["t1", "t2", "t3", "t4", "t5", "t6", "t7"]  # 7 trained, 6 scorable


def scores(diagonal: list[float], final: list[float], tasks: list[str] = TASKS) -> dict:
    """A scores.json (base row + one row per task) with the given A_i(i) and A_i(T); other cells are None."""
    n = len(tasks)
    matrix = [[None] * n for _ in range(n + 1)]
    for i in range(n):
        matrix[i + 1][i] = diagonal[i]
    matrix[n] = list(final)
    matrix[n][n - 1] = diagonal[n - 1]
    return {"tasks": tasks, "matrix": matrix, "complete": True}


def test_phi_per_task_from_the_diagonal_and_the_last_row():
    # φ_i = (A_i(i) − A_i(T)) / max(A_i(i), 0.001): 100→0 is 1, 80→60 is 0.25, 50→50 is 0, 40→60 is −0.5, 0→10 is −10000
    s = scores([100, 80, 50, 40, 0, 90, 100], [0, 60, 50, 60, 10, 9, 100])
    phi = pm.vulnerability(s)
    assert list(phi) == TASKS[:-1]
    assert [phi[t] for t in TASKS[:-1]] == pytest.approx([1.0, 0.25, 0.0, -0.5, -10_000.0, 0.9])


def test_same_ranking_gives_rho_one_and_the_smallest_p():
    proxy = scores([100] * 7, [90, 80, 70, 60, 50, 40, 100])   # φ 0.1 .. 0.6
    target = scores([50] * 7, [49, 45, 40, 30, 20, 0, 50])     # φ 0.02, 0.1, 0.2, 0.4, 0.6, 1.0: same order
    stats = pm.pair_statistics(pm.vulnerability(proxy), pm.vulnerability(target))
    assert stats["tasks"] == TASKS[:-1]
    assert stats["phi_target"] == pytest.approx([0.02, 0.1, 0.2, 0.4, 0.6, 1.0])
    assert stats["spearman_rho"] == pytest.approx(1.0)
    assert stats["p_one_sided"] == pytest.approx(1 / 720)  # only the observed pairing of 6! reaches ρ = 1
    assert stats["p_two_sided"] == pytest.approx(2 / 720)  # and its reverse reaches |ρ| = 1
    assert stats["ci95"] == pytest.approx([1.0, 1.0])      # every resample keeps the order
    assert pm.verdict([stats] * 3) == "supported"


def test_reversed_ranking_gives_rho_minus_one_and_is_not_support():
    x = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    stats = pm.pair_statistics(dict(zip(TASKS, x)), dict(zip(TASKS, reversed(x))))
    assert stats["spearman_rho"] == pytest.approx(-1.0)
    assert stats["p_one_sided"] == pytest.approx(1.0)       # every pairing has ρ ≥ −1
    assert stats["p_two_sided"] == pytest.approx(2 / 720)
    assert pm.verdict([stats, stats, stats]) == "not supported"


def test_one_adjacent_swap_of_five_tasks():
    # n = 5, one adjacent swap: Σd² = 2, ρ = 1 − 6·2 / (5·24) = 0.9; ρ ≥ 0.9 only for the identity and the 4 adjacent
    # swaps (Σd² ≤ 2), so p one-sided = 5/120, and by symmetry p two-sided = 10/120
    p_one, p_two = pm.permutation_p([1, 2, 3, 4, 5], [2, 1, 3, 4, 5])
    assert pm.spearman([1, 2, 3, 4, 5], [2, 1, 3, 4, 5]) == pytest.approx(0.9)
    assert (p_one, p_two) == (pytest.approx(5 / 120), pytest.approx(10 / 120))


def test_ties_take_mean_ranks_as_spearman_does():
    x, y = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.3, 0.3, 0.5, 0.6, 0.8, 0.9]
    # ranks of y: 1.5, 1.5, 3, 4, 5, 6; deviations from 3.5: Σ dx·dy = 17, Σ dx² = 17.5, Σ dy² = 17
    rho = 17 / (17.5 * 17) ** 0.5
    assert pm.spearman(x, y) == pytest.approx(rho) and spearmanr(x, y).statistic == pytest.approx(rho)
    p_one, p_two = pm.permutation_p(x, y)
    # ρ is the largest these ranks allow; reached by the observed pairing and by the one that swaps the tied pair
    assert p_one == pytest.approx(2 / 720)
    assert p_two == pytest.approx(4 / 720)  # and the two reversed pairings reach −ρ
    assert all(math.isnan(p) for p in pm.permutation_p([1, 1, 1, 1, 1], [1, 2, 3, 4, 5]))  # a constant side ranks nothing


def test_verdict_partly():
    good = {"spearman_rho": 0.94, "p_one_sided": 0.0042}
    weak = {"spearman_rho": 0.6, "p_one_sided": 0.12}
    assert pm.verdict([good, weak, good]) == "partly supported"
    assert pm.verdict([weak, weak, weak]) == "not supported"


@pytest.mark.parametrize("shape", list(pm.SHAPES))
def test_the_sequence_composes_with_six_scorable_tasks_and_replay(shape, monkeypatch):
    from lightning_cit.cli import resolve_config

    monkeypatch.chdir(REPO)
    config = resolve_config(pm.SHAPES[shape])
    trained = [t["name"] for t in config["data"]["tasks"] if t.get("train", True)]
    assert len(trained) >= 6 and len(trained) - 1 >= 5
    assert trained == ["safety", "cipher_a", "para_b1", "cipher_c", "para_a2", "cipher_b", "para_a1"]
    controller, evaluator = config["trainer"]["callbacks"][:2]
    assert controller == {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.1}}
    assert evaluator["init_args"]["every_n_tasks"] == 1  # φ needs every diagonal entry
    width, layers = (int(v) for v in shape.split("x"))
    assert (config["model"]["tiny"]["hidden_size"], config["model"]["tiny"]["num_hidden_layers"]) == (width, layers)
    assert config["model"]["model"] == "aligned-base" and config["data"]["steps_per_task"] == 60
    assert config["trainer"]["default_root_dir"] == f"runs/proxymix/mirror/{shape}"


def _never(*_):
    raise AssertionError("a finished run was launched again")


def test_a_run_with_a_complete_scores_json_is_not_redone(tmp_path):
    done = tmp_path / "64x1-seed0" / "lightning_logs" / "version_0" / "scores.json"
    done.parent.mkdir(parents=True)
    s = scores([100] * 7, [90, 80, 70, 60, 50, 40, 100])
    done.write_text(json.dumps(s))
    assert pm.ensure_run(tmp_path, "64x1", 0, launch=_never) == s
    assert not (tmp_path / "64x1-seed0" / pm.CPU_FILE).exists()


def test_an_unfinished_run_is_resumed_from_last_ckpt_and_its_cost_recorded(tmp_path):
    root = tmp_path / "96x2-seed1"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(b"")
    partial = root / "lightning_logs" / "version_0" / "scores.json"
    partial.parent.mkdir(parents=True)
    partial.write_text(json.dumps({**scores([100] * 7, [0] * 7), "complete": False}))
    seen = []

    def launch(cmd, env, log):
        seen.append(cmd)
        out = root / "lightning_logs" / "version_1" / "scores.json"
        out.parent.mkdir(parents=True)
        out.write_text(json.dumps(scores([100] * 7, [90, 80, 70, 60, 50, 40, 100])))
        return 0

    result = pm.ensure_run(tmp_path, "96x2", 1, launch=launch)
    assert result["complete"] is True
    (cmd,) = seen
    assert cmd[-2:] == ["--ckpt_path", "last"]
    assert cmd[cmd.index("--seed_everything") + 1] == "1" and cmd[cmd.index("--data.seed") + 1] == "1"
    assert [Path(cmd[i + 1]).name for i, a in enumerate(cmd) if a == "--config"] == ["proxy.yaml", "mirror_sequence.yaml", "mirror_shape_96x2.yaml"]
    record = json.loads((root / pm.CPU_FILE).read_text())
    assert len(record["attempts"]) == 1 and record["attempts"][0]["returncode"] == 0
    assert pm.ensure_run(tmp_path, "96x2", 1, launch=_never) == result  # and now it is finished


def test_a_failed_run_raises(tmp_path):
    with pytest.raises(RuntimeError, match="128x2 seed 0 failed"):
        pm.ensure_run(tmp_path, "128x2", 0, launch=lambda cmd, env, log: 1)


def test_the_split_alone_predicts_part_of_any_ranking():
    # the re-taught tasks are the two least vulnerable, the others follow in any order: predictor ranks 1.5, 1.5, 4.5 x 4;
    # target ranks 1..6; deviations from 3.5: Σ dx·dy = 2.5·2 + 1.5·2 + (−0.5 + 0.5 + 1.5 + 2.5)·1 = 12, Σ dx² = 12, Σ dy² = 17.5
    target = {"safety": 0.94, "cipher_a": 0.04, "para_b1": 0.25, "cipher_c": 0.28, "para_a2": 0.07, "cipher_b": 0.27}
    assert pm.RETAUGHT == ("cipher_a", "para_a2")
    assert pm.partition_rho(target) == pytest.approx(12 / (12 * 17.5) ** 0.5)  # 0.828


def test_seed_bootstrap_of_identical_seeds_is_a_point():
    proxy = [dict(zip(TASKS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))] * 3
    target = [dict(zip(TASKS, [0.1, 0.3, 0.2, 0.4, 0.5, 0.6]))] * 2   # one adjacent swap of 6: ρ = 1 − 6·2 / (6·35) = 0.943
    low, high, usable = pm.seed_bootstrap(proxy, target, 50, 0)
    assert (low, high, usable) == (pytest.approx(1 - 12 / 210), pytest.approx(1 - 12 / 210), 50)


def test_the_report_reads_only_seeds_finished_on_every_shape(tmp_path):
    s = scores([100] * 7, [90, 80, 70, 60, 50, 40, 100])
    for shape, seed in [*((shape, 0) for shape in pm.SHAPES), ("64x1", 1)]:
        path = tmp_path / f"{shape}-seed{seed}" / "lightning_logs" / "version_0" / "scores.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(s))
    (tmp_path / "96x2-seed1").mkdir()  # started, not finished
    found, left_out = pm.collect(tmp_path)
    assert {shape: sorted(by_seed) for shape, by_seed in found.items()} == {shape: [0] for shape in pm.SHAPES}
    assert left_out == ["64x1 seed 1 (finished, its seed is not on every shape)", "96x2 seed 1", "128x2 seed 1", "192x3 seed 1"]
