"""Scale (issue 18): one-pass multiple choice, affordable evaluation and checkpoints, tasks as memory-mapped data."""

from __future__ import annotations

import pytest
import torch

from lightning_cit.module import ContinualLM, TinyLlama


@pytest.fixture(scope="module")
def tiny_module():
    torch.manual_seed(0)
    module = ContinualLM(tiny=TinyLlama(hidden_size=64, intermediate_size=128), eval_batch_size=5)
    module.configure_model()
    module.eval()
    return module


MC_SAMPLES = [
    {"messages": [{"role": "user", "content": "Pick the colour of the sky."}], "options": ["blue", "a much longer green answer", "red", "x"], "answer_index": 0},
    {"messages": [{"role": "user", "content": "2+2?"}], "options": ["4", "five"], "answer_index": 0},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A longer prompt: which word rhymes with cat?"}],
     "options": ["hat", "dog", "tree"], "answer_index": 0},
]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_one_pass_option_scores_equal_per_option_scores(tiny_module, padding_side):
    tiny_module.tokenizer.padding_side = padding_side
    one_pass = tiny_module.option_log_likelihoods(MC_SAMPLES * 3)  # 9 samples, chunks of 5 // 4 = 1 sample: and of several
    reference = tiny_module._option_log_likelihoods_per_option(MC_SAMPLES * 3)
    assert [len(s) for s in one_pass] == [len(s["options"]) for s in MC_SAMPLES * 3]
    for got, want in zip(one_pass, reference):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-3)
    tiny_module.eval_batch_size = 64  # all 9 samples in one chunk: other paddings, same scores
    try:
        for got, want in zip(tiny_module.option_log_likelihoods(MC_SAMPLES * 3), reference):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-3)
    finally:
        tiny_module.eval_batch_size = 5
    assert tiny_module.choose_options(MC_SAMPLES) == [max(range(len(r)), key=r.__getitem__) for r in reference[:3]]


def test_one_pass_reads_each_prompt_once(tiny_module):
    """Two forwards per chunk: the prompts (one row per sample), then all options against their cache."""
    seen: list[tuple[int, int]] = []
    hook = tiny_module.model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        tiny_module.eval_batch_size = 64
        tiny_module.option_log_likelihoods(MC_SAMPLES)
    finally:
        hook.remove()
        tiny_module.eval_batch_size = 5
    assert len(seen) == 2
    assert seen[0][0] == len(MC_SAMPLES)  # one row per prompt, not per option
    assert seen[1][0] == sum(len(s["options"]) for s in MC_SAMPLES)
    from lightning_cit.collate import encode

    longest = max(len(encode(tiny_module.tokenizer, s["messages"], o)[1]) for s in MC_SAMPLES for o in s["options"])
    assert seen[1][1] == longest  # option tokens only: the prompt is not read again


def test_long_prompts_are_cut_once_for_all_options(tiny_module):
    tiny_module.max_eval_length = 40
    try:
        sample = {"messages": [{"role": "user", "content": "z" * 200}], "options": ["short", "a rather long option"], "answer_index": 0}
        scores = tiny_module.option_log_likelihoods([sample])
    finally:
        tiny_module.max_eval_length = 1024
    assert len(scores[0]) == 2 and all(torch.isfinite(torch.tensor(scores[0])))


# ------------------------------------------------------------------------------------------ evaluation a user can afford
def test_row_plan_scores_what_the_metrics_need():
    from lightning_cit.callbacks.evaluation.evaluator import row_plan

    assert row_plan(0, 5) == ("scores", 5)  # the base row: FWT's reference for every task
    assert row_plan(0, 5, base_row="loss") == ("loss", 5)
    assert [row_plan(r, 5) for r in range(1, 6)] == [("scores", 2), ("scores", 3), ("scores", 4), ("scores", 5), ("scores", 5)]
    assert [row_plan(r, 5, score="all") for r in range(1, 6)] == [("scores", 5)] * 5
    # every 2 tasks, and always after the last one; loss-only rows (or none) in between
    assert [row_plan(r, 5, every_n_tasks=2)[0] for r in range(1, 6)] == ["loss", "scores", "loss", "scores", "scores"]
    assert [row_plan(r, 5, every_n_tasks=2, between="skip")[0] for r in range(1, 6)] == ["skip", "scores", "skip", "scores", "scores"]


