"""The timing callback of ``benchmarks/scale.py`` (a module of its own: the fit children import it by class path)."""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class Timing(Callback):
    """Wall clock of every training step, of the first one since the process started (``start``), of ``fit``, and the median gap between steps."""

    def __init__(self, out: str, start: float) -> None:
        self.out, self.start, self.steps, self.first, self._t, self._fit0 = out, start, [], None, 0.0, 0.0
        self.gaps, self._end = [], None  # from one step's end to the next one's start (data loading, probes, task ends)

    def on_fit_start(self, trainer, pl_module):
        self._fit0 = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.time()
        if self._end is not None:
            self.gaps.append(self._t - self._end)
        if self.first is None:
            self.first = self._t - self.start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._end = time.time()
        self.steps.append(self._end - self._t)

    def on_fit_end(self, trainer, pl_module):
        Path(self.out).write_text(json.dumps({
            "first_step_s": self.first, "step_ms": 1000 * statistics.median(self.steps), "fit_s": time.time() - self._fit0,
            "train_s": sum(self.steps), "fit_end": time.time(), "gap_ms": 1000 * statistics.median(self.gaps) if self.gaps else 0.0, "steps_run": len(self.steps), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }))
