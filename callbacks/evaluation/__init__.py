"""Forgetting evaluation: the score matrix (``ForgettingEvaluator``), the probe service controllers read, the writer."""

from lightning_cit.callbacks.evaluation.evaluator import ForgettingEvaluator

__all__ = ["ForgettingEvaluator"]