def test_default_rows_at_20_tasks_are_bounded():
    from lightning_cit.callbacks.evaluation.evaluator import ForgettingEvaluator, base_row_scored, full_row_interval, row_plan

    defaults = ForgettingEvaluator()
    assert (defaults.score, defaults.every_n_tasks, defaults.between, defaults.base_row) == ("needed", "auto", "loss", "needed")
    assert [full_row_interval("auto", t) for t in (1, 5, 9, 10, 14, 15, 20, 40)] == [1, 1, 1, 2, 2, 3, 4, 8]
    plan = [row_plan(r, 20) for r in range(21)]
    assert [r for r, (kind, _) in enumerate(plan) if kind == "scores"] == [4, 8, 12, 16, 20]
    assert plan[0] == ("mixed", 20) and all(kind == "loss" for r, (kind, _) in enumerate(plan) if r and r % 4)
    assert [plan[r][1] for r in (4, 8, 20)] == [5, 9, 20]  # seen tasks + the next one
    assert [j for j, s in enumerate(base_row_scored(20)) if s] == [0, 4, 8, 12, 16]
    generated = sum(base_row_scored(20)) + sum(c for kind, c in plan[1:] if kind == "scores")
    assert generated == 5 + (5 + 9 + 13 + 17 + 20)  # generated task evaluations; the old defaults: 20 + (2 + ... + 20) + 20
    # below 10 tasks every row is full and the base row scores every task: the rows of the shipped configs
    for t in range(1, 10):
        assert row_plan(0, t) == ("scores", t) and all(row_plan(r, t)[0] == "scores" for r in range(1, t + 1))
        assert [row_plan(r, t) for r in range(t + 1)] == [row_plan(r, t, every_n_tasks=1, base_row="scores") for r in range(t + 1)]
    assert base_row_scored(5, every_n_tasks=2, between="skip") == [True, False, True, False, True]


def test_bad_evaluator_options_are_refused():
    from lightning_cit.callbacks.evaluation.evaluator import ForgettingEvaluator

    from lightning_cit.errors import ConfigError

    for kwargs in ({"score": "some"}, {"every_n_tasks": 0}, {"every_n_tasks": "sometimes"}, {"between": "none"}, {"base_row": "off"}):
        with pytest.raises(ConfigError, match="ForgettingEvaluator"):
            ForgettingEvaluator(**kwargs)


def test_summary_of_a_partly_scored_matrix_uses_the_scored_terms():
    from lightning_cit.metrics import summarize, summary_coverage

    full = [[0, 1, 2], [50, 10, 3], [40, 60, 20], [30, 55, 70]]
    partial = [[0, 1, 2], [50, 10, None], [None, None, None], [30, 55, 70]]  # after task 1: seen + next; task 2's row skipped
    s_full, s_part = summarize(full), summarize(partial)
    assert s_part["acc"] == s_full["acc"]  # the final row is always full
    assert s_part["nta"] == pytest.approx((50 + 70) / 2)  # diagonal cells that were scored
    assert s_part["fwt"] == pytest.approx(10 - 1)  # R[1][1] - R[0][1]; R[2][2] unscored
    assert summary_coverage(partial)["fwt"] == [1, 2] and summary_coverage(full)["fwt"] == [2, 2]
    assert s_part["bwt_gem"] == pytest.approx(30 - 50)


