"""Lightning callbacks of lightning-cit: mixture controllers and the forgetting evaluator."""

from lightning_cit.callbacks.forgetting import ForgettingEvaluator
from lightning_cit.callbacks.mixture import FixedRatio, MixtureController, MixtureSignals, NoReplay, Proportional

CONTROLLERS = ("NoReplay", "FixedRatio", "Proportional")

__all__ = ["ForgettingEvaluator", "MixtureController", "MixtureSignals", "NoReplay", "FixedRatio", "Proportional", "CONTROLLERS"]
