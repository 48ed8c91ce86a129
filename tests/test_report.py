"""``lightning-cit report``: the comparison of several runs from made-up ``scores.json`` files."""

from __future__ import annotations

import json

import pytest

from lightning_cit import cli, report
from lightning_cit.metrics import summarize

# the worked example of methods.md §1.4 (acc 75, bwt_gem -15, bwt_trace -10, forgetting_chaudhry 15) with a base row
MATRIX_A = [[10.0, 20.0, 30.0], [80.0, 25.0, 30.0], [70.0, 85.0, 35.0], [60.0, 75.0, 90.0]]
MATRIX_B = [[10.0, 20.0, 30.0], [80.0, 25.0, 30.0], [80.0, 85.0, 35.0], [78.0, 84.0, 88.0]]


def scores(matrix, general, safety, complete=True, rows=("base", "a", "b", "c"), losses=None):
    return {
        "tasks": ["a", "b", "c"],
        "metrics": {"a": "exact_match", "b": "mc_accuracy", "c": "rouge_l"},
        "rows": list(rows)[: len(matrix)],
        "matrix": matrix,
        "loss_matrix": losses or [[1.0, 1.0, 1.0] for _ in matrix],
        "complete": complete,
        "summary": {},
        "eval_only": {
            "general": {"metric": "mc_accuracy", "scores": general, "losses": [1.0] * len(general)},
            "safety": {"metric": "rouge_l", "scores": [0.0] * len(safety), "losses": [1.0] * len(safety)},
        },
        "safety": {"task": "safety", "refusal_harmful": [s + 10 for s in safety], "over_refusal_benign": [10.0] * len(safety),
                   "score": safety, "gamma": 1.0},
    }


def write_run(root, data):
    path = root / "lightning_logs" / "version_0" / "scores.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def test_report_table_figures_and_json(tmp_path, capsys):
    run_a = tmp_path / "no_replay-seed0"
    losses_a = [[2.0, 2.0, 2.0], [1.0, 2.0, 2.0], [1.5, 1.0, 2.0], [2.0, 1.5, 1.0]]
    write_run(run_a, scores(MATRIX_A, general=[40.0, 38.0, 30.0, 25.0], safety=[80.0, 60.0, 40.0, 20.0], losses=losses_a))
    file_b = write_run(tmp_path / "replay-seed0", scores(MATRIX_B, general=[40.0, 41.0, 42.0, 43.0], safety=[80.0, 80.0, 70.0, 75.0]))
    out = tmp_path / "report"

    assert cli.main(["report", str(run_a), str(file_b), "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert table.strip() in printed
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["run", "tasks"] and header[2:] == list(report.TABLE_KEYS)
    row_a = dict(zip(header, [c.strip() for c in lines[2].strip("|").split("|")]))
    row_b = dict(zip(header, [c.strip() for c in lines[3].strip("|").split("|")]))
    # labels: the run directory, also when a scores.json under lightning_logs/version_N is given
    assert row_a["run"] == "no_replay-seed0" and row_b["run"] == "replay-seed0"
    assert row_a["tasks"] == "3/3"
    assert (row_a["acc"], row_a["bwt_gem"], row_a["bwt_trace"], row_a["forgetting_chaudhry"]) == ("75.00", "-15.00", "-10.00", "15.00")
    # TRACE deltas against the base row: general probe 25 - 40, safety score 20 - 80
    assert (row_a["general_delta"], row_a["safety_delta"], row_a["safety"]) == ("-15.00", "-60.00", "20.00")
    assert (row_b["general_delta"], row_b["safety_delta"]) == ("3.00", "-5.00")
    # backward transfer on the eval losses: ((2.0 - 1.0) + (1.5 - 1.0)) / 2, a rise = forgetting
    assert (row_a["loss_bwt_gem"], row_b["loss_bwt_gem"]) == ("0.75", "0.00")

    data = json.loads((out / "report.json").read_text())
    summary_b = data["runs"][1]["summary"]
    for key, value in summarize(MATRIX_B).items():  # the library's metrics, not a re-implementation
        assert summary_b[key] == pytest.approx(value)
    assert data["runs"][0]["deltas"]["general"] == [0.0, -2.0, -10.0, -15.0]
    assert data["runs"][0]["deltas"]["safety_score"] == [0.0, -20.0, -40.0, -60.0]

    for name in ("curves.png", "heatmap_no_replay-seed0.png", "heatmap_replay-seed0.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave no temporaries


def test_incomplete_run_is_summarized_over_finished_tasks(tmp_path):
    partial = scores(MATRIX_A[:3], general=[40.0, 38.0, 30.0], safety=[80.0, 60.0, 40.0], complete=False)
    run = report.load_run(write_run(tmp_path / "crashed", partial))
    summary = report.run_summary(run)
    assert summary["tasks_done"] == 2 and summary["complete"] is False
    assert summary["acc"] == pytest.approx(summarize([r[:2] for r in MATRIX_A[:3]])["acc"])
    assert summary["general_delta"] == pytest.approx(-10.0)
    assert "| crashed | 2/3 |" in report.comparison_table([run])


def test_directory_prefers_the_newest_complete_scores(tmp_path):
    root = tmp_path / "run"
    write_run(root, scores(MATRIX_A, general=[1.0] * 4, safety=[0.0] * 4))
    newer = root / "lightning_logs" / "version_1" / "scores.json"
    newer.parent.mkdir(parents=True)
    newer.write_text(json.dumps(scores(MATRIX_A[:2], general=[1.0] * 2, safety=[0.0] * 2, complete=False)))
    assert report.find_scores(root).parent.name == "version_0"


def test_labels_option_and_duplicate_labels(tmp_path, capsys):
    file = write_run(tmp_path / "same", scores(MATRIX_A, general=[1.0] * 4, safety=[0.0] * 4))
    out = tmp_path / "out"
    assert report.main([str(file), str(file), "--out", str(out)]) == 0
    assert "| same (2) |" in capsys.readouterr().out
    assert report.main([str(file), "--labels", "mine", "--out", str(out)]) == 0
    assert "| mine |" in capsys.readouterr().out
    assert report.main([str(file), "--labels", "a", "b", "--out", str(out)]) == 2
    assert "--labels gives 2 names for 1 runs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", ":1: invalid JSON"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (json.dumps({"tasks": ["a"], "rows": ["base"]}), "missing field 'matrix'"),
        (json.dumps({"tasks": ["a", "b"], "rows": ["base"], "matrix": [[1.0]]}), "matrix row 0 must hold 2 numbers"),
        (json.dumps({"tasks": ["a"], "rows": ["base", "a"], "matrix": [[1.0]]}), "one row per entry of 'rows'"),
        (json.dumps({"tasks": ["a"], "rows": ["base"], "matrix": [[1.0]], "eval_only": {"g": {"scores": []}}}), "eval_only task 'g'"),
    ],
)
def test_malformed_scores_name_the_file(tmp_path, capsys, content, message):
    bad = tmp_path / "scores.json"
    bad.write_text(content)
    assert report.main([str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and message in err
    assert not (tmp_path / "out" / "table.md").exists()


def test_missing_run_and_empty_directory(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert f"run {str(tmp_path / 'nope')!r} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "holds no scores.json" in capsys.readouterr().err
