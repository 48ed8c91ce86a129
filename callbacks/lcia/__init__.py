"""LCIA (methods.md §4): EMA of the tuned weights with a dynamic, self-adaptive weight, and instruction grouping.

- :mod:`.ema`: ``AdapterEMA`` (fixed weight) and ``DynamicEMA`` (the paper's and the code's dynamic weight);
- :mod:`.grouping`: ``InstructionGrouping`` (one LoRA adapter per group of similar instructions, evaluation routing).
"""

from lightning_cit.callbacks.lcia.ema import AdapterEMA, DynamicEMA
from lightning_cit.callbacks.lcia.grouping import InstructionGrouping

__all__ = ["AdapterEMA", "DynamicEMA", "InstructionGrouping"]
