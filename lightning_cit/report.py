"""``lightning-cit report RUN... --out DIR``: compare several runs from their ``scores.json``.

Each ``RUN`` is a run directory (its newest complete ``scores.json`` below it is used, e.g.
``runs/x/lightning_logs/version_0/scores.json``) or a ``scores.json`` file. The report holds

- ``table.md``: one row per run with the named summary metrics (``acc``, ``nta``, ``bwt_gem``,
  ``bwt_trace``, ``fwt``, ``forgetting_chaudhry``, ``fgt_proxymix``, ``forgetting_mssr``, computed by
  :func:`lightning_cit.metrics.summarize`), ``loss_bwt_gem`` (the same backward transfer computed on the
  eval-loss matrix: the mean rise of each earlier task's loss from right after it was learned to the end;
  positive = forgetting; far less noisy than a score over a few eval samples), the TRACE deltas of the evaluation-only probes
  (``general_delta``: the mean over non-safety probes of their final score minus their base-row score;
  ``safety_delta``: the same for the safety score) and the final ``safety`` score (refusal on harmful
  minus over-refusal on benign); it is also printed;
- ``heatmap_<run>.png``: each run's score matrix (:func:`lightning_cit.results.write_heatmap`);
- ``curves.png``: every task's score over the sequence (one panel per task, probes included, one line per run);
- ``report.json``: the same numbers, plus each probe's delta at every row.

A run that stopped early is reported over the tasks it finished (``complete: false`` in the table).
Files are written atomically; a missing or malformed input is an ``error:`` line naming the file (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from lightning_cit.errors import ConfigError
from lightning_cit.metrics import SUMMARY_KEYS, summarize
from lightning_cit.results import atomic_write_json, atomic_write_text, write_heatmap

PROBE_KEYS = ("general_delta", "safety_delta", "safety")
TABLE_KEYS = (*SUMMARY_KEYS, "loss_bwt_gem", *PROBE_KEYS)


def find_scores(path: str | os.PathLike) -> Path:
    """The ``scores.json`` a run argument names: the file itself, or the newest complete one under a directory."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise ConfigError(f"run {str(path)!r} does not exist (give a run directory or a scores.json file)")
    found = sorted(path.rglob("scores.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"run directory {str(path)!r} holds no scores.json")
    complete = [p for p in found if _is_complete(p)]
    return (complete or found)[-1]


def _is_complete(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError):
        return False


def load_run(source: str | os.PathLike | dict, label: str | None = None) -> dict[str, Any]:
    """A run's scores (a path as :func:`find_scores` accepts, or an already parsed dict), checked, with a ``label``."""
    if isinstance(source, dict):
        scores, where = source, label or "scores"
    else:
        file = find_scores(source)
        where = str(file)
        try:
            scores = json.loads(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not UTF-8 text; expected a scores.json written by ForgettingEvaluator") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}:{err.lineno}: invalid JSON ({err.msg})") from None
        label = label or _label(Path(source), file)
    _check(scores, where)
    return {"label": label or where, "file": where, "scores": scores}


def _label(argument: Path, file: Path) -> str:
    """A readable name: the run directory, skipping Lightning's ``lightning_logs/version_N`` levels."""
    if argument.is_dir():
        return argument.resolve().name
    parts = [p for p in file.resolve().parent.parts if p != "lightning_logs" and not re.fullmatch(r"version_\d+", p)]
    return parts[-1] if parts else file.stem


def _check(scores: Any, where: str) -> None:
    if not isinstance(scores, dict):
        raise ConfigError(f"{where}: expected a JSON object written by ForgettingEvaluator (scores.json)")
    for key in ("tasks", "rows", "matrix"):
        if key not in scores:
            raise ConfigError(f"{where}: missing field {key!r}; is this a scores.json written by ForgettingEvaluator?")
    tasks, rows, matrix = scores["tasks"], scores["rows"], scores["matrix"]
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{where}: field 'tasks' must be a non-empty list of task names")
    if not isinstance(matrix, list) or not matrix or len(matrix) != len(rows):
        raise ConfigError(f"{where}: field 'matrix' must have one row per entry of 'rows' ({len(rows)}), and at least the base row")
    if len(matrix) > len(tasks) + 1:
        raise ConfigError(f"{where}: 'matrix' has {len(matrix)} rows, more than the {len(tasks) + 1} of {len(tasks)} tasks plus the base row")
    for r, row in enumerate(matrix):
        if not isinstance(row, list) or len(row) != len(tasks) or not all(isinstance(v, (int, float)) for v in row):
            raise ConfigError(f"{where}: matrix row {r} must hold {len(tasks)} numbers, one per task")
    for name, entry in (scores.get("eval_only") or {}).items():
        if not isinstance(entry, dict) or len(entry.get("scores") or []) != len(matrix):
            raise ConfigError(f"{where}: eval_only task {name!r} needs one score per row ({len(matrix)})")
    safety = scores.get("safety")
    if safety is not None and (not isinstance(safety, dict) or len(safety.get("score") or []) != len(matrix)):
        raise ConfigError(f"{where}: field 'safety' needs a 'score' list with one value per row ({len(matrix)})")


def probe_deltas(scores: dict[str, Any]) -> dict[str, list[float]]:
    """TRACE's deltas at every row: each evaluation-only probe's score minus its base-row score (and the safety score's)."""
    def minus(values: list[Any]) -> list[Any]:  # unscored rows (None: loss-only or skipped rows) stay None
        base = values[0]
        return [None if v is None or base is None else v - base for v in values]

    deltas = {name: minus(entry["scores"]) for name, entry in (scores.get("eval_only") or {}).items()}
    if scores.get("safety"):
        deltas["safety_score"] = minus(scores["safety"]["score"])
    return deltas


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """Named metrics of one run: the summary over the finished tasks, the probe deltas and the final safety score."""
    scores = run["scores"]
    done = len(scores["matrix"]) - 1
    summary: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS, None)
    summary["loss_bwt_gem"] = None
    if done >= 1:
        summary.update(summarize([row[:done] for row in scores["matrix"][: done + 1]]))
        losses = scores.get("loss_matrix")
        if isinstance(losses, list) and len(losses) == done + 1 and all(isinstance(v, (int, float)) for row in losses for v in row[:done]):
            summary["loss_bwt_gem"] = summarize([row[:done] for row in losses])["bwt_gem"]
    safety_task = (scores.get("safety") or {}).get("task")
    deltas = probe_deltas(scores)
    general = [d[-1] for name, d in deltas.items() if name not in (safety_task, "safety_score")]
    summary["general_delta"] = sum(general) / len(general) if general else None
    summary["safety_delta"] = deltas["safety_score"][-1] if "safety_score" in deltas else None
    summary["safety"] = scores["safety"]["score"][-1] if scores.get("safety") else None
    summary["tasks_done"] = done
    summary["complete"] = done == len(scores["tasks"])
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def comparison_table(runs: list[dict[str, Any]]) -> str:
    """The markdown table of :data:`TABLE_KEYS`, one row per run."""
    lines = ["| run | tasks | " + " | ".join(TABLE_KEYS) + " |", "|---|---|" + "---|" * len(TABLE_KEYS)]
    for run in runs:
        s = run_summary(run)
        done = f"{s['tasks_done']}/{len(run['scores']['tasks'])}"
        lines.append(f"| {run['label']} | {done} | " + " | ".join(_cell(s[k]) for k in TABLE_KEYS) + " |")
    return "\n".join(lines)


def _file_stem(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def _unique_labels(runs: list[dict[str, Any]]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        base = run["label"]
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            run["label"] = f"{base} ({seen[base]})"


def write_curves(path: str | os.PathLike, runs: list[dict[str, Any]]) -> None:
    """One panel per task (trained tasks, then probes and the safety score): its score at every row, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[tuple[str, list[str], list[float]]]] = {}
    for run in runs:
        scores = run["scores"]
        rows = list(scores["rows"])
        for j, task in enumerate(scores["tasks"]):
            panels.setdefault(task, []).append((run["label"], rows, [row[j] for row in scores["matrix"]]))
        for name, entry in (scores.get("eval_only") or {}).items():
            panels.setdefault(f"{name} (probe)", []).append((run["label"], rows, list(entry["scores"])))
        if scores.get("safety"):
            panels.setdefault("safety score", []).append((run["label"], rows, list(scores["safety"]["score"])))
    columns = min(3, len(panels))
    lines_rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(lines_rows, columns, figsize=(4.2 * columns, 3.0 * lines_rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for label, rows, values in series:
            ax.plot(range(len(values)), values, marker="o", label=label)
        longest = max(series, key=lambda s: len(s[1]))[1]
        ax.set_xticks(range(len(longest)), longest, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-105 if title == "safety score" else -5, 105)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle("score after each task (x: the row, i.e. the task just trained)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(labels) / 4), 1, 0.96))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def heatmap_names(runs: list[dict[str, Any]]) -> list[str]:
    """One file name per run, all different: labels that map to the same name (``a/b``, ``a?b``) get ``_2``, ``_3``..."""
    names: list[str] = []
    for run in runs:
        stem = base = _file_stem(run["label"])
        n = 1
        while f"heatmap_{stem}.png" in names:
            n += 1
            stem = f"{base}_{n}"
        names.append(f"heatmap_{stem}.png")
    return names


def write_report(runs: list[dict[str, Any]], out: str | os.PathLike) -> str:
    """Write table.md, report.json, curves.png and one heatmap per run to ``out``; returns the table."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _write_report(runs, out)
    except OSError as err:
        raise ConfigError(f"--out {str(out)!r}: cannot write the report ({err.strerror or err})") from None


def _write_report(runs: list[dict[str, Any]], out: Path) -> str:
    _unique_labels(runs)
    table = comparison_table(runs)
    atomic_write_text(out / "table.md", table + "\n")
    report = {
        "runs": [
            {"label": r["label"], "file": r["file"], "heatmap": name, "tasks": r["scores"]["tasks"], "summary": run_summary(r),
             "deltas": probe_deltas(r["scores"])}
            for r, name in zip(runs, heatmap_names(runs))
        ]
    }
    atomic_write_json(out / "report.json", report)
    for run, name in zip(runs, heatmap_names(runs)):
        write_heatmap(out / name, run["scores"])
    write_curves(out / "curves.png", runs)
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-cit report", description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories or scores.json files")
    parser.add_argument("--out", required=True, help="directory for table.md, report.json, heatmap_<run>.png and curves.png")
    parser.add_argument("--labels", nargs="+", default=None, help="a name per run (default: the run directory's name)")
    args = parser.parse_args(argv)
    try:
        if args.labels is not None and len(args.labels) != len(args.runs):
            raise ConfigError(f"--labels gives {len(args.labels)} names for {len(args.runs)} runs")
        labels = args.labels or [None] * len(args.runs)
        runs = [load_run(run, label) for run, label in zip(args.runs, labels)]
        table = write_report(runs, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwritten to {args.out}: table.md, report.json, curves.png, " + ", ".join(heatmap_names(runs)))
    return 0
