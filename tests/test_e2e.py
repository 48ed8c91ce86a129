"""End-to-end runs through the lightning-cit CLI on a short cit-synth sequence."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from lightning_cit.cli import main
from lightning_cit.metrics import SUMMARY_KEYS

STEPS = 12
COST = {"class_path": "lightning_cit.callbacks.CostMeter"}


def cost_of(root: Path) -> dict:
    files = list(root.rglob("cost.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def measured(seen: list[list[int]], sources: list[list[int]]) -> tuple[int, int]:
    """(samples, replayed samples) over tasks 2..T from RecordSamples' records: a replayed sample's source is an earlier task."""
    samples = replayed = 0
    for (epoch, *_), batch_sources in zip(seen, sources):
        if epoch > 0:
            samples += len(batch_sources)
            replayed += sum(1 for source in batch_sources if source != epoch)
    return samples, replayed


def small_config(tmp_path: Path, controller: dict | None = None, extra_callbacks=(), every_n_train_steps=5) -> Path:
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["log_every_n_steps"] = 5
    callbacks = config["trainer"]["callbacks"]
    if controller is not None:
        callbacks[0] = controller
    callbacks[1]["init_args"]["probe_every_n_steps"] = 3
    callbacks[2]["init_args"]["every_n_train_steps"] = every_n_train_steps
    callbacks[2]["init_args"]["keep_mid_task"] = None  # tests resume from mid-task files of earlier tasks
    callbacks.extend(extra_callbacks)
    config["data"]["steps_per_task"] = STEPS
    config["data"]["global_batch_size"] = 8
    config["data"]["tasks"] = [
        {"name": "safety", "source": "synth:safety", "train_size": 64, "eval_size": 8, "probe_size": 4, "max_new_tokens": 34},
        {"name": "cipher_a", "source": "synth:cipher_a", "train_size": 64, "eval_size": 8, "probe_size": 4, "max_new_tokens": 8},
        {"name": "compare", "source": "synth:compare", "train_size": 64, "eval_size": 8, "probe_size": 4},
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, root: Path, *extra: str) -> dict:
    code = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root), *extra])
    assert code == 0
    files = list(root.rglob("scores.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_fit_through_the_cli_writes_the_score_matrix(tmp_path, capsys):
    scores = run(small_config(tmp_path), tmp_path / "run")
    assert scores["tasks"] == ["safety", "cipher_a", "compare"]
    assert scores["rows"] == ["base", "safety", "cipher_a", "compare"]
    assert scores["metrics"] == {"safety": "exact_match", "cipher_a": "edit_similarity", "compare": "mc_accuracy"}
    assert len(scores["matrix"]) == 4 and all(len(r) == 3 for r in scores["matrix"])
    assert all(0 <= v <= 100 for r in scores["matrix"] for v in r)
    assert scores["complete"] and set(SUMMARY_KEYS) <= set(scores["summary"])
    assert {"refusal_harmful", "over_refusal_benign", "score"} <= set(scores["safety"])
    run_dir = next((tmp_path / "run").rglob("scores.json")).parent
    assert (run_dir / "scores.csv").exists() and (run_dir / "scores.png").exists()
    assert (run_dir / "config.yaml").exists()
    assert "score matrix" in capsys.readouterr().out
    # every output of the run lives under default_root_dir
    assert not (REPO / "lightning_logs").exists()


@pytest.mark.parametrize(
    "controller",
    [
        {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.25}},
        {"class_path": "lightning_cit.callbacks.Proportional", "init_args": {"decision_interval": 4}},
    ],
    ids=["fixed_ratio", "proportional"],
)
def test_resume_from_a_mid_task_checkpoint_reproduces_the_run(tmp_path, controller):
    record = {"class_path": "helpers_callbacks.RecordSamples", "init_args": {"out_dir": str(tmp_path / "rec_full")}}
    full = run(small_config(tmp_path, controller, [record, COST]), tmp_path / "full")
    checkpoints = sorted((tmp_path / "full").rglob("epoch=1-step=15.ckpt"))  # mid-task 2
    assert checkpoints, sorted(p.name for p in (tmp_path / "full").rglob("*.ckpt"))
    record["init_args"]["out_dir"] = str(tmp_path / "rec_resumed")
    resumed = run(small_config(tmp_path, controller, [record, COST]), tmp_path / "resumed", "--ckpt_path", str(checkpoints[0]))
    assert resumed["matrix"] == full["matrix"]
    # the cost meter continues the interrupted run's counts: everything but CPU time is identical
    cost_full, cost_resumed = cost_of(tmp_path / "full"), cost_of(tmp_path / "resumed")
    for record_ in (cost_full, cost_resumed):
        record_.pop("cpu_s")
    assert cost_resumed == cost_full
    assert resumed["loss_matrix"] == full["loss_matrix"]
    # the resumed run trained on exactly the batches the uninterrupted run trained on after step 15
    seen_full = json.loads((tmp_path / "rec_full" / "rank0.json").read_text())
    seen_resumed = json.loads((tmp_path / "rec_resumed" / "rank0.json").read_text())
    assert seen_resumed["seen"] == [b for b in seen_full["seen"] if b[1] > 15]
    assert seen_resumed["schedule"] == seen_full["schedule"]


def test_replay_draws_only_from_earlier_tasks_at_the_configured_ratio(tmp_path):
    record = {"class_path": "helpers_callbacks.RecordSamples", "init_args": {"out_dir": str(tmp_path / "rec")}}
    controller = {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.5}}
    run(small_config(tmp_path, controller, [record, COST]), tmp_path / "run")
    data = json.loads((tmp_path / "rec" / "rank0.json").read_text())
    cost = cost_of(tmp_path / "run")  # the CostMeter's counts equal the batches' own records
    samples, replayed = measured(data["seen"], data["sources"])
    assert cost["replay_share"] == replayed / samples
    assert cost["samples"] == 3 * STEPS * 8 and cost["optimizer_steps"] == 3 * STEPS
    assert cost["forwards"]["train"] == 3 * STEPS and cost["backward_positions"] == {"train": cost["forward_positions"]["train"]}
    assert cost["forwards"]["evaluation"] > 0 and cost["forwards"]["probe"] > 0  # scored rows and probes, each in its scope
    assert cost["flops"]["total"] == sum(cost["flops"]["by_scope"].values())
    per_task: dict[int, list[int]] = {}
    for (epoch, *_), sources in zip(data["seen"], data["sources"]):
        per_task.setdefault(epoch, []).extend(sources)
    assert set(per_task[0]) == {0}
    assert set(per_task[1]) <= {0, 1} and 0.3 < per_task[1].count(0) / len(per_task[1]) < 0.7
    assert set(per_task[2]) <= {0, 1, 2}  # never a future task


def test_a_crash_keeps_the_rows_already_written_and_resumes_from_last(tmp_path):
    fail = {"class_path": "helpers_callbacks.FailAt", "init_args": {"step": 18}}
    crashing = small_config(tmp_path, extra_callbacks=[fail])
    with pytest.raises(RuntimeError, match="injected failure"):
        main(["fit", "--config", str(crashing), "--trainer.default_root_dir", str(tmp_path / "run")])
    scores = json.loads(next((tmp_path / "run").rglob("scores.json")).read_text())
    assert scores["rows"] == ["base", "safety"] and not scores["complete"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    # `--ckpt_path last` in the same root continues from the step-15 checkpoint and ends as an unbroken run
    (tmp_path / "resume").mkdir()
    config = small_config(tmp_path / "resume")
    code = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", "last"])
    assert code == 0
    resumed = json.loads((tmp_path / "run" / "lightning_logs" / "version_1" / "scores.json").read_text())
    reference = run(config, tmp_path / "reference")
    assert resumed["matrix"] == reference["matrix"] and resumed["complete"]


def test_validate_and_test_subcommands_score_a_checkpoint(tmp_path):
    config = small_config(tmp_path)
    run(config, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for subcommand in ("validate", "test"):
        code = main([subcommand, "--config", str(config), "--trainer.default_root_dir", str(tmp_path / subcommand), "--ckpt_path", str(ckpt)])
        assert code == 0
        metrics = (tmp_path / subcommand).rglob("metrics.csv")
        header = next(metrics).read_text().splitlines()[0]
        prefix = "val" if subcommand == "validate" else "test"
        assert f"{prefix}/score/cipher_a" in header and f"{prefix}/loss/compare" in header


@pytest.mark.parametrize(
    "controller",
    [
        {"class_path": "lightning_cit.callbacks.Proportional", "init_args": {"decision_interval": 4}},
        {"class_path": "lightning_cit.callbacks.MSSRReplay", "init_args": {"lambda_0": 0.3, "decision_interval": 4, "rescore_interval": 5}},
    ],
    ids=["proportional", "mssr"],
)
def test_ddp_two_processes_on_cpu(tmp_path, controller):
    record = {"class_path": "helpers_callbacks.RecordSamples", "init_args": {"out_dir": str(tmp_path / "rec")}}
    config = small_config(tmp_path, controller, [record, COST])
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config),
           "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "run").rglob("scores.json"))) == 1
    r0 = json.loads((tmp_path / "rec" / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rec" / "rank1.json").read_text())
    assert r0["schedule"] == r1["schedule"]  # mixture weights agree across ranks
    assert r0["memory"] == r1["memory"]  # MSSR memory states too (empty for other controllers)
    if "MSSR" in controller["class_path"]:
        assert any(not math.isnan(v) for per_task in r0["memory"]["ema"].values() for v in per_task)  # reviews happened
    assert len(r0["seen"]) == len(r1["seen"]) == 3 * STEPS
    cost = cost_of(tmp_path / "run")  # counts summed over both ranks
    s0, p0 = measured(r0["seen"], r0["sources"])
    s1, p1 = measured(r1["seen"], r1["sources"])
    assert cost["samples"] == 3 * STEPS * 8 and cost["replay_share"] == (p0 + p1) / (s0 + s1)
    for a, b in zip(r0["seen"], r1["seen"]):
        assert len(a) - 2 == len(b) - 2 == 4  # global batch 8 over 2 ranks
        current_a = {s for s in a[2:]}
        current_b = {s for s in b[2:]}
        # current-task samples are drawn without replacement within a pass: disjoint across ranks
        assert not (current_a & current_b) or a[0] > 0


def test_a_crash_during_the_task_end_resumes_from_the_step_before_and_replays_the_task_end(tmp_path):
    # every_n_train_steps divides the task length: a plain ModelCheckpoint would save on the task's last
    # step, and Lightning would then resume past the task end and lose its score row
    fail = {"class_path": "helpers_callbacks.FailAtTaskEnd", "init_args": {"task": 0}}
    crashing = small_config(tmp_path, extra_callbacks=[fail], every_n_train_steps=STEPS // 2)
    with pytest.raises(RuntimeError, match="injected failure at the end of task 0"):
        main(["fit", "--config", str(crashing), "--trainer.default_root_dir", str(tmp_path / "run")])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS // 2  # not the task's last step
    (tmp_path / "resume").mkdir()
    config = small_config(tmp_path / "resume", every_n_train_steps=STEPS // 2)
    assert main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", "last"]) == 0
    resumed = json.loads((tmp_path / "run" / "lightning_logs" / "version_1" / "scores.json").read_text())
    reference = run(config, tmp_path / "reference")
    assert resumed["rows"] == reference["rows"] == ["base", "safety", "cipher_a", "compare"]
    assert resumed["matrix"] == reference["matrix"]
    # and the task-end checkpoint of the reference run resumes into the next task with the same result
    at_end = next((tmp_path / "reference").rglob(f"epoch=0-step={STEPS}.ckpt"))
    again = run(config, tmp_path / "from_task_end", "--ckpt_path", str(at_end))
    assert again["matrix"] == reference["matrix"]
