"""An ordinary Lightning project that knows lightning-cit only through its contract.

The user's own ``LightningModule`` (a Hugging Face ``LlamaForCausalLM``, optionally with a peft LoRA
adapter), the user's own per-task ``LightningDataModule`` and collate function, and a loop that calls
``Trainer.fit`` once per task, the most common way people train a sequence. Every lightning-cit callback
plugs in with the lines marked ``# lightning-cit``:

- the module inherits :class:`lightning_cit.contract.ContinualModule` (it needs ``self.model`` and
  ``self.tokenizer``) and returns ``self.continual_loss(batch, logits)`` from ``training_step``;
- ``ForgettingEvaluator(tasks=...)`` gets the sequence's tasks (``task_from_records`` turns records into them);
- replay methods (controllers, MSSR, OPR, JFA) need a DataModule with a replay memory and a mixture plan:
  hand the same records to ``ContinualInstructionDataModule(datasets=..., collate_fn=...)``.

``python examples/plain_lightning/project.py`` trains three tasks one fit each with EMA and the evaluator,
prints the score matrix, then does the same with one fit (epoch = task). It runs offline in about a minute
on a laptop CPU (a tiny model from a config; the character tokenizer stands in for ``AutoTokenizer``).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_cit.contract import ContinualModule, TaskClock  # lightning-cit
from lightning_cit.synth import build_char_tokenizer, generate
from lightning_cit.tasks import TaskData, task_from_records  # lightning-cit

IGNORE = -100


# ============================================================================== the user's module
class MyCausalLM(ContinualModule, pl.LightningModule):  # lightning-cit: ContinualModule first in the bases
    """A plain LightningModule around a Hugging Face causal LM (full fine-tuning, or LoRA with ``lora_rank``)."""

    def __init__(self, hidden: int = 64, layers: int = 1, lr: float = 3e-3, lora_rank: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.tokenizer = build_char_tokenizer()  # a real project: AutoTokenizer.from_pretrained(...)
        config = LlamaConfig(vocab_size=len(self.tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
                             pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.bos_token_id,
                             eos_token_id=self.tokenizer.eos_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        if lora_rank:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=lora_rank, lora_alpha=2 * lora_rank,
                                                     target_modules=["q_proj", "v_proj", "o_proj"]))
        self.model = model
        self.lr = lr
        self.eval_batch_size = 32

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        outputs = self.continual_loss(batch, logits)  # lightning-cit: loss + per-sample losses for the callbacks
        self.log("train/loss", outputs["loss"], prog_bar=True, batch_size=batch["input_ids"].size(0))
        return outputs

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


# ============================================================================== the user's data
def my_collate(tokenizer: Any) -> Any:
    """The project's own collate: prompt + response tokens, loss on the response only."""

    def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for s in samples:
            messages = s.get("messages") or [{"role": "user", "content": s["prompt"]}]  # raw records or lightning-cit's samples
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r = tokenizer(s["response"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            rows.append((p, r))
        length = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), length), tokenizer.pad_token_id)
        labels = torch.full((len(rows), length), IGNORE)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            mask[i, : len(p) + len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


class OneTaskData(pl.LightningDataModule):
    """The project's DataModule: one task's training records, shuffled, nothing lightning-cit specific."""

    def __init__(self, records: list[dict], tokenizer: Any, batch_size: int = 16, steps: int = 10, seed: int = 0) -> None:
        super().__init__()
        self.records, self.collate, self.batch_size, self.steps, self.seed = records, my_collate(tokenizer), batch_size, steps, seed

    def train_dataloader(self) -> DataLoader:
        rng = random.Random(self.seed)
        picks = [rng.choice(self.records) for _ in range(self.batch_size * self.steps)]
        return DataLoader(picks, batch_size=self.batch_size, collate_fn=self.collate)


class SequenceData(pl.LightningDataModule):
    """The project's DataModule for one fit over the whole sequence: epoch ``e`` serves task ``e // epochs_per_task``."""

    def __init__(self, tasks: list[list[dict]], tokenizer: Any, batch_size: int = 16, steps: int = 10, epochs_per_task: int = 1) -> None:
        super().__init__()
        self.tasks = [OneTaskData(records, tokenizer, batch_size, steps, seed=k) for k, records in enumerate(tasks)]
        self.epochs_per_task = epochs_per_task

    def train_dataloader(self) -> DataLoader:
        return self.tasks[self.trainer.current_epoch // self.epochs_per_task].train_dataloader()


def my_records(names: Sequence[str] = ("cipher_a", "cipher_b", "shift"), n_train: int = 200, n_eval: int = 16) -> dict[str, dict[str, list[dict]]]:
    """The project's records per task (here drawn from the built-in generators; any prompt/response dicts work)."""
    return {name: {"train": generate(name, n_train, seed=0, split="train"), "eval": generate(name, n_eval, seed=0, split="eval")} for name in names}


def as_tasks(records: dict[str, dict[str, list[dict]]], metric: str = "edit_similarity", max_new_tokens: int = 8) -> list[TaskData]:
    """lightning-cit's view of the same records: what the evaluator scores and what replay draws from."""
    return [task_from_records(name, r["train"], r["eval"], metric=metric, max_new_tokens=max_new_tokens) for name, r in records.items()]


# ============================================================================== the two ways to train
def fit_per_task(module: MyCausalLM, records: dict, callbacks: list, steps: int = 10, datamodule: Any = None, **trainer_kwargs: Any) -> list[pl.Trainer]:
    """One ``Trainer.fit`` per task, the same callback objects every time (``TaskClock("fit")``, the default)."""
    trainers = []
    for k, (name, split) in enumerate(records.items()):
        module.task_clock.begin_task(k)  # lightning-cit (optional: without it each fit trains the next task)
        trainer = pl.Trainer(max_epochs=1, callbacks=callbacks, **_quiet(trainer_kwargs))
        data = datamodule if datamodule is not None else OneTaskData(split["train"], module.tokenizer, steps=steps, seed=k)
        trainer.fit(module, datamodule=data)
        trainers.append(trainer)
    return trainers


def fit_epoch_per_task(module: MyCausalLM, records: dict, callbacks: list, steps: int = 10, datamodule: Any = None, **trainer_kwargs: Any) -> pl.Trainer:
    """One ``Trainer.fit`` over the sequence, epoch = task."""
    module.task_clock = TaskClock("epoch")  # lightning-cit
    data = datamodule if datamodule is not None else SequenceData([r["train"] for r in records.values()], module.tokenizer, steps=steps)
    trainer = pl.Trainer(max_epochs=len(records), reload_dataloaders_every_n_epochs=1, callbacks=callbacks, **_quiet(trainer_kwargs))
    trainer.fit(module, datamodule=data)
    return trainer


def _quiet(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, **kwargs}


def main(argv: list[str]) -> int:
    from lightning_cit.callbacks import AdapterEMA, ForgettingEvaluator

    pl.seed_everything(0)
    records = my_records()
    tasks = as_tasks(records)
    out = argv[0] if argv else "runs/plain_lightning"
    for style, fit in (("fit per task", fit_per_task), ("epoch = task", fit_epoch_per_task)):
        print(f"\n=== {style} ===")
        module = MyCausalLM()
        callbacks = [AdapterEMA(decay=0.9), ForgettingEvaluator(tasks=tasks, probe_every_n_steps=None, output_dir=f"{out}/{style.split()[0]}")]
        fit(module, records, callbacks, steps=60, default_root_dir=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