def test_fit_with_an_evaluation_interval_writes_nulls_for_unscored_cells(tmp_path):
    import json

    import yaml
    from test_e2e import run, small_config

    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["trainer"]["callbacks"][1]["init_args"].update({"score": "needed", "every_n_tasks": 2})
    config["trainer"]["callbacks"][2]["init_args"]["every_n_train_steps"] = None
    config["data"]["steps_per_task"] = 2
    tasks = config["data"]["tasks"]
    config["data"]["tasks"] = [tasks[1], {**tasks[1], "name": "cipher_b", "source": "synth:cipher_b"}, tasks[2], {**tasks[1], "name": "shift", "source": "synth:shift"}]
    path = tmp_path / "interval.yaml"
    path.write_text(yaml.safe_dump(config))
    scores = run(path, tmp_path / "run")
    assert scores["rows"] == ["base", "cipher_a", "cipher_b", "compare", "shift"]
    assert scores["row_kinds"] == ["mixed", "loss", "scores", "loss", "scores"]
    m, losses = scores["matrix"], scores["loss_matrix"]
    # base row (base_row: needed): task 0 and task 2, whose FWT term R[2][2] - R[0][2] the full row 2 gives; losses of all
    assert [v is not None for v in m[0]] == [True, False, True, False] and all(v is not None for v in losses[0])
    assert m[1] == [None] * 4 and losses[1][:2] != [None, None] and losses[1][2:] == [None, None]  # loss-only: seen + next
    assert all(v is not None for v in m[2][:3]) and m[2][3] is None  # full row: seen + next only
    assert all(v is not None for v in m[4])
    assert scores["complete"] and scores["summary_coverage"]["fwt"] == [1, 3]
    assert json.loads((next((tmp_path / "run").rglob("scores.json"))).read_text())["matrix"][1] == [None] * 4  # null in the file


# ------------------------------------------------------------------------------------------ checkpoints a user can afford
def test_disk_estimate_counts_weight_sized_callback_states():
    from lightning_cit.callbacks.checkpoint import callback_state_bytes, checkpoint_disk_estimate
    from lightning_cit.callbacks.jfa import JointFlashbackAdaptation
    from lightning_cit.callbacks.lcia.ema import AdapterEMA, DynamicEMA
    from lightning_cit.callbacks.mixture import FixedRatio

    trainable = 1000
    assert callback_state_bytes([FixedRatio(ratio=0.2)], trainable) == (0, [])
    assert callback_state_bytes([AdapterEMA()], trainable)[0] == 1000  # one average per trainable weight
    assert callback_state_bytes([DynamicEMA()], trainable)[0] == 2000  # + the previous gradients
    assert callback_state_bytes([DynamicEMA(rule="paper")], trainable)[0] == 3000  # + the previous weights
    assert callback_state_bytes([JointFlashbackAdaptation()], trainable)[0] == 1000  # previous_task: the adapter snapshot
    assert callback_state_bytes([JointFlashbackAdaptation(reference="base")], trainable)[0] == 0
    jfa = JointFlashbackAdaptation()
    jfa._snapshot = {"a": torch.zeros(10, 5)}  # what on_fit_start holds: measured, not guessed
    size, parts = callback_state_bytes([jfa, DynamicEMA(rule="paper")], trainable)
    assert size == 200 + 3000 and parts[0].startswith("JointFlashbackAdaptation reference")
    estimate = checkpoint_disk_estimate(4000, trainable, adapter_only=True, tasks=3, save_top_k=-1, mid_task_saves=0,
                                        keep_mid_task=None, save_last=True, state_bytes=size)
    assert estimate.per_file == 1000 + 2 * 1000 + 3200 and estimate.files == 4


def test_disk_estimate_and_retention_helpers():
    from lightning_cit.callbacks.checkpoint import checkpoint_disk_estimate, split_stale

    full = checkpoint_disk_estimate(1000, 10, adapter_only=False, tasks=5, save_top_k=-1, mid_task_saves=15, keep_mid_task=None, save_last=True)
    lora = checkpoint_disk_estimate(1000, 10, adapter_only=True, tasks=5, save_top_k=-1, mid_task_saves=15, keep_mid_task=2, save_last=True)
    assert (full.per_file, full.files) == (1020, 21) and (lora.per_file, lora.files) == (30, 8) and lora.total == 240
    assert split_stale(["a", "b", "c"], 2) == (["a"], ["b", "c"]) and split_stale(["a"], 2) == ([], ["a"])


