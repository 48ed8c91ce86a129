"""Task sources for ``callable:helpers_sources:<function>`` tests (called as ``fn(split=..., n=..., seed=...)``)."""

from __future__ import annotations

CALLS: list[dict] = []
"""Every call of :func:`numbered`, so tests can check the arguments the loader passed."""


def numbered(split: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct prompt/response records whose prompts name the split."""
    CALLS.append({"split": split, "n": n, "seed": seed})
    return [{"prompt": f"{split} {i}", "response": f"r{i}"} for i in range(n)]


def as_dataset(split: str, n: int, seed: int):
    """The same records as a ``datasets.Dataset`` (the other return type a callable may use)."""
    import datasets

    return datasets.Dataset.from_list(numbered(split, n, seed))


def strings(split: str, n: int, seed: int) -> list[str]:
    """Not records: the loader must say so."""
    return ["not a record"] * n


def nothing(split: str, n: int, seed: int) -> None:
    """Returns nothing: the loader must say so."""
    return
