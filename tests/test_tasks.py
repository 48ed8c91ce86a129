"""Task sources, record normalization, splits and the ConfigError messages of ``lightning_cit.tasks``."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # conftest.py sets it too; kept here so the module also runs alone

import helpers_sources
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_cit.errors import ConfigError
from lightning_cit.synth import GENERATORS
from lightning_cit.tasks import TaskData, TaskDataError, TaskSpec, load_task, validate_specs

N = 40  # records per written source: enough for eval 8 + probe 4 + train


def records(n: int = N) -> list[dict]:
    return [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def spec(source: str, name: str = "t", **kwargs) -> TaskSpec:
    kwargs = {"eval_size": 8, "probe_size": 4, "train_size": None, **kwargs}
    return TaskSpec(name=name, source=source, **kwargs)


def prompts(samples: list[dict]) -> list[str]:
    return [s["messages"][-1]["content"] for s in samples]


def assert_loaded(task: TaskData, n_train: int, eval_size: int = 8, probe_size: int = 4) -> None:
    assert (len(task.train), len(task.eval), len(task.probe)) == (n_train, eval_size, probe_size)
    for sample in task.train + task.eval + task.probe:
        assert set(sample) >= {"messages", "response"}
        assert sample["messages"][-1]["role"] == "user"
        assert isinstance(sample["response"], str)


def assert_error(exc_info, *fragments: str) -> None:
    """The error is a ConfigError and its message names every fragment (what to fix)."""
    assert isinstance(exc_info.value, ConfigError)
    message = str(exc_info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ------------------------------------------------------------------------------------- every source kind


def test_synth_source_sizes_and_default_metric():
    task = load_task(TaskSpec(name="c", source="synth:cipher_a", train_size=20, eval_size=8, probe_size=4))
    assert_loaded(task, 20)
    assert task.metric == "edit_similarity"  # the generator's default metric
    assert task.train[0]["messages"][0]["content"].startswith("Encode with key A: ")
    again = load_task(TaskSpec(name="c", source="synth:cipher_a", train_size=20, eval_size=8, probe_size=4))
    assert again.train == task.train and again.eval == task.eval  # deterministic


def test_synth_multiple_choice_and_safety_fields():
    compare = load_task(TaskSpec(name="cmp", source="synth:compare", train_size=10, eval_size=6, probe_size=2))
    assert compare.metric == "mc_accuracy"
    assert all(s["options"] == ["A", "B"] and s["answer_index"] in (0, 1) for s in compare.eval)
    safety = load_task(TaskSpec(name="s", source="synth:safety", train_size=10, eval_size=20, probe_size=2))
    assert {s["harmful"] for s in safety.eval} == {True, False}


def test_jsonl_source(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", records())
    task = load_task(spec(path))
    assert_loaded(task, N - 12)
    assert task.metric == "exact_match"
    by_prompt = {s["messages"][0]["content"]: s["response"] for s in task.train + task.eval + task.probe}
    assert by_prompt == {r["prompt"]: r["response"] for r in records()}


def test_jsonl_skips_blank_lines_and_reads_crlf(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\r\n".join(json.dumps(r).encode() for r in records()) + b"\r\n\r\n   \n")
    assert_loaded(load_task(spec(str(path))), N - 12)


@pytest.mark.parametrize("wrapped", [False, True], ids=["list", "data-key"])
def test_json_source(tmp_path, wrapped):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"data": records()} if wrapped else records()), encoding="utf-8")
    assert_loaded(load_task(spec(str(path))), N - 12)


def test_csv_source(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,response\n" + "".join(f"question {i},answer {i}\n" for i in range(N)), encoding="utf-8")
    task = load_task(spec(str(path)))
    assert_loaded(task, N - 12)
    assert sorted(prompts(task.train + task.eval + task.probe)) == sorted(f"question {i}" for i in range(N))


def test_parquet_source(tmp_path):
    import datasets

    path = tmp_path / "t.parquet"
    datasets.Dataset.from_list(records()).to_parquet(str(path))
    assert_loaded(load_task(spec(str(path))), N - 12)


def test_save_to_disk_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list(records()).save_to_disk(str(tmp_path / "ds"))
    assert_loaded(load_task(spec(str(tmp_path / "ds"))), N - 12)
    # a DatasetDict is read from its 'train' split
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records())}).save_to_disk(str(tmp_path / "dd"))
    assert_loaded(load_task(spec(str(tmp_path / "dd"))), N - 12)


def test_callable_source_gets_split_n_seed():
    helpers_sources.CALLS.clear()
    task = load_task(spec("callable:helpers_sources:numbered", train_size=10), seed=3)
    assert_loaded(task, 10)
    assert helpers_sources.CALLS == [{"split": "train", "n": 10 + 8 + 4, "seed": 3}]
    # the dotted form and a datasets.Dataset return value work too
    assert_loaded(load_task(spec("callable:helpers_sources.numbered", train_size=10)), 10)
    assert_loaded(load_task(spec("callable:helpers_sources:as_dataset", train_size=10)), 10)


def test_callable_source_with_train_size_none_trains():
    # like synth, None asks the function for 1000 training samples (it used to ask for none and fail)
    helpers_sources.CALLS.clear()
    task = load_task(spec("callable:helpers_sources:numbered", train_size=None))
    assert_loaded(task, 1000)
    assert helpers_sources.CALLS[0]["n"] == 1000 + 8 + 4


def test_eval_split_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", records(20))
    held = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"held {i}", "response": "x"} for i in range(12)])
    task = load_task(spec(train, eval_split=held))
    assert_loaded(task, 20)  # nothing held out of the training file
    assert all(p.startswith("held") for p in prompts(task.eval + task.probe))
    assert not set(prompts(task.eval)) & set(prompts(task.probe))


# ------------------------------------------------------------------------------ fields, chat, system, splits


def test_prompt_response_field_mapping(tmp_path):
    rows = [{"question": f"Uppercase: w{i}", "answer": f"W{i}", "prompt": "ignored"} for i in range(N)]
    task = load_task(spec(write_jsonl(tmp_path / "q.jsonl", rows), prompt_field="question", response_field="answer"))
    assert_loaded(task, N - 12)
    for sample in task.train:
        assert sample["messages"] == [{"role": "user", "content": sample["messages"][0]["content"]}]
        assert sample["messages"][0]["content"].startswith("Uppercase: w")
        assert sample["response"] == sample["messages"][0]["content"].split(": ")[1].upper()


def test_chat_messages_last_assistant_turn_is_the_response(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"Opposite of w{i}?"},
                {"role": "assistant", "content": f"not w{i}"},
            ]
        }
        for i in range(N)
    ]
    task = load_task(spec(write_jsonl(tmp_path / "chat.jsonl", rows)))
    assert_loaded(task, N - 12)
    for sample in task.train + task.eval:
        system, user = sample["messages"]
        assert system == {"role": "system", "content": "be brief"}
        assert user["role"] == "user" and sample["response"] == "not " + user["content"][12:-1]


def test_custom_messages_field_wins_over_prompt(tmp_path):
    rows = [
        {"turns": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "prompt": "x"}
        for i in range(N)
    ]
    task = load_task(spec(write_jsonl(tmp_path / "c.jsonl", rows), messages_field="turns"))
    assert all(s["response"] == "a" + s["messages"][0]["content"][1:] for s in task.train)


def test_system_prompt_is_prepended(tmp_path):
    task = load_task(spec(write_jsonl(tmp_path / "t.jsonl", records()), system_prompt="Answer briefly."))
    for sample in task.train + task.eval + task.probe:
        assert sample["messages"][0] == {"role": "system", "content": "Answer briefly."}
        assert sample["messages"][1]["role"] == "user"
    synth_task = load_task(TaskSpec(name="e", source="synth:echo", train_size=4, eval_size=2, probe_size=1, system_prompt="S"))
    assert all(s["messages"][0] == {"role": "system", "content": "S"} for s in synth_task.train + synth_task.eval)


@pytest.mark.parametrize("train_size", [None, 5, 28])
def test_splits_are_disjoint_and_sized(tmp_path, train_size):
    task = load_task(spec(write_jsonl(tmp_path / "t.jsonl", records()), train_size=train_size, eval_size=7, probe_size=5))
    expected_train = N - 12 if train_size is None else train_size
    assert (len(task.train), len(task.eval), len(task.probe)) == (expected_train, 7, 5)
    train, evals, probe = set(prompts(task.train)), set(prompts(task.eval)), set(prompts(task.probe))
    assert len(train) == expected_train and len(evals) == 7 and len(probe) == 5  # no duplicates within a split
    assert not train & evals and not train & probe and not evals & probe


def test_split_depends_on_seed_only(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", records())
    a, b, c = load_task(spec(path), seed=0), load_task(spec(path), seed=0), load_task(spec(path), seed=1)
    assert prompts(a.eval) == prompts(b.eval) and prompts(a.train) == prompts(b.train)
    assert prompts(a.eval) != prompts(c.eval)


def test_eval_only_task_keeps_no_training_samples(tmp_path):
    task = load_task(spec(write_jsonl(tmp_path / "t.jsonl", records(10)), train=False, eval_size=8, probe_size=4))
    assert task.train == [] and len(task.eval) == 8 and len(task.probe) == 2


def test_probe_size_zero_falls_back_to_eval(tmp_path):
    task = load_task(spec(write_jsonl(tmp_path / "t.jsonl", records()), probe_size=0))
    assert task.probe == task.eval[:0] == []


def test_mc_accuracy_with_options_loads(tmp_path):
    rows = [{"prompt": f"Pick {i % 2}", "response": "AB"[i % 2], "options": ["A", "B"], "answer_index": i % 2} for i in range(N)]
    task = load_task(spec(write_jsonl(tmp_path / "mc.jsonl", rows), metric="mc_accuracy"))
    assert task.metric == "mc_accuracy"
    assert all(s["options"] == ["A", "B"] and s["response"] == "AB"[s["answer_index"]] for s in task.eval)


def test_validate_specs_accepts_a_good_sequence():
    validate_specs([TaskSpec(name="a", source="synth:echo"), TaskSpec(name="b", source="x.jsonl", metric="rouge_l")])


# ------------------------------------------------------------------------------------------- bad inputs


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(records(1)[0]) + "\n\n" + '{"prompt": "a", "response": }\n', encoding="utf-8")
    with pytest.raises(TaskDataError) as info:
        load_task(spec(str(path), name="broken_task"))
    assert_error(info, "broken.jsonl:3", "broken_task", "malformed JSON")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(records(1)[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(path)))
    assert_error(info, "t.jsonl:2", "expected a JSON object, got list")


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(records(1)[0]).encode() + b'\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(path)))
    assert_error(info, "latin1.jsonl:2", "UTF-8")
    json_path = tmp_path / "latin1.json"
    json_path.write_bytes(b'[{"prompt": "caf\xe9", "response": "x"}]')
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(json_path)))
    assert_error(info, "latin1.json:1", "UTF-8")


def test_invalid_json_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[\n{"prompt": "a",\n "response": "b"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(path)))
    assert_error(info, "t.json:", "invalid JSON")
    path.write_text(json.dumps({"rows": records()}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(path)))
    assert_error(info, "t.json", "JSON list of objects")


def test_missing_field_names_task_and_field(tmp_path):
    rows = [{"prompt": f"q{i}", "output": "x"} for i in range(N)]
    with pytest.raises(ConfigError) as info:
        load_task(spec(write_jsonl(tmp_path / "t.jsonl", rows), name="my_task"))
    assert_error(info, "my_task", "missing field 'response'", "t.jsonl:1", "response_field")
    with pytest.raises(ConfigError) as info:
        load_task(spec(write_jsonl(tmp_path / "t.jsonl", rows), name="my_task", prompt_field="question", response_field="output"))
    assert_error(info, "my_task", "missing field 'question'")


def test_missing_csv_column_names_csv_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,answer\n" + "".join(f"q{i},a{i}\n" for i in range(N)), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(path), name="csv_task"))
    assert_error(info, "csv_task", "missing field 'response'", "t.csv:2")  # line 1 is the header


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_task_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(path), name="nothing"))
    assert_error(info, "nothing", "empty.jsonl", "no samples")


def test_empty_json_list(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(path)))
    assert_error(info, "empty.json", "no samples")


def test_too_few_samples_for_held_out(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_task(spec(write_jsonl(tmp_path / "t.jsonl", records(12)), eval_size=8, probe_size=4))
    assert_error(info, "12 samples", "eval_size + probe_size = 12", "eval_split")


def test_duplicate_task_names():
    specs = [
        TaskSpec(name="a", source="synth:echo"),
        TaskSpec(name="b", source="synth:shift"),
        TaskSpec(name="a", source="synth:safety"),
    ]
    with pytest.raises(ConfigError) as info:
        validate_specs(specs)
    assert_error(info, "duplicate task name 'a'", "unique")


def test_unknown_metric_lists_valid_metrics():
    with pytest.raises(ConfigError) as info:
        validate_specs([TaskSpec(name="a", source="synth:echo", metric="bleu")])
    assert_error(info, "'bleu'", "task #0 ('a')", "exact_match", "edit_similarity", "rouge_l", "mc_accuracy")


@pytest.mark.parametrize(
    ("specs", "fragments"),
    [
        ([], ["at least one task"]),
        ([TaskSpec(name="", source="synth:echo")], ["'name'"]),
        ([TaskSpec(name="a", source="")], ["'source'"]),
        ([TaskSpec(name="a", source="synth:echo", eval_size=0)], ["'eval_size'", "positive integer"]),
        ([TaskSpec(name="a", source="synth:echo", train_size=-3)], ["'train_size'", "-3"]),
        ([TaskSpec(name="a", source="synth:echo", probe_size=-1)], ["'probe_size'"]),
        ([TaskSpec(name="a", source="synth:echo", train=False)], ["train: false"]),
    ],
    ids=["no-tasks", "no-name", "no-source", "eval-size", "train-size", "probe-size", "nothing-trained"],
)
def test_validate_specs_rejects(specs, fragments):
    with pytest.raises(ConfigError) as info:
        validate_specs(specs)
    assert_error(info, *fragments)


def test_unknown_synth_generator_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        load_task(TaskSpec(name="x", source="synth:cipher_z"))
    assert_error(info, "'cipher_z'", *(f"synth:{g}" for g in GENERATORS))


def test_nonexistent_file(tmp_path):
    missing = tmp_path / "nowhere" / "tasks.jsonl"
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(missing), name="ghost"))
    assert_error(info, "ghost", str(missing), "does not exist")


def test_missing_eval_split_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_task(spec(write_jsonl(tmp_path / "t.jsonl", records()), eval_split=str(tmp_path / "eval.jsonl")))
    assert_error(info, "eval.jsonl", "does not exist")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "tasks.txt"
    path.write_text("prompt\tresponse\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(path)))
    assert_error(info, "tasks.txt", ".json", ".jsonl", ".csv", ".parquet", "synth:<generator>", "callable:")


def test_directory_not_saved_by_datasets(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(tmp_path / "plain")))
    assert_error(info, "plain", "save_to_disk")


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_text("this is not parquet", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_task(spec(str(path)))
    assert_error(info, "bad.parquet", "parquet")


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "more?"}],
         "last turn of 'messages' must be the assistant's"),
        ([{"role": "assistant", "content": "a"}], "needs a prompt turn"),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], "needs 'role' and 'content'"),
        ([], "non-empty list of turns"),
        ("user: q", "non-empty list of turns"),
    ],
    ids=["last-not-assistant", "no-prompt-turn", "turn-without-content", "empty", "not-a-list"],
)
def test_bad_chat_messages(tmp_path, messages, fragment):
    rows = records(N - 1) + [{"messages": messages}]
    with pytest.raises(ConfigError) as info:
        load_task(spec(write_jsonl(tmp_path / "chat.jsonl", rows), name="chat"))
    assert_error(info, "chat", f"chat.jsonl:{N}", fragment)


def test_mc_accuracy_without_options(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_task(spec(write_jsonl(tmp_path / "t.jsonl", records()), name="mc", metric="mc_accuracy"))
    assert_error(info, "mc", "mc_accuracy", "'options'", "'answer_index'")


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("callable:helpers_sources:no_such_fn", ["helpers_sources:no_such_fn", "callable:<module>:<function>"]),
        ("callable:no_such_module_xyz:fn", ["no_such_module_xyz"]),
        ("callable:helpers_sources:strings", ["helpers_sources:strings()[0]", "expected a record (mapping), got str"]),
        ("callable:helpers_sources:nothing", ["must return a list of dicts", "NoneType"]),
    ],
    ids=["no-function", "no-module", "returns-strings", "returns-none"],
)
def test_bad_callable_source(source, fragments):
    with pytest.raises(ConfigError) as info:
        load_task(spec(source, train_size=4))
    assert_error(info, *fragments)


# ------------------------------------------------------------------------------------- property-based

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_turns = st.lists(
    st.fixed_dictionaries(
        {}, optional={"role": st.sampled_from(["user", "assistant", "system"]) | _json_values, "content": _json_values}
    ),
    max_size=3,
)
_records = st.fixed_dictionaries(
    {}, optional={"prompt": _json_values, "response": _json_values, "messages": _turns | _json_values}
)
_valid = st.one_of(
    st.fixed_dictionaries({"prompt": _json_scalars.filter(lambda v: v is not None), "response": _json_values}),
    st.builds(
        lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
        _json_values,
        _json_values,
    ),
).map(json.dumps)
_arbitrary = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    _json_values.map(json.dumps),
    _records.map(json.dumps),
    st.sampled_from(["", "   ", "{", "}", "[]", "null", '{"prompt": "q"}', '{"messages": []}']),
)
# mostly loadable records with arbitrary lines mixed in, so both outcomes are common
_lines = st.one_of(_valid, _valid, _valid, _valid, _arbitrary)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(_lines, max_size=10))
def test_arbitrary_jsonl_lines_load_or_raise_config_error(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        task = load_task(spec(str(path), name="fuzz", eval_size=1, probe_size=1))
    except ConfigError as err:
        assert "fuzz" in str(err)  # every message names the task
    else:
        assert len(task.eval) == 1 and len(task.train) >= 1
        assert all(isinstance(s["response"], str) for s in task.train + task.eval + task.probe)
