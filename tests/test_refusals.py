"""Issue 16 (reliability, round 2): each fault is a clear refusal (exit 2, one ``error:`` line naming it) or a safe outcome.

Real ``lightning-cit`` runs in-process (:func:`lightning_cit.cli.main`) on the two-task quickstart of
``test_cli_errors``; the tool subcommands are called through the same entry point. The kill/resume side
(SIGTERM, a kill during a checkpoint write across filesystems, a full disk) is in ``test_reliability.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from test_cli_errors import QUICKSTART, assert_no_scores, error_line, small_config

from lightning_cit.cli import LOCK_FILE, main


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-cit"])


@pytest.fixture(scope="module")
def quickstart() -> dict:
    config = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    config["trainer"]["callbacks"][1]["init_args"]["heatmap"] = False
    return config


def fit(tmp_path: Path, config: dict, *extra: str, root: Path | None = None) -> tuple[int, Path]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    root = root or tmp_path / "run"
    argv = ["fit", "--config", str(path), "--data.steps_per_task", "2", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", *extra]
    return main(argv), root


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def plural_records(n: int = 12) -> list[dict]:
    return [{"prompt": f"Plural of cat{i}", "response": f"cats{i}"} for i in range(n)]


# ----------------------------------------------------------------------------------- 1, 12, 13: convert-gguf


def test_convert_gguf_never_deletes_what_it_did_not_write(tmp_path, capsys):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my files")
    assert main(["convert-gguf", "--gguf", str(gguf_file), "--out", str(out)]) == 2
    line = error_line(capsys)
    assert "is not a finished conversion" in line and str(out) in line
    assert (out / "notes.txt").read_text() == "my files"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "model.gguf"]  # no staging folder left either
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["convert-gguf", "--gguf", str(gguf_file), "--out", str(a_file)]) == 2
    assert "is a file" in error_line(capsys) and a_file.read_text() == "x"


@pytest.mark.parametrize("name", ["..", "../../x", "a/b", ".hidden"])
def test_convert_gguf_refuses_names_that_leave_the_cache(name, tmp_path, capsys):
    cache = tmp_path / "cache"
    (tmp_path / "keep.txt").write_text("keep")
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert main(["convert-gguf", "--gguf", str(gguf_file), "--name", name, "--cache_dir", str(cache)]) == 2
    line = error_line(capsys)
    assert repr(name) in line and "no '/', no '..'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "model.gguf"]


def test_convert_gguf_checks_files_before_the_optional_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # the package is absent: `import gguf` raises ImportError
    assert main(["convert-gguf", "--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.gguf' does not exist" in error_line(capsys)
    present = tmp_path / "model.gguf"
    present.write_bytes(b"GGUF")
    assert main(["convert-gguf", "--gguf", str(present), "--out", str(tmp_path / "x")]) == 2
    assert "needs the 'gguf' package: pip install gguf" in error_line(capsys)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------- 3: the lock


def test_a_second_run_into_the_same_directory_is_refused_and_a_dead_holder_does_not_block(tmp_path, quickstart, capsys):
    root = tmp_path / "run"
    root.mkdir()
    hold = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(root / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _ = fit(tmp_path, small_config(quickstart), root=root)
        assert code == 2
        line = error_line(capsys)
        assert "another lightning-cit run is using trainer.default_root_dir" in line and str(root) in line
        assert not (root / "checkpoints").exists() and not (root / "lightning_logs").exists()
    finally:
        holder.kill()  # like a SIGKILLed run: its lock file stays, the kernel drops the lock
        holder.wait()
    assert (root / LOCK_FILE).exists()
    code, _ = fit(tmp_path, small_config(quickstart), root=root)
    assert code == 0, capsys.readouterr().err[-2000:]
    assert len(list(root.rglob("scores.json"))) == 1


# -------------------------------------------------------------------------------------------- 4: controllers


def test_two_controllers_are_refused(tmp_path, quickstart, capsys):
    config = small_config(quickstart)
    config["trainer"]["callbacks"].insert(1, {"class_path": "lightning_cit.callbacks.NoReplay"})
    code, root = fit(tmp_path, config)
    assert code == 2
    line = error_line(capsys)
    assert "2 mixture controllers (FixedRatio, NoReplay)" in line and "keep one" in line
    assert_no_scores(root)


def test_no_controller_and_no_evaluator_say_what_the_run_will_not_do(tmp_path, quickstart):
    config = small_config(quickstart)
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("TaskCheckpoint")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, root = fit(tmp_path, config)
    assert code == 0
    said = " ".join(str(w.message) for w in caught)
    assert "no mixture controller" in said and "no replay of earlier tasks" in said
    assert "no ForgettingEvaluator" in said and "no scores.json is written" in said
    assert_no_scores(root)


# ------------------------------------------------------------------------------------------ 5: the resume rule


@pytest.fixture(scope="module")
def trained(tmp_path_factory, quickstart):
    """A finished two-task run (its config, data file and checkpoints) that the resume tests try to continue differently."""
    directory = tmp_path_factory.mktemp("trained")
    config = small_config(quickstart)
    data = jsonl(directory / "plurals.jsonl", plural_records())
    config["data"]["tasks"][1] = {"name": "plurals", "source": str(data), "train_size": 8, "eval_size": 2, "probe_size": 1,
                                  "max_new_tokens": 4}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["lightning-cit"])
        code, root = fit(directory, config)
    assert code == 0
    return directory, config, root


def resume(tmp_path, trained, config, *extra, ckpt="last"):
    _, _, root = trained
    ckpt_path = str(root / "checkpoints" / "last.ckpt") if ckpt == "file" else ckpt
    return fit(tmp_path, config, "--ckpt_path", ckpt_path, *extra, root=root)[0]


def test_resume_refuses_an_explicit_argument_that_differs_from_the_checkpoint(tmp_path, trained, capsys):
    _, config, _ = trained
    assert resume(tmp_path, trained, config, "--model.learning_rate", "0.5", ckpt="file") == 2
    line = error_line(capsys)
    assert "cannot resume from" in line and "model.learning_rate: checkpoint 0.001, this run 0.5" in line
    assert resume(tmp_path, trained, config, "--data.global_batch_size", "2") == 2
    assert "data.global_batch_size: checkpoint 4, this run 2" in error_line(capsys)


def test_resume_names_a_task_whose_definition_or_data_changed(tmp_path, trained, capsys):
    _, config, _ = trained
    changed = json.loads(json.dumps(config))
    changed["data"]["tasks"][1]["source"] = str(jsonl(tmp_path / "other.jsonl", plural_records()))
    assert resume(tmp_path, trained, changed) == 2
    line = error_line(capsys)
    assert "task 'plurals' changed: source:" in line and "other.jsonl" in line
    smaller = json.loads(json.dumps(config))
    smaller["data"]["tasks"][1]["train_size"] = 4  # crashed with an IndexError before
    assert resume(tmp_path, trained, smaller) == 2
    assert "task 'plurals' changed: train_size: checkpoint 8, this run 4" in error_line(capsys)
    data = Path(config["data"]["tasks"][1]["source"])
    original = data.read_text()
    try:
        data.write_text(original.replace("cats1", "dogs1"))  # same file, same definition, other samples
        assert resume(tmp_path, trained, config) == 2
        assert "task 'plurals': its data changed since the checkpoint" in error_line(capsys)
    finally:
        data.write_text(original)


def test_resume_refuses_another_controller(tmp_path, trained, capsys):
    _, config, _ = trained
    other = json.loads(json.dumps(config))
    other["trainer"]["callbacks"][0] = {"class_path": "lightning_cit.callbacks.Proportional"}
    assert resume(tmp_path, trained, other) == 2
    line = error_line(capsys)
    assert "controller: this run's Proportional has no state in the checkpoint" in line and "FixedRatio" in line


# ------------------------------------------------------------------------------------------- 6: record fields


@pytest.mark.parametrize("turn, field", [
    ({"role": "user", "content": {"text": "hi"}}, "messages[0].content"),
    ({"role": ["user"], "content": "hi"}, "messages[0].role"),
])
def test_chat_turns_that_are_not_text_are_refused(turn, field, tmp_path, quickstart, capsys):
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(8)]
    records[3]["messages"][0] = turn
    data = jsonl(tmp_path / "chat.jsonl", records)
    config = small_config(quickstart)
    config["data"]["tasks"][1] = {"name": "chat", "source": str(data), "train_size": None, "eval_size": 2, "probe_size": 1}
    code, root = fit(tmp_path, config)
    assert code == 2
    line = error_line(capsys)
    assert f"{data}:4" in line and f"field '{field}' must be text" in line and "'chat'" in line
    assert_no_scores(root)


def test_a_nan_prompt_is_refused(tmp_path, quickstart, capsys):
    data = tmp_path / "nan.jsonl"
    lines = [json.dumps(r) for r in plural_records(8)]
    lines[2] = '{"prompt": NaN, "response": "x"}'  # what json.dumps writes for float("nan")
    data.write_text("\n".join(lines) + "\n")
    config = small_config(quickstart)
    config["data"]["tasks"][1] = {"name": "plurals", "source": str(data), "train_size": None, "eval_size": 2, "probe_size": 1}
    code, _ = fit(tmp_path, config)
    assert code == 2
    line = error_line(capsys)
    assert f"{data}:3" in line and "field 'prompt' is nan, not text" in line


# ------------------------------------------------------------------------------------------------ 7: NaN loss


def test_a_nan_loss_stops_the_run_non_zero_and_never_complete(tmp_path, quickstart, capsys):
    config = small_config(quickstart)
    config["trainer"]["callbacks"].append({"class_path": "helpers_callbacks.PoisonWeights", "init_args": {"at_step": 1}})
    config["trainer"]["callbacks"][2]["init_args"]["every_n_train_steps"] = 1  # TaskCheckpoint: a checkpoint after every step
    code, root = fit(tmp_path, config, "--data.steps_per_task", "4", "--trainer.log_every_n_steps", "50")
    assert code == 1
    line = error_line(capsys)
    assert "the training loss is not finite (NaN or inf) since step 2 (task 'safety')" in line and "before a checkpoint" in line
    scores = json.loads(next(root.rglob("scores.json")).read_text())
    assert scores["complete"] is False and scores["rows"] == ["base"]  # no row scored with NaN weights
    saved = sorted((root / "checkpoints").glob("*.ckpt"))
    assert [torch.load(c, weights_only=True)["global_step"] for c in saved] == [1, 1]  # epoch=0-step=1 and last: step 2 was refused
    for checkpoint in saved:
        weights = torch.load(checkpoint, weights_only=True)["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


# --------------------------------------------------------------------------------------------- 8: proxymix mirror


def scores_file(path: Path, tasks: list[str], seed: int) -> Path:
    matrix = [[10.0 * ((i + j + seed) % 3) for j in range(len(tasks))] for i in range(len(tasks) + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tasks": tasks, "rows": ["base", *tasks], "matrix": matrix, "complete": True}))
    return path


def test_mirror_refuses_runs_whose_last_tasks_differ(tmp_path, capsys):
    proxy = scores_file(tmp_path / "proxy" / "scores.json", ["a", "b", "c"], 0)
    target = scores_file(tmp_path / "target" / "scores.json", ["a", "b", "other"], 1)
    assert main(["proxymix", "mirror", str(proxy), str(target)]) == 2
    line = error_line(capsys)
    assert "different task sequences: ['a', 'b', 'c'] vs ['a', 'b', 'other']" in line


# ---------------------------------------------------------------------------------------------------- 9, 13: report


def test_report_keeps_one_heatmap_per_run_and_refuses_a_file_as_out(tmp_path, capsys):
    one = scores_file(tmp_path / "one" / "scores.json", ["a", "b"], 0)
    two = scores_file(tmp_path / "two" / "scores.json", ["a", "b"], 1)
    out = tmp_path / "report"
    assert main(["report", str(one), str(two), "--labels", "a/b", "a?b", "--out", str(out)]) == 0
    heatmaps = sorted(p.name for p in out.glob("heatmap_*.png"))
    assert heatmaps == ["heatmap_a_b.png", "heatmap_a_b_2.png"]
    assert [r["heatmap"] for r in json.loads((out / "report.json").read_text())["runs"]] == heatmaps
    capsys.readouterr()
    a_file = tmp_path / "report.txt"
    a_file.write_text("mine")
    assert main(["report", str(one), "--out", str(a_file)]) == 2
    assert "--out" in error_line(capsys) and a_file.read_text() == "mine"


# ------------------------------------------------------------------------------------------- 11: prompt length


def test_evaluation_prompts_are_cut_to_max_length_with_a_counted_warning(tmp_path, quickstart):
    from lightning_cit import collate

    data = jsonl(tmp_path / "plurals.jsonl", plural_records())
    huge = jsonl(tmp_path / "eval.jsonl", [{"prompt": "cat " * 200_000, "response": "cats"}, *plural_records(3)])
    config = small_config(quickstart)
    config["data"]["tasks"][1] = {"name": "plurals", "source": str(data), "eval_split": str(huge), "train_size": 8, "eval_size": 2,
                                  "probe_size": 1, "max_new_tokens": 4}
    before = collate.EVAL_TRUNCATED["generate"]
    collate._eval_warned.discard("generate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, root = fit(tmp_path, config, "--data.max_length", "64")
    assert code == 0
    assert collate.EVAL_TRUNCATED["generate"] - before == 3  # the huge prompt, in each of the three rows (base + 2 tasks)
    assert sum("evaluation (generate): inputs longer than max_length=64 tokens" in str(w.message) for w in caught) == 1
    assert json.loads(next(root.rglob("scores.json")).read_text())["complete"]


def test_left_padded_prompts_keep_the_end_of_long_prompts():
    from lightning_cit.collate import left_padded_prompts
    from lightning_cit.module import ContinualLM

    tokenizer = ContinualLM().tokenizer
    long = [{"role": "user", "content": "x " * 500 + "the question"}]
    short = [{"role": "user", "content": "hi"}]
    batch = left_padded_prompts(tokenizer, [long, short], pad_id=0, max_length=16)
    assert batch["input_ids"].shape[1] == 16
    full = tokenizer(__import__("lightning_cit.collate", fromlist=["prompt_text"]).prompt_text(tokenizer, long), add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == full[-16:]


# ------------------------------------------------------------------------------------------------ 13: smaller ones


def test_a_utf8_bom_is_not_data_and_csv_errors_name_the_line(tmp_path, quickstart, capsys):
    from lightning_cit.tasks import TaskDataError, TaskSpec, load_task

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in plural_records()).encode())
    task = load_task(TaskSpec(name="plurals", source=str(bom), eval_size=2, probe_size=1))
    assert len(task.train) + len(task.eval) + len(task.probe) == 12
    csv_bom = tmp_path / "bom.csv"
    csv_bom.write_bytes(b"\xef\xbb\xbfprompt,response\n" + b"".join(f"q{i},a{i}\n".encode() for i in range(8)))
    assert len(load_task(TaskSpec(name="csv", source=str(csv_bom), eval_size=2, probe_size=1)).train) == 5
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,response\nq1,a1\nq2,a2,extra\nq3,a3\n")
    with pytest.raises(TaskDataError, match=rf"task 'csv': {bad}:3: 3 cells but the header has 2"):
        load_task(TaskSpec(name="csv", source=str(bad), eval_size=1, probe_size=1))


def test_batch_not_divisible_by_devices_is_refused_before_any_process_starts(tmp_path, quickstart, capsys):
    code, root = fit(tmp_path, small_config(quickstart), "--trainer.devices", "3", "--trainer.strategy", "ddp")
    assert code == 2
    line = error_line(capsys)
    assert "data.global_batch_size=4 is not divisible by the 3 devices" in line
    assert not root.exists()


def test_an_unwritable_default_root_dir_is_one_error(tmp_path, quickstart, capsys):
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("mine")
    code, _ = fit(tmp_path, small_config(quickstart), root=a_file / "run")
    assert code == 2
    assert "cannot be written (not a directory)" in error_line(capsys)
    assert a_file.read_text() == "mine"
    if os.geteuid() != 0:
        return  # (a read-only mount needs root; as another user a chmod 555 folder is the same case)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], check=False).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        code, _ = fit(tmp_path, small_config(quickstart), root=read_only)
        assert code == 2
        line = error_line(capsys)
        assert "cannot be written (Read-only file system)" in line and str(read_only) in line
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)




@pytest.mark.parametrize("name", ["a/b", "..", "x\\y"])
def test_task_names_that_would_be_paths_are_refused(name, tmp_path, quickstart, capsys):
    config = small_config(quickstart)
    config["data"]["tasks"][1]["name"] = name
    code, root = fit(tmp_path, config)
    assert code == 2
    assert f"name {name!r} may not contain '/'" in error_line(capsys)
    assert_no_scores(root)
