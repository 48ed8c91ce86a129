"""Lightning callbacks of lightning-cit: mixture controllers and the forgetting evaluator."""

from lightning_cit.callbacks.forgetting import ForgettingEvaluator
from lightning_cit.callbacks.mixture import FixedRatio, MixtureController, MixtureSignals, NoReplay, Proportional
from lightning_cit.callbacks.mssr import MSSRReplay

CONTROLLERS = ("NoReplay", "FixedRatio", "Proportional", "MSSRReplay")

__all__ = ["ForgettingEvaluator", "MixtureController", "MixtureSignals", "NoReplay", "FixedRatio", "Proportional", "MSSRReplay", "CONTROLLERS"]
