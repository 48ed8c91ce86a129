"""Bad input, property-based (hypothesis): malformed task files and config values, tampered checkpoints.

Every malformed input must stop the run with a ``ConfigError`` (through the CLI: exit code 2 and one
``error:`` line naming the file/line/field and what to fix, no traceback) and leave no ``scores.json``
or checkpoint behind. Checkpoints are read with ``weights_only=True``: a tampered one is a clear error
and runs no code. ``INPUTS_TRIED`` counts the examples hypothesis generated (printed at the end).
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning_cit.datamodules import ContinualInstructionDataModule

from lightning_cit.cli import main
from lightning_cit.errors import ConfigError

INPUTS_TRIED: dict[str, int] = {}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLI = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def count(name: str) -> None:
    INPUTS_TRIED[name] = INPUTS_TRIED.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print(f"\nhypothesis inputs tried: {sum(INPUTS_TRIED.values())} {INPUTS_TRIED}")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-cit"])


# ------------------------------------------------------------------------------------ task files

WORDS = st.text(alphabet="abcdefghij ", min_size=1, max_size=12)
RECORD = st.fixed_dictionaries({"prompt": WORDS, "response": WORDS})
NOT_A_STRING = st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def broken_jsonl(draw) -> tuple[bytes, str, int | None, str | None]:
    """A JSONL file of good records with one defect: (content, kind, 1-based line of the defect, field it concerns)."""
    records = draw(st.lists(RECORD, min_size=12, max_size=20))
    lines = [json.dumps(r) for r in records]
    kind = draw(st.sampled_from(["invalid_json", "not_object", "missing_field", "null_field", "wrong_type", "bad_utf8",
                                 "messages_not_list", "turn_without_role", "last_turn_not_assistant", "empty"]))
    at = draw(st.integers(0, len(lines) - 1))
    record = dict(records[at])
    field = draw(st.sampled_from(["prompt", "response"]))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"\n\n  \n", b"\r\n"])), kind, None, None
    if kind == "invalid_json":
        text = json.dumps(record)
        lines[at] = text[: draw(st.integers(1, len(text) - 1))]  # cut short: never valid JSON
        field = None
    elif kind == "not_object":
        lines[at] = json.dumps(draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2), st.none())))
        field = None
    elif kind == "missing_field":
        del record[field]
        lines[at] = json.dumps(record)
    elif kind == "null_field":
        record[field] = None
        lines[at] = json.dumps(record)
    elif kind == "wrong_type":
        record[field] = draw(NOT_A_STRING)
        lines[at] = json.dumps(record)
    elif kind == "bad_utf8":
        raw = "\n".join(lines).encode()
        offsets = [0]
        for line in lines[:-1]:
            offsets.append(offsets[-1] + len(line.encode()) + 1)
        cut = offsets[at] + draw(st.integers(0, len(lines[at].encode()) - 1))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80"]))
        return raw[:cut] + bad + raw[cut:], kind, at + 1, None
    else:
        turns = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        if kind == "messages_not_list":
            turns = draw(st.one_of(st.text(max_size=4), st.integers(), st.just([]), st.just({"role": "user"})))
        elif kind == "turn_without_role":
            del turns[draw(st.integers(0, 1))]["role"]
        else:
            turns[-1]["role"] = "user"
        lines[at] = json.dumps({"messages": turns})
        field = "messages"
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines).encode(), kind, at + 1, field


def tasks_with(path: Path, **spec) -> list[dict]:
    return [{"name": "user_task", "source": str(path), "train_size": 4, "eval_size": 2, "probe_size": 1, "max_new_tokens": 4, **spec}]


def assert_names_the_defect(message: str, path: Path, line: int | None, field: str | None) -> None:
    assert str(path) in message, message
    if line is not None:
        assert f"{path}:{line}" in message, message
    if field is not None:
        assert repr(field) in message or field in message, message


@FAST
@given(case=broken_jsonl())
def test_every_malformed_jsonl_file_is_a_clear_error_naming_file_line_and_field(tmp_path, case):
    count("jsonl_file")
    content, kind, line, field = case
    path = tmp_path / "task.jsonl"
    path.write_bytes(content)
    dm = ContinualInstructionDataModule(tasks=tasks_with(path), global_batch_size=4, steps_per_task=2)
    with pytest.raises(ConfigError) as info:
        dm.load_tasks()
    message = str(info.value)
    assert "\n" not in message and "user_task" in message
    assert_names_the_defect(message, path, line, field)
    if kind == "empty":
        assert "no samples" in message


@st.composite
def broken_mc_record(draw) -> tuple[dict, str]:
    """A multiple-choice record with a defect in ``options`` / ``answer_index``."""
    options = draw(st.lists(WORDS, min_size=2, max_size=4, unique=True))
    kind = draw(st.sampled_from(["options_not_list", "options_empty", "index_out_of_range", "index_not_int", "index_missing"]))
    record = {"prompt": "pick one", "response": options[0], "options": options, "answer_index": 0}
    if kind == "options_not_list":
        record["options"] = draw(st.one_of(st.text(max_size=5), st.integers(), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)))
    elif kind == "options_empty":
        record["options"] = []
    elif kind == "index_out_of_range":
        record["answer_index"] = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=len(options))))
    elif kind == "index_not_int":
        record["answer_index"] = draw(st.one_of(st.text(max_size=3), st.floats(allow_nan=False).filter(lambda x: x != int(x) if abs(x) < 1e15 else True), st.lists(st.integers(), max_size=1)))
    else:
        del record["answer_index"]
    return record, kind


@FAST
@given(case=broken_mc_record(), position=st.integers(0, 11))
def test_malformed_multiple_choice_records_are_clear_errors(tmp_path, case, position):
    # a defect anywhere (train or held-out part) must fail before training, not inside the scorer
    count("mc_record")
    record, _kind = case
    good = {"prompt": "pick one", "response": "a", "options": ["a", "b"], "answer_index": 0}
    lines = [json.dumps(good)] * 12
    lines[position] = json.dumps(record)
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(lines))
    dm = ContinualInstructionDataModule(tasks=tasks_with(path, metric="mc_accuracy"), global_batch_size=4, steps_per_task=2)
    with pytest.raises(ConfigError) as info:
        dm.load_tasks()
    message = str(info.value)
    assert "options" in message or "answer_index" in message, message
    assert f"{path}:{position + 1}" in message, message


# ------------------------------------------------------------------------------------ through the CLI


def small_config() -> dict:
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update(enable_progress_bar=False, log_every_n_steps=1)
    config["trainer"]["callbacks"][1]["init_args"]["heatmap"] = False
    config["model"]["tiny"] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "max_position_embeddings": 64}
    config["model"]["warmup_steps"] = 0
    config["data"].update(global_batch_size=4, steps_per_task=1, max_length=48, tasks=[
        {"name": "safety", "source": "synth:safety", "train_size": 8, "eval_size": 2, "probe_size": 1, "max_new_tokens": 2},
        {"name": "cipher_a", "source": "synth:cipher_a", "train_size": 8, "eval_size": 2, "probe_size": 1, "max_new_tokens": 2},
    ])
    return config


def run_cli(directory: Path, config: dict, capsys) -> tuple[int, str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    root = directory / "run"
    capsys.readouterr()
    try:
        code = main(["fit", "--config", str(path), "--trainer.default_root_dir", str(root)])
    except SystemExit as exit_:  # jsonargparse's own type errors
        code = exit_.code
    return code, capsys.readouterr().err, root


def assert_clean_failure(code, err: str, root: Path, *fragments: str) -> str:
    assert code == 2, f"exit code {code}, stderr:\n{err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    # jsonargparse's type errors continue on indented lines under their one `error:` line
    detail = err[err.index(errors[0]):]
    for fragment in fragments:
        assert fragment in detail, f"{fragment!r} not in {detail[-2000:]!r}"
    assert not list(root.rglob("scores.json")) if root.exists() else True, "a failed run wrote scores.json"
    assert not list(root.rglob("*.ckpt")) if root.exists() else True, "a failed run wrote a checkpoint"
    return detail


@CLI
@given(case=broken_jsonl())
def test_a_malformed_task_file_stops_the_cli_with_one_error_line_and_no_output(tmp_path_factory, capsys, case):
    count("cli_task_file")
    content, _, line, field = case
    directory = tmp_path_factory.mktemp("bad_file")
    data = directory / "task.jsonl"
    data.write_bytes(content)
    config = small_config()
    config["data"]["tasks"].append(tasks_with(data)[0])
    code, err, root = run_cli(directory, config, capsys)
    detail = assert_clean_failure(code, err, root, str(data))
    assert_names_the_defect(detail, data, line, field)


def _not_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip().lower() not in ("", "null", "none", "true", "false", "yes", "no", "on", "off", "~")
    return False


NONPOSITIVE = st.integers(max_value=0)
NOT_A_NUMBER = st.text(alphabet="abcxyz-_", min_size=1, max_size=6).filter(_not_numeric)
OUTSIDE_UNIT = st.one_of(st.floats(max_value=-0.01, allow_nan=False, allow_infinity=False), st.floats(min_value=1.01, allow_nan=False, allow_infinity=False))
UNKNOWN_CHOICE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)

# key -> (where it lives, strategy of invalid values, fragment the error must contain)
BAD_VALUES = {
    "data.global_batch_size": (NONPOSITIVE | NOT_A_NUMBER, "global_batch_size"),
    "data.steps_per_task": (NONPOSITIVE | NOT_A_NUMBER, "steps_per_task"),
    "data.max_length": (NONPOSITIVE, "max_length"),
    "data.buffer_size": (st.integers(max_value=-1) | OUTSIDE_UNIT.filter(lambda x: x != int(x)), "buffer_size"),
    "data.buffer_policy": (UNKNOWN_CHOICE.filter(lambda s: s not in ("random", "reservoir", "first")), "buffer_policy"),
    "model.learning_rate": (st.floats(max_value=0.0, allow_nan=False, allow_infinity=False) | st.just(float("nan")), "learning_rate"),
    "model.weight_decay": (st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False), "weight_decay"),
    "model.warmup_steps": (st.integers(max_value=-1), "warmup_steps"),
    "model.min_lr_ratio": (OUTSIDE_UNIT, "min_lr_ratio"),
    "model.lr_schedule": (UNKNOWN_CHOICE.filter(lambda s: s not in ("linear", "cosine", "constant")), "lr_schedule"),
    "model.eval_batch_size": (NONPOSITIVE, "eval_batch_size"),
    "model.tiny.num_attention_heads": (st.sampled_from([3, 5, 7, 0, -2]), "num_attention_heads"),
    "model.lora": (st.fixed_dictionaries({"r": NONPOSITIVE, "target_modules": st.just(["q_proj"])}), "lora"),
    "task.train_size": (NONPOSITIVE, "train_size"),
    "task.eval_size": (NONPOSITIVE, "eval_size"),
    "task.metric": (UNKNOWN_CHOICE.filter(lambda s: s not in ("exact_match", "edit_similarity", "rouge_l", "mc_accuracy")), "metric"),
    "task.source": (st.sampled_from(["synth:nope", "/nonexistent/file.jsonl", "callable:no_such_module:fn", "data.txt"]), None),
    "FixedRatio.ratio": (OUTSIDE_UNIT, "ratio"),
    "ForgettingEvaluator.probe_every_n_steps": (NONPOSITIVE, "probe_every_n_steps"),
    "TaskCheckpoint.every_n_train_steps": (st.integers(max_value=-1), "every_n_train_steps"),
}


def _set(config: dict, key: str, value) -> None:
    head, _, leaf = key.rpartition(".")
    if head == "task":
        config["data"]["tasks"][1][leaf] = value
        return
    if head in ("FixedRatio", "ForgettingEvaluator", "TaskCheckpoint"):
        callback = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(head))
        callback.setdefault("init_args", {})[leaf] = value
        return
    node = config
    for part in head.split("."):
        node = node[part]
    node[leaf] = value


@st.composite
def bad_config_value(draw):
    key = draw(st.sampled_from(sorted(BAD_VALUES)))
    strategy, fragment = BAD_VALUES[key]
    return key, draw(strategy), fragment


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=bad_config_value())
def test_every_invalid_config_value_is_one_clear_error_naming_the_key(tmp_path_factory, capsys, case):
    count("config_value")
    key, value, fragment = case
    config = small_config()
    _set(config, key, value)
    directory = tmp_path_factory.mktemp("bad_value")
    code, err, root = run_cli(directory, config, capsys)
    # a bad source is named by its value (the part after the scheme), every other key by its name
    assert_clean_failure(code, err, root, fragment or str(value).split(":")[-2 if value.startswith("callable:") else -1])


# ------------------------------------------------------------------------------------ untrusted files


class _Payload:
    """Pickles to a call of os.system: loading it with plain pickle would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    config = small_config()
    config["data"]["tasks"] = config["data"]["tasks"][:1]
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    import sys

    argv, sys.argv = sys.argv, ["lightning-cit"]
    try:
        assert main(["fit", "--config", str(path), "--trainer.default_root_dir", str(directory / "run")]) == 0
    finally:
        sys.argv = argv
    return path, directory / "run" / "checkpoints" / "last.ckpt"


