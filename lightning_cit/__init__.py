"""lightning-cit: continual instruction tuning on PyTorch Lightning."""

from lightning_cit.module import ContinualLM, TinyLlama
from lightning_cit.tasks import TaskSpec

__version__ = "0.1.0"
__all__ = ["ContinualLM", "TaskSpec", "TinyLlama", "__version__"]
