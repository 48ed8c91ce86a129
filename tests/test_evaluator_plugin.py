"""ForgettingEvaluator in a plain Lightning project: its own module and dataloaders, no lightning-cit DataModule."""

import json
from collections import OrderedDict

import lightning.pytorch as pl
import torch
from lightning_cit.callbacks import ForgettingEvaluator
from torch.utils.data import DataLoader

from lightning_cit.contract import ContinualModule, TaskClock
from lightning_cit.tasks import TaskSpec, load_task


class LRUMemorizer(ContinualModule, pl.LightningModule):
    """Answers a prompt with the response it last saw for it; remembers at most ``capacity`` prompts."""

    def __init__(self, tasks, capacity):
        super().__init__()
        self.tasks, self.capacity = tasks, capacity
        self.memory: OrderedDict[str, str] = OrderedDict()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.task_clock = TaskClock("epoch")  # one fit, epoch = task

    def train_dataloader(self):
        return DataLoader(self.tasks[self.trainer.current_epoch].train, batch_size=16, collate_fn=list)

    def training_step(self, batch, batch_idx):
        for sample in batch:
            self.memory[sample["messages"][-1]["content"]] = sample["response"]
            self.memory.move_to_end(sample["messages"][-1]["content"])
            while len(self.memory) > self.capacity:
                self.memory.popitem(last=False)
        return (self.dummy**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def evaluate_samples(self, samples, metric, max_new_tokens):
        predictions = [self.memory.get(s["messages"][-1]["content"], "") for s in samples]
        scores = [100.0 * (p == s["response"]) for p, s in zip(predictions, samples)]
        return {"scores": scores, "losses": [0.0 if s else 1.0 for s in scores], "predictions": predictions}

    def sample_losses(self, samples, max_length=None):
        return self.evaluate_samples(samples, "exact_match", 0)["losses"]


def test_evaluator_in_a_plain_lightning_project(tmp_path):
    tasks = []
    for name in ("cipher_a", "cipher_b"):
        task = load_task(TaskSpec(name=name, source=f"synth:{name}", train_size=48, eval_size=16, probe_size=4))
        task.train = task.train + task.eval  # the memorizer can only answer what it has seen
        tasks.append(task)
    module = LRUMemorizer(tasks, capacity=64)
    evaluator = ForgettingEvaluator(tasks=tasks, probe_every_n_steps=2, output_dir=str(tmp_path))
    trainer = pl.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[evaluator], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(module)
    scores = json.loads((tmp_path / "scores.json").read_text())
    # task 2's 64 prompts evict all of task 1's: complete forgetting, exactly
    assert scores["matrix"] == [[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]]
    assert scores["summary"]["bwt_gem"] == -100.0 and scores["summary"]["bwt_trace"] == -50.0
    assert evaluator.latest_probe_losses(2)[1] == 0.0  # probes ran on the current task