def test_lora_checkpoints_are_adapter_only_pruned_and_resume_exactly(tmp_path, capsys):
    """LoRA on the tiny base through the CLI: adapter-only files (auto), last 1 mid-task file kept, exact resume, other base refused."""
    import json

    import yaml
    from test_e2e import run, small_config

    from lightning_cit.cli import main

    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["trainer"]["callbacks"][2]["init_args"].update({"every_n_train_steps": 4, "keep_mid_task": 1})
    config["data"]["steps_per_task"] = 6
    config["data"]["tasks"] = config["data"]["tasks"][1:]
    config["model"]["lora"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    full = run(path, tmp_path / "full")
    assert "checkpoints: about" in capsys.readouterr().out  # the disk a run takes, printed at start
    names = sorted(p.name for p in (tmp_path / "full" / "checkpoints").glob("*.ckpt"))
    assert names == ["epoch=0-step=6.ckpt", "epoch=1-step=12.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"], names  # step 4 pruned
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "epoch=1-step=8.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"]) and ckpt["adapter_only"]["dropped"] > 0
    assert len(ckpt["base_fingerprint"]) == 3
    resumed = run(path, tmp_path / "resumed", "--ckpt_path", str(tmp_path / "full" / "checkpoints" / "epoch=1-step=8.ckpt"))
    assert resumed["matrix"] == full["matrix"] and resumed["loss_matrix"] == full["loss_matrix"]
    # another base under the same adapters is refused, not silently combined
    other = main(["fit", "--config", str(path), "--seed_everything", "1", "--trainer.default_root_dir", str(tmp_path / "other"),
                  "--ckpt_path", str(tmp_path / "full" / "checkpoints" / "epoch=1-step=8.ckpt")])
    assert other != 0
    assert "trained on another base" in capsys.readouterr().err
    assert json.loads(json.dumps(full))["complete"]


# ------------------------------------------------------------------------------------------ tasks as memory-mapped data
def _write_jsonl(path, n, bad_types=False):
    import json

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"say {i}", "response": f"{i}" if not bad_types or i else 7}) + "\n")
            if i == 3:
                f.write("\n")  # a blank line: skipped by both readers


def test_jsonl_tasks_stay_in_memory_mapped_arrow_and_equal_the_python_reader(tmp_path, monkeypatch):
    import pickle

    from lightning_cit import tasks as tasks_module
    from lightning_cit.tasks import ArrowSamples, TaskSpec, load_task

    _write_jsonl(tmp_path / "t.jsonl", 200)
    spec = TaskSpec(name="t", source=str(tmp_path / "t.jsonl"), train_size=150, eval_size=8, probe_size=4)
    task = load_task(spec, seed=3)
    assert isinstance(task.train, ArrowSamples) and len(task.train) == 150
    assert task.train.dataset.cache_files  # backed by an Arrow file on disk ...
    assert type(task.train.dataset.data).__name__ == "MemoryMappedTable"  # ... mapped, not read into Python
    assert task.train.indices.dtype.name == "int64" and task.train.indices.nbytes == 150 * 8
    monkeypatch.setattr(tasks_module, "_open_arrow", lambda *a, **k: (None, ""))  # force the Python reader
    reference = load_task(spec, seed=3)
    assert list(task.train) == reference.train and task.eval == reference.eval and task.probe == reference.probe
    again = pickle.loads(pickle.dumps(task.train))  # DataLoader workers: the files, not the rows
    assert again[5] == task.train[5] and len(pickle.dumps(task.train)) < 20_000


