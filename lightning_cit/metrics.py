"""Task metrics (per-sample text scores) and continual-learning summaries over one score matrix.

Continual-learning metrics carry their convention in their name (``bwt_gem`` vs ``bwt_trace``...),
because the five papers this library implements disagree on denominators and reference rows; see
``docs/metrics.md`` and ``../shared/reference/methods.md`` §1. All of them are pure functions of
the ``(T+1) x T`` matrix ``R`` whose row 0 is the model before training and row ``i`` the model
after task ``i`` (1-based in the formulas, 0-based in the code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torchmetrics.functional.text import edit_distance, rouge_score

from lightning_cit.errors import ConfigError

# ------------------------------------------------------------------------------------------------
# per-sample task metrics, each returning a score in 0..100


def exact_match(prediction: str, reference: str) -> float:
    """100 when the stripped prediction equals the stripped reference (TRACE's accuracy), else 0."""
    return 100.0 * (prediction.strip() == reference.strip())


def edit_similarity(prediction: str, reference: str) -> float:
    """``100 * (1 - levenshtein / max(len))``: graded, 100 for identical strings, 0 for disjoint ones.

    The Levenshtein distance comes from torchmetrics. This is a normalised edit distance, not
    fuzzywuzzy's ``fuzz.ratio`` that TRACE uses for Py150 (which counts matching blocks).
    """
    prediction, reference = prediction.strip(), reference.strip()
    longest = max(len(prediction), len(reference))
    if longest == 0:
        return 100.0
    if not prediction or not reference:
        return 0.0
    return 100.0 * (1.0 - float(edit_distance([prediction], [reference])) / longest)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure from torchmetrics, in 0..100."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    return 100.0 * float(rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_fmeasure"])


# multiple-choice accuracy is scored from option log-likelihoods, not from generated text
MC_ACCURACY = "mc_accuracy"
TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "edit_similarity": edit_similarity,
    "rouge_l": rouge_l,
}
METRICS = (*TEXT_METRICS, MC_ACCURACY)


def check_metric(name: str, where: str) -> None:
    if name not in METRICS:
        raise ConfigError(f"{where}: unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")


# ------------------------------------------------------------------------------------------------
# continual-learning summaries over the score matrix


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(matrix: Sequence[Sequence[float | None]]) -> dict[str, float]:
    """Every named summary metric of a ``(T+1) x T`` matrix (row 0 = before training).

    - ``acc``: mean of the final row (GEM ACC, TRACE OP, ProxyMix AA).
    - ``nta``: mean of the diagonal, each task right after it was learned (ProxyMix NTA).
    - ``bwt_gem``: mean over i<T of ``R[T][i] - R[i][i]``, divided by T-1 (GEM, ProxyMix BWT).
    - ``bwt_trace``: the same sum divided by T (TRACE, OPR, CoIN): ``(T-1)/T * bwt_gem``.
    - ``fwt``: mean over i=2..T of ``R[i-1][i] - R[0][i]`` (GEM, zero-shot transfer vs the base row).
    - ``forgetting_chaudhry``: mean over j<T of ``max_{l in 1..T-1} R[l][j] - R[T][j]`` (RWalk).
    - ``fgt_proxymix``: mean over i<T of ``max(0, max_{r in i..T-1} R[r][i] - R[T][i])`` (ProxyMix).
    - ``forgetting_mssr``: mean over i<T of ``max_{t>i} R[i][i] - R[t][i]`` (MSSR Eq.1: the largest
      drop from the just-learned score at any later row, not only the final one).
    With a single task the backward metrics are undefined and reported as NaN.

    Unscored cells are ``None`` (an evaluator that scores only what the metrics need, or every n
    tasks): each metric is then the mean of the terms whose cells were all scored, and a max runs over
    the scored cells only (:func:`summary_coverage` counts the terms). A complete matrix gives exactly the
    numbers it always gave.
    """
    R = [[None if v is None else float(v) for v in row] for row in matrix]
    T = len(R[0])
    if len(R) != T + 1 or any(len(row) != T for row in R):
        raise ConfigError(f"summarize needs a complete (T+1) x T matrix, got {len(R)} rows for {T} tasks")
    T_terms = _summary_terms(R)
    out = {name: _mean(terms) for name, terms in T_terms.items()}
    backward = T_terms["bwt_trace"]
    if T <= 1:
        out["bwt_trace"] = float("nan")
    elif len(backward) == T - 1:
        out["bwt_trace"] = sum(backward) / T
    else:  # the same (T-1)/T scaling of the mean over the terms that were scored
        out["bwt_trace"] = _mean(backward) * (T - 1) / T
    return out


def _summary_terms(R: list[list[float | None]]) -> dict[str, list[float]]:
    T = len(R[0])
    final = R[T]
    diag = [R[i][i - 1] for i in range(1, T + 1)]  # diag[j] = score of task j right after learning it

    def scored(values: Any) -> list[float]:
        return [v for v in values if v is not None]

    def max_scored(values: Any) -> float | None:
        present = scored(values)
        return max(present) if present else None

    backward = [final[j] - diag[j] for j in range(T - 1) if final[j] is not None and diag[j] is not None]
    chaudhry = [(m, final[j]) for j in range(T - 1) for m in [max_scored(R[l][j] for l in range(1, T))]]
    proxymix = [(m, final[j]) for j in range(T - 1) for m in [max_scored(R[r][j] for r in range(j + 1, T))]]
    mssr = [(diag[j], m) for j in range(T - 1) for m in [_min_scored(R[t][j] for t in range(j + 2, T + 1))]]
    return {
        "acc": scored(final),
        "nta": scored(diag),
        "bwt_gem": backward,
        "bwt_trace": backward,  # summed / T, not averaged: see summarize
        "fwt": [R[j][j] - R[0][j] for j in range(1, T) if R[j][j] is not None and R[0][j] is not None],
        "forgetting_chaudhry": [m - f for m, f in chaudhry if m is not None and f is not None],
        "fgt_proxymix": [max(0.0, m - f) for m, f in proxymix if m is not None and f is not None],
        "forgetting_mssr": [d - m for d, m in mssr if d is not None and m is not None],
    }


def _min_scored(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def summary_coverage(matrix: Sequence[Sequence[float | None]]) -> dict[str, list[int]]:
    """``{metric: [terms computed, terms of a complete matrix]}``: what a partly scored matrix's summary rests on."""
    R = [[None if v is None else float(v) for v in row] for row in matrix]
    complete = [[0.0] * len(R[0]) for _ in R]
    have, full = _summary_terms(R), _summary_terms(complete)
    return {name: [len(have[name]), len(full[name])] for name in full}


SUMMARY_KEYS = ("acc", "nta", "bwt_gem", "bwt_trace", "fwt", "forgetting_chaudhry", "fgt_proxymix", "forgetting_mssr")
