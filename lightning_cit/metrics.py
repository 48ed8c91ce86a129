"""Task metrics (per-sample text scores) and continual-learning summaries over one score matrix.

Continual-learning metrics carry their convention in their name (``bwt_gem`` vs ``bwt_trace``...),
because the five papers this library implements disagree on denominators and reference rows; see
``docs/metrics.md`` and ``../shared/reference/methods.md`` §1. All of them are pure functions of
the ``(T+1) x T`` matrix ``R`` whose row 0 is the model before training and row ``i`` the model
after task ``i`` (1-based in the formulas, 0-based in the code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def summarize(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """Every named summary metric of a complete ``(T+1) x T`` matrix (row 0 = before training).

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
    """
    R = [list(map(float, row)) for row in matrix]
    T = len(R[0])
    if len(R) != T + 1 or any(len(row) != T for row in R):
        raise ConfigError(f"summarize needs a complete (T+1) x T matrix, got {len(R)} rows for {T} tasks")
    final = R[T]
    diag = [R[i][i - 1] for i in range(1, T + 1)]  # diag[j] = score of task j right after learning it
    backward = [final[j] - diag[j] for j in range(T - 1)]
    return {
        "acc": _mean(final),
        "nta": _mean(diag),
        "bwt_gem": _mean(backward),
        "bwt_trace": sum(backward) / T if T > 1 else float("nan"),
        "fwt": _mean([R[j][j] - R[0][j] for j in range(1, T)]),
        "forgetting_chaudhry": _mean([max(R[l][j] for l in range(1, T)) - final[j] for j in range(T - 1)]),
        "fgt_proxymix": _mean([max(0.0, max(R[r][j] for r in range(j + 1, T)) - final[j]) for j in range(T - 1)]),
        "forgetting_mssr": _mean([max(diag[j] - R[t][j] for t in range(j + 2, T + 1)) for j in range(T - 1)]),
    }


SUMMARY_KEYS = ("acc", "nta", "bwt_gem", "bwt_trace", "fwt", "forgetting_chaudhry", "fgt_proxymix", "forgetting_mssr")
