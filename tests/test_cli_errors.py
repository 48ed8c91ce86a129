"""Bad input to ``lightning-cit fit`` is one ``error:`` line and exit code 2, and no ``scores.json`` is written.

The CLI runs in-process through :func:`lightning_cit.cli.main`; configs are ``configs/quickstart.yaml``
shrunk to two tiny tasks, with one thing broken per test.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # conftest.py sets it too; kept here so the module also runs alone

import pytest
import yaml

from lightning_cit.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when sys.argv (here pytest's) and an explicit argv are both present
    monkeypatch.setattr("sys.argv", ["lightning-cit"])


@pytest.fixture(scope="module")
def quickstart() -> dict:
    return yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))


def small_config(quickstart: dict) -> dict:
    """The quickstart with two tiny tasks, so anything that does start finishes in seconds."""
    config = copy.deepcopy(quickstart)
    config["data"]["tasks"] = [
        {"name": "safety", "source": "synth:safety", "metric": "exact_match", "train_size": 8, "eval_size": 2, "probe_size": 1,
         "max_new_tokens": 4},
        {"name": "cipher_a", "source": "synth:cipher_a", "metric": "edit_similarity", "train_size": 8, "eval_size": 2,
         "probe_size": 1, "max_new_tokens": 4},
    ]
    config["data"]["global_batch_size"] = 4
    config["model"]["warmup_steps"] = 0
    config["trainer"]["log_every_n_steps"] = 1
    return config


def run_cli(tmp_path: Path, config: dict) -> tuple[int, Path]:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    root = tmp_path / "run"
    argv = [
        "fit", "--config", str(config_path),
        "--data.steps_per_task", "2",
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    return main(argv), root


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, f"expected one 'error:' line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def assert_no_scores(root: Path) -> None:
    found = sorted(root.rglob("scores.json")) if root.exists() else []
    assert found == [], f"a failed run wrote {found}"


def test_valid_small_config_writes_scores(tmp_path, quickstart, capsys):
    """The control: the same config unbroken runs and writes scores.json under default_root_dir."""
    config = small_config(quickstart)
    config["trainer"]["callbacks"][1]["init_args"]["heatmap"] = False  # matplotlib import + render: seconds
    code, root = run_cli(tmp_path, config)
    assert code == 0, capsys.readouterr().err[-3000:]
    found = list(root.rglob("scores.json"))
    assert len(found) == 1
    assert json.loads(found[0].read_text(encoding="utf-8"))["tasks"] == ["safety", "cipher_a"]


# -------------------------------------------------------------------------------------------- data


def test_malformed_jsonl_line(tmp_path, quickstart, capsys):
    data = tmp_path / "broken.jsonl"
    good = json.dumps({"prompt": "Plural of cat", "response": "cats"})
    lines = [good] * 4 + ['{"prompt": "Plural of dog", "response": dogs}'] + [good] * 5
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = small_config(quickstart)
    config["data"]["tasks"][1] = {"name": "plurals", "source": str(data), "train_size": None, "eval_size": 2, "probe_size": 1}
    code, root = run_cli(tmp_path, config)
    assert code == 2
    line = error_line(capsys)
    assert f"{data}:5" in line and "plurals" in line and "malformed JSON" in line
    assert_no_scores(root)


def test_duplicate_task_names(tmp_path, quickstart, capsys):
    config = small_config(quickstart)
    config["data"]["tasks"][1]["name"] = "safety"
    code, root = run_cli(tmp_path, config)
    assert code == 2
    assert "duplicate task name 'safety'" in error_line(capsys)
    assert_no_scores(root)


def test_unknown_metric(tmp_path, quickstart, capsys):
    config = small_config(quickstart)
    config["data"]["tasks"][1]["metric"] = "bleu"
    code, root = run_cli(tmp_path, config)
    assert code == 2
    line = error_line(capsys)
    assert "'bleu'" in line and "cipher_a" in line
    for metric in ("exact_match", "edit_similarity", "rouge_l", "mc_accuracy"):
        assert metric in line
    assert_no_scores(root)


def test_missing_task_file(tmp_path, quickstart, capsys):
    config = small_config(quickstart)
    config["data"]["tasks"][0]["source"] = str(tmp_path / "nowhere.jsonl")
    code, root = run_cli(tmp_path, config)
    assert code == 2
    assert "nowhere.jsonl" in error_line(capsys)
    assert_no_scores(root)


# ------------------------------------------------------------------------------------- controllers


def test_unknown_controller_class_path(tmp_path, quickstart, capsys):
    config = small_config(quickstart)
    config["trainer"]["callbacks"][0]["class_path"] = "lightning_cit.callbacks.FixedRatioo"
    code, root = run_cli(tmp_path, config)
    assert code == 2
    line = error_line(capsys)
    assert "'FixedRatioo'" in line
    for name in ("FixedRatio", "NoReplay", "Proportional"):
        assert name in line
    assert_no_scores(root)


def test_fixed_ratio_out_of_range(tmp_path, quickstart, capsys):
    config = small_config(quickstart)
    config["trainer"]["callbacks"][0]["init_args"]["ratio"] = 1.5
    # jsonargparse wraps the ConfigError raised in FixedRatio.__init__; main() finds it in the chain
    code, root = run_cli(tmp_path, config)
    assert_no_scores(root)
    assert code == 2
    line = error_line(capsys)
    assert "FixedRatio" in line and "[0, 1]" in line
