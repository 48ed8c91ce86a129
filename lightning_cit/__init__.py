"""lightning-cit: continual instruction tuning on PyTorch Lightning."""

from lightning_cit.contract import ContinualCallback, ContinualData, ContinualModule, LossComponent, TaskClock
from lightning_cit.module import ContinualLM, TinyLlama
from lightning_cit.tasks import TaskSpec

__version__ = "0.1.0"
__all__ = ["ContinualCallback", "ContinualData", "ContinualLM", "ContinualModule", "LossComponent", "TaskClock", "TaskSpec", "TinyLlama", "__version__"]
