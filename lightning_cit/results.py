"""Writing results: atomic JSON/CSV files, the heatmap, and the printed table."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    A reader (or a crash) never sees a half-written file: either the old content or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def human_size(n: float) -> str:
    """Bytes as ``123 B`` / ``4.5 MB`` (powers of 1024), for the disk lines the library prints."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None  # JSON has no NaN; an undefined metric is null
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2) + "\n")


def scores_csv(scores: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "kind", *scores["tasks"]])
    for row_name, scores_row, losses_row in zip(scores["rows"], scores["matrix"], scores["loss_matrix"]):
        writer.writerow([row_name, "score", *[_fmt(v) for v in scores_row]])
        writer.writerow([row_name, "loss", *[_fmt(v) for v in losses_row]])
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def format_table(scores: dict[str, Any]) -> str:
    """The score matrix and the named summary as a fixed-width text table."""
    tasks = scores["tasks"]
    extra = list(scores.get("eval_only", {}))
    width = max(8, *(len(t) for t in tasks + extra))
    header = f"{'after':<{width}} | " + " ".join(f"{t:>{width}}" for t in tasks + extra)
    lines = ["score matrix (0-100; row = after training that task, column = evaluated task)", header, "-" * len(header)]
    for r, name in enumerate(scores["rows"]):
        values = list(scores["matrix"][r]) + [scores["eval_only"][e]["scores"][r] for e in extra]
        lines.append(f"{name:<{width}} | " + " ".join(f"{'-':>{width}}" if v is None else f"{v:>{width}.1f}" for v in values))
    summary = scores.get("summary") or {}
    if summary:
        lines.append("")
        lines.append("summary: " + "  ".join(f"{k}={_fmt_summary(v)}" for k, v in summary.items()))
    safety = scores.get("safety")
    if safety:
        lines.append(
            f"safety ({safety['task']}): refusal on harmful {safety['refusal_harmful'][-1]:.1f}%, "
            f"over-refusal on benign {safety['over_refusal_benign'][-1]:.1f}%, score {safety['score'][-1]:.1f}"
        )
    return "\n".join(lines)


def _fmt_summary(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def write_heatmap(path: str | os.PathLike, scores: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = scores["matrix"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(scores["tasks"]), 1.0 + 0.6 * len(scores["rows"])))
    image = ax.imshow([[math.nan if v is None else v for v in row] for row in matrix], vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(scores["tasks"])), scores["tasks"], rotation=30, ha="right")
    ax.set_yticks(range(len(scores["rows"])), [f"after {r}" if r != "base" else "base" for r in scores["rows"]])
    for r, row in enumerate(matrix):
        for c, value in enumerate(row):
            if value is None:  # not scored (ForgettingEvaluator score/every_n_tasks options): left blank
                continue
            ax.text(c, r, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black", fontsize=8)
    ax.set_title("score after each task")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_scores(out: str | os.PathLike, scores: dict[str, Any], heatmap: bool = True) -> None:
    """The evaluator's files for one run: ``scores.json``, ``scores.csv`` (and ``scores.png``), each written atomically."""
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, "scores.json"), scores)
    atomic_write_text(os.path.join(out, "scores.csv"), scores_csv(scores))
    if heatmap:
        write_heatmap(os.path.join(out, "scores.png"), scores)