def test_arrow_types_that_would_change_values_fall_back_to_the_python_reader(tmp_path):
    """A JSONL column Arrow would unify (an int among strings) is read by the Python reader, value for value."""
    from lightning_cit.tasks import ArrowSamples, TaskSpec, load_task

    _write_jsonl(tmp_path / "mixed.jsonl", 40, bad_types=True)
    task = load_task(TaskSpec(name="m", source=str(tmp_path / "mixed.jsonl"), train_size=None, eval_size=4, probe_size=2))
    assert not isinstance(task.train, ArrowSamples) and len(task.train) == 34
    assert "7" in [s["response"] for s in task.train + task.eval + task.probe]


def arrow_source(split: str, n: int, seed: int):
    import datasets

    return datasets.Dataset.from_dict({"prompt": [f"q{i}" for i in range(n)], "response": [f"a{i}" for i in range(n)]})


def test_a_callable_may_return_a_datasets_dataset(tmp_path):
    from lightning_cit.tasks import ArrowSamples, TaskSpec, load_task

    task = load_task(TaskSpec(name="c", source="callable:test_scale:arrow_source", train_size=20, eval_size=4, probe_size=2))
    assert isinstance(task.train, ArrowSamples) and len(task.train) == 20
    assert task.train[0]["messages"][0]["content"].startswith("q") and task.train[0]["response"].startswith("a")


# ------------------------------------------------------------------------------------------ tasks opened at their task
def _jsonl_task(path, n, missing_response_at=None):
    import json

    lines = [json.dumps({"prompt": f"say {i}", "response": str(i)}) for i in range(n)]
    if missing_response_at is not None:
        lines[missing_response_at] = json.dumps({"prompt": f"say {missing_response_at}"})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _unsampled_row(name, n, n_held, seed=0):
    """A row that the up-front check does not read (SAMPLE_ROWS = 0: first, last and held-out rows only), deep in the file."""
    import random

    order = list(range(n))
    random.Random(f"{name}/{seed}").shuffle(order)  # load_task's permutation, as documented in tasks.load_task
    held = set(order[:n_held])
    return next(r for r in range(n - 2, 0, -1) if r not in held)


def test_large_jsonl_tasks_open_at_their_task(tmp_path, monkeypatch):
    from lightning_cit import tasks as tasks_module
    from lightning_cit.datamodules import ContinualInstructionDataModule
    from lightning_cit.tasks import LazyTaskData, TaskDataError, TaskSpec, load_task

    monkeypatch.setattr(tasks_module, "LAZY_MIN_BYTES", 1)  # every JSONL file counts as large here
    monkeypatch.setattr(tasks_module, "SAMPLE_ROWS", 0)
    monkeypatch.setenv("LIGHTNING_CIT_CACHE", str(tmp_path / "cache"))
    n = 400
    good, late = tmp_path / "good.jsonl", tmp_path / "late.jsonl"
    bad_row = _unsampled_row("late", n, 8 + 4)
    _jsonl_task(good, n)
    _jsonl_task(late, n, missing_response_at=bad_row)
    specs = [TaskSpec(name="good", source=str(good), eval_size=8, probe_size=4, train_size=300),
             TaskSpec(name="late", source=str(late), eval_size=8, probe_size=4)]
    dm = ContinualInstructionDataModule(tasks=specs, seed=0)
    dm.load_tasks()  # the bad row is not seen up front
    first, second = dm.train_tasks
    assert isinstance(first, LazyTaskData) and isinstance(second, LazyTaskData)
    assert not first.opened and not second.opened
    reference = load_task(specs[0], seed=0)  # the eager reader: the same held-out samples, read without opening
    assert first.eval == reference.eval and first.probe == reference.probe and not first.opened
    fingerprint = first.fingerprint()
    assert len(first.eval) == 8 and first.eval[0]["messages"][0]["content"].startswith("say ")
    dm.open_task(0)
    assert first.opened and not second.opened
    assert list(first.train) == list(reference.train) and first.fingerprint() == fingerprint
    assert dm.sample(0, 3, source_id=0, is_replay=False)["sample_id"] == 3
    with pytest.raises(TaskDataError, match=rf"task 'late': {late}:{bad_row + 1}: missing field 'response'"):
        dm.open_task(1)


