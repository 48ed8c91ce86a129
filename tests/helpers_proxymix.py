"""Test helpers for ProxyMix: per-rank dumps of a controller's state (importable through class_path)."""

import json
import os

from lightning.pytorch.callbacks import Callback


class DumpController(Callback):
    """At the end of training, writes the first mixture controller's decisions, loss statistics and rollout, per rank."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        controller = next(c for c in trainer.callbacks if hasattr(c, "decide"))
        state = {"decisions": controller.decisions}
        if hasattr(controller, "losses"):
            state["losses"] = {k: {str(t): v for t, v in d.items()} for k, d in controller.losses.state_dict().items()}
        if hasattr(controller, "rollout"):
            state["rollout"] = controller.rollout
        schedule = {str(k): {str(b): w for b, w in v.items()} for k, v in trainer.datamodule.schedule.items()}
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({**state, "schedule": schedule}, handle)
