"""Lightning callbacks of lightning-cit: mixture controllers and the forgetting evaluator."""

from lightning_cit.callbacks.adapter_checkpoint import AdapterOnlyCheckpoint
from lightning_cit.callbacks.checkpoint import TaskCheckpoint
from lightning_cit.callbacks.cost import CostMeter
from lightning_cit.callbacks.evaluation.evaluator import ForgettingEvaluator
from lightning_cit.callbacks.guards import FiniteLossGuard, SignalCheckpoint
from lightning_cit.callbacks.jfa import JointFlashbackAdaptation
from lightning_cit.callbacks.lcia.ema import AdapterEMA, DynamicEMA
from lightning_cit.callbacks.lcia.grouping import InstructionGrouping
from lightning_cit.callbacks.mixture import (
    FixedRatio,
    MixtureController,
    MixtureSignals,
    NoReplay,
    Proportional,
    SizeProportional,
)
from lightning_cit.callbacks.mssr import MSSRReplay
from lightning_cit.callbacks.opr import OnPolicyReplay
from lightning_cit.callbacks.proxymix import LossSlope, ProxyMixController

CONTROLLERS = ("NoReplay", "FixedRatio", "Proportional", "MSSRReplay", "SizeProportional", "LossSlope", "ProxyMixController")

__all__ = ["CONTROLLERS", "AdapterEMA", "AdapterOnlyCheckpoint", "CostMeter", "DynamicEMA", "FiniteLossGuard", "FixedRatio", "ForgettingEvaluator", "InstructionGrouping", "JointFlashbackAdaptation", "LossSlope", "MSSRReplay", "MixtureController", "MixtureSignals", "NoReplay", "OnPolicyReplay", "Proportional", "ProxyMixController", "SignalCheckpoint", "SizeProportional", "TaskCheckpoint"]