def tampered_checkpoints(good: bytes, marker: Path) -> dict[str, bytes]:
    code_in_torch_file = io.BytesIO()
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, code_in_torch_file)
    return {
        "truncated": good[: len(good) // 2],
        "garbage": b"not a checkpoint at all" * 10,
        "empty": b"",
        "pickle_with_code": pickle.dumps(_Payload(marker)),
        "torch_file_with_code": code_in_torch_file.getvalue(),
    }


@pytest.mark.parametrize("how", ["path", "last"])
def test_a_tampered_checkpoint_is_a_clear_error_and_runs_no_code(tmp_path, capsys, good_run, how):
    config, good = good_run
    marker = tmp_path / "code_ran"
    for name, content in tampered_checkpoints(good.read_bytes(), marker).items():
        if how == "last" and name not in ("truncated", "torch_file_with_code"):
            continue  # "last" builds the trainer first (a second per case): the two that matter most
        count("tampered_checkpoint")
        root = tmp_path / f"{name}_{how}"
        (root / "checkpoints").mkdir(parents=True)
        (root / "checkpoints" / "last.ckpt").write_bytes(content)
        capsys.readouterr()
        target = "last" if how == "last" else str(root / "checkpoints" / "last.ckpt")
        code = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--ckpt_path", target])
        err = capsys.readouterr().err
        assert code == 2, (name, err[-2000:])
        assert "Traceback" not in err and not marker.exists(), name
        line = next(line for line in err.splitlines() if line.startswith("error:"))
        assert "cannot load checkpoint" in line and "last.ckpt" in line and "weights_only=True" in line, line
        assert not list(root.rglob("scores.json")), name
        assert [p.name for p in root.rglob("*.ckpt")] == ["last.ckpt"], name  # nothing new written
    # the control: the untampered checkpoint loads with weights_only=True and resumes (a finished run: nothing to train)
    root = tmp_path / "untampered"
    (root / "checkpoints").mkdir(parents=True)
    shutil.copy(good, root / "checkpoints" / "last.ckpt")
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] > 0
    assert main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--ckpt_path", "last"]) == 0


LIBRARY = [REPO / "lightning_cit", REPO / "callbacks", REPO / "datamodules"]


def test_the_library_loads_files_only_with_safe_loaders():
    """Every torch.load in the library passes weights_only=True; no pickle, marshal, yaml.load, eval or exec."""
    offenders = []
    for directory in LIBRARY:
        for path in sorted(directory.rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = ast.unparse(func)
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                if name.endswith("torch.load") or name == "load" and isinstance(func, ast.Name):
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
                    if not safe:
                        offenders.append(f"{where}: {name}(...) without weights_only=True")
                if name in ("pickle.load", "pickle.loads", "marshal.loads", "yaml.load", "yaml.unsafe_load", "eval", "exec", "dill.load"):
                    offenders.append(f"{where}: {name}(...)")
    assert not offenders, "\n".join(offenders)