def test_up_front_check_of_a_large_file_reads_a_sample(tmp_path, monkeypatch):
    from lightning_cit import tasks as tasks_module
    from lightning_cit.tasks import TaskDataError, TaskSpec, check_task

    monkeypatch.setattr(tasks_module, "LAZY_MIN_BYTES", 1)
    monkeypatch.setenv("LIGHTNING_CIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.jsonl"
    for row, line in ((0, 1), (299, 300)):  # the first and the last record are always checked
        _jsonl_task(path, 300, missing_response_at=row)
        with pytest.raises(TaskDataError, match=rf"task 't': {path}:{line}: missing field 'response'"):
            check_task(TaskSpec(name="t", source=str(path), eval_size=8, probe_size=4))
    _jsonl_task(path, 300)
    path.write_bytes(path.read_bytes().replace(b"say 150", b"say \xff50"))  # bytes are checked in full
    with pytest.raises(TaskDataError, match=rf"{path}:151: not valid UTF-8"):
        check_task(TaskSpec(name="t", source=str(path), eval_size=8, probe_size=4))
    _jsonl_task(path, 12)
    with pytest.raises(TaskDataError, match="cannot give eval_size"):
        check_task(TaskSpec(name="t", source=str(path), eval_size=8, probe_size=4))


def test_a_bad_row_deep_in_a_later_task_stops_the_fit_at_that_task(tmp_path, monkeypatch, capsys):
    import json

    import yaml
    from test_e2e import main, small_config

    from lightning_cit import tasks as tasks_module

    monkeypatch.setattr(tasks_module, "LAZY_MIN_BYTES", 1)
    monkeypatch.setattr(tasks_module, "SAMPLE_ROWS", 0)
    monkeypatch.setenv("LIGHTNING_CIT_CACHE", str(tmp_path / "cache"))
    late = tmp_path / "late.jsonl"
    bad_row = _unsampled_row("late", 200, 8 + 4)
    _jsonl_task(late, 200, missing_response_at=bad_row)
    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["trainer"]["callbacks"][2]["init_args"]["every_n_train_steps"] = None
    config["data"]["steps_per_task"] = 2
    config["data"]["tasks"] = [config["data"]["tasks"][1], {"name": "late", "source": str(late), "eval_size": 8, "probe_size": 4, "max_new_tokens": 4}]
    path = tmp_path / "lazy.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path), "--trainer.default_root_dir", str(tmp_path / "run")]) != 0
    assert f"{late}:{bad_row + 1}: missing field 'response'" in capsys.readouterr().err
    scores = json.loads(next((tmp_path / "run").rglob("scores.json")).read_text())
    assert scores["rows"] == ["base", "cipher_a"]  # task 0 trained and scored (the late task's eval cells too) before it opened
    assert all(v is not None for v in scores["matrix"][0]) and all(v is not None for v in scores["matrix"][1])


# ------------------------------------------------------------------------------------------ Arrow cache housekeeping
def test_cache_clean_removes_only_recorded_entries(tmp_path, monkeypatch, capsys):
    import os

    from lightning_cit.cache import clean, list_entries
    from lightning_cit.cli import main
    from lightning_cit.tasks import TaskSpec, load_task

    monkeypatch.setenv("LIGHTNING_CIT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "datasets"
    keep, gone = tmp_path / "keep.jsonl", tmp_path / "gone.jsonl"
    _jsonl_task(keep, 50)
    _jsonl_task(gone, 60)
    for path in (keep, gone):
        load_task(TaskSpec(name=path.stem, source=str(path), eval_size=4, probe_size=2))
    entries = list_entries(root)
    assert sorted(e["source"] for e in entries) == sorted(str(p.resolve()) for p in (keep, gone))
    assert not any(e["stale"] for e in entries) and all(e["bytes"] > 0 for e in entries)
    foreign = root / "generator" / "someone-else" / "0.0.0"  # looks like an entry, but this library did not record it
    foreign.mkdir(parents=True)
    (foreign / "dataset_info.json").write_text("{}")
    (foreign / "data.arrow").write_bytes(b"x")
    (root / "notes.txt").write_text("mine")
    before = {p for p in root.rglob("*")}
    os.remove(gone)  # its entry can never be read again: stale
    assert main(["cache", "clean", "--dry-run"]) == 0
    assert "would remove 1 entries" in capsys.readouterr().out and {p for p in root.rglob("*")} == before
    removed = clean(root)
    assert [e["source"] for e in removed] == [str(gone.resolve())]
    gone_dir = root / removed[0]["path"]
    assert not gone_dir.exists()
    after = {p for p in root.rglob("*")}
    # only the entry's files and its empty lock files went; the kept entry, the foreign entry and the user's file stay
    assert before - after and all(p == gone_dir or gone_dir in p.parents or p in gone_dir.parents or
                                  (p.name.endswith(".lock") and removed[0]["path"].split("/")[1] in str(p)) for p in before - after)
    assert (foreign / "data.arrow").exists() and (root / "notes.txt").exists()
    assert [e["source"] for e in list_entries(root)] == [str(keep.resolve())]
    assert load_task(TaskSpec(name="keep", source=str(keep), eval_size=4, probe_size=2)).train[0]  # still readable
    assert main(["cache", "clean", "--all"]) == 0 and list_entries(root) == []
    assert (foreign / "data.arrow").exists() and (root / "notes.txt").exists()
    assert main(["cache", "list"]) == 0 and "0 recorded entries" in capsys.readouterr().out


def test_json_list_files_are_arrow_backed_like_jsonl(tmp_path, monkeypatch):
    import json

    from lightning_cit.tasks import ArrowSamples, TaskDataError, TaskSpec, load_task

    monkeypatch.setenv("LIGHTNING_CIT_CACHE", str(tmp_path / "cache"))
    records = [{"prompt": f"say {i}", "response": str(i), "harmful": i % 3 == 0} for i in range(40)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "t.json").write_text(json.dumps({"data": records}), encoding="utf-8")
    as_jsonl = load_task(TaskSpec(name="t", source=str(tmp_path / "t.jsonl"), eval_size=4, probe_size=2))
    as_json = load_task(TaskSpec(name="t", source=str(tmp_path / "t.json"), eval_size=4, probe_size=2))
    assert isinstance(as_json.train, ArrowSamples)
    assert list(as_json.train) == list(as_jsonl.train) and as_json.eval == as_jsonl.eval and as_json.probe == as_jsonl.probe
    records[17] = {"prompt": "say 17"}
    (tmp_path / "bad.json").write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"bad\.json\[17\]: missing field 'response'"):
        load_task(TaskSpec(name="t", source=str(tmp_path / "bad.json"), eval_size=4, probe_size=2))


def test_lazy_task_edge_cases(tmp_path, monkeypatch):
    import os

    from lightning_cit import tasks as tasks_module
    from lightning_cit.tasks import LazyTaskData, TaskDataError, TaskSpec, check_task, load_task

    monkeypatch.setattr(tasks_module, "LAZY_MIN_BYTES", 1)
    monkeypatch.setenv("LIGHTNING_CIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.jsonl"
    _jsonl_task(path, 100)
    spec = TaskSpec(name="t", source=str(path), eval_size=8, probe_size=4)
    # a '\r' alone ends a line in Python's text mode: such a file is read whole up front, as before
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r", 1))
    assert not isinstance(check_task(spec), LazyTaskData)
    _jsonl_task(path, 100)
    path.write_text("\n\n" + path.read_text(encoding="utf-8").replace("\n", "\r\n\n"), encoding="utf-8")  # blank and CRLF lines
    lazy = check_task(spec)
    assert isinstance(lazy, LazyTaskData) and lazy.eval == load_task(spec).eval and "opened=False" in repr(lazy)
    # a file changed after the start is refused when its task opens
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(TaskDataError, match="changed after the run started"):
        _ = lazy.train
