"""What a run cost and how much it replayed, measured rather than configured: ``cost.json`` per run.

Comparing methods is only fair at equal budgets and reported costs (issue 19). A configured budget
is not the budget a method spends: MSSR's ratio decays, ProxyMix and Proportional re-decide, JFA's
flashback prompts ride in the batch without answers, OPR rebuilds its buffers. :class:`CostMeter`
counts what actually happened:

- **Replay share**, from the sampler's own records: every training batch carries ``is_replay`` (set by
  the :class:`~lightning_cit.sampler.MixtureSampler` for each drawn sample, flashback prompts
  included) and ``task_ids``. ``replay_share`` is replayed samples ÷ all samples over the tasks where
  replay is possible (every task but the first); ``replay_share_per_task`` gives each task's. Batches
  without ``is_replay`` (a DataModule of your own) make both ``null``, with ``replay_share_unknown`` saying
  why: a share counted as if nothing were replayed would be silently wrong.
- **Training work**: optimizer steps, samples, tokens (non-padding positions) and supervised tokens.
- **Extra passes**: a forward hook on the module's model counts every forward and the positions it
  computes, with or without gradient, under the label of the :meth:`~lightning_cit.contract.ContinualRegistry.cost_scope`
  that ran it (``evaluation``, ``probe``, ``rollout``, ``reference``, ``rescore``…; the training step's own
  forwards are ``train``, anything else outside a batch is ``other``). A generation step with the KV
  cache computes one position per row, so generated tokens count once each.
- **FLOPs (estimate)**: ``2 N`` per forward position and ``4 N`` more per position that was
  back-propagated (forwards run with gradient enabled, plus passes a callback reports with
  :meth:`~lightning_cit.contract.ContinualRegistry.record_cost`, e.g. JFA's second backward for its gradient
  projection), ``N`` the model's parameters without the embeddings and the LoRA adapters
  (performance.md's ``6 N`` per trained token). Attention's quadratic term is left out.
- **CPU seconds**: the process CPU time of the fit, and per cost scope; ``train`` is the rest
  (forward, backward, optimizer, data loading, checkpoint writes).

Counts are per rank and summed over ranks (one all-reduce at every task end and at the end of
training; every rank takes part). ``cost.json`` is written atomically next to ``scores.json``
(``trainer.log_dir``) at the end of every ``fit``; the same totals are logged as ``cost/*``.
The state is checkpointed: a resumed run continues the counts of the interrupted one (under DDP a
resume from a mid-task checkpoint restores every rank's not-yet-reduced counts from rank 0's).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from lightning_cit.contract import ContinualCallback, Needs, current_cost_scope, gather_objects
from lightning_cit.results import atomic_write_json

TRAIN, OTHER = "train", "other"


def model_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(all parameters, N)``: N leaves out embedding tables and LoRA adapter weights (an adapter's compute is
    r·(in+out) per token, small next to its layer's; inactive adapter slots compute nothing). Tied weights count once."""
    seen: set[int] = set()
    total = excluded = 0
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            n = param.numel() * (2 if getattr(param, "quant_storage", None) is not None else 1)  # 4-bit: two per byte
            total += n
            if isinstance(module, torch.nn.Embedding) or "lora_" in name:
                excluded += n
    return total, total - excluded


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack every forward goes through (training, ``generate``, PEFT-wrapped or not).

    A hook on the outer model would miss ``generate`` under PEFT (it calls the inner model's ``forward``
    directly); every causal LM calls its backbone (``base_model_prefix``, e.g. ``LlamaModel``) as a module.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "base_model", inner) if hasattr(inner, "base_model_prefix") else inner


class CostMeter(ContinualCallback):
    """Count replay share, tokens, extra forward/backward passes, FLOPs and CPU seconds; write ``cost.json``.

    Args:
        filename: the file written into ``trainer.log_dir`` (null: write nothing, log ``cost/*`` only).
    """

    needs = Needs(batch=("input_ids",))

    def __init__(self, filename: str | None = "cost.json") -> None:
        self.filename = filename
        self.local = self._empty()  # this rank's counts since the last reduction
        self.totals = self._empty()  # summed over ranks up to the last reduction
        self._in_batch = False
        self._handle: Any = None
        self._fit_cpu_start: float | None = None
        self._scoped_in_fit = 0.0
        self.parameters_total = 0
        self.parameters_non_embedding = 0

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {
            "optimizer_steps": 0,
            "samples": defaultdict(float),  # task -> samples trained
            "replay_samples": defaultdict(float),  # task -> of which replayed
            "unlabelled_samples": 0.0,  # samples of batches without is_replay (a DataModule that does not say)
            "tokens": 0.0,
            "supervised_tokens": 0.0,
            "forwards": defaultdict(float),  # scope -> forward calls
            "forward_positions": defaultdict(float),  # scope -> positions computed
            "backward_positions": defaultdict(float),  # scope -> positions computed with gradient
            "cpu_s": defaultdict(float),  # scope -> CPU seconds (train: the rest of the fit)
        }

    # ------------------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            pl_module.continual.register_service("cost", self)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.parameters_total, self.parameters_non_embedding = model_parameters(pl_module.model)
        if self._handle is None:
            self._handle = backbone(pl_module.model).register_forward_hook(self._count_forward, with_kwargs=True)
        self._fit_cpu_start = time.process_time()
        self._scoped_in_fit = 0.0

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------------------ counting
    def add_cpu(self, label: str, seconds: float) -> None:
        """CPU seconds of one :meth:`~lightning_cit.contract.ContinualRegistry.cost_scope` block."""
        self.local["cpu_s"][label] += seconds
        self._scoped_in_fit += seconds

    def add_passes(self, label: str, forward_positions: int, backward_positions: int) -> None:
        """Positions of passes no forward hook sees (:meth:`~lightning_cit.contract.ContinualRegistry.record_cost`)."""
        self.local["forward_positions"][label] += forward_positions
        self.local["backward_positions"][label] += backward_positions

    def _count_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            positions = ids.shape[0] * ids.shape[1] if ids is not None else 0
        else:
            positions = ids.numel()
        scope = current_cost_scope() or (TRAIN if self._in_batch else OTHER)
        self.local["forwards"][scope] += 1
        self.local["forward_positions"][scope] += positions
        if torch.is_grad_enabled():
            self.local["backward_positions"][scope] += positions

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        task = pl_module.task_clock.task_of(trainer)
        size = len(batch["input_ids"])
        self.local["samples"][task] += size
        replay = batch.get("is_replay")
        if replay is None:
            self.local["unlabelled_samples"] += size
        else:
            self.local["replay_samples"][task] += float(replay.sum())
        mask = batch.get("attention_mask")
        self.local["tokens"] += float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
        labels = batch.get("labels")
        if labels is not None:
            self.local["supervised_tokens"] += float((labels != -100).sum())
        self._in_batch = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._in_batch = False
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.local["optimizer_steps"] += 1

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self._reduce(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._fit_cpu_start is not None:  # the fit's CPU time not spent in a cost scope is training's
            spent = time.process_time() - self._fit_cpu_start
            self.local["cpu_s"][TRAIN] += max(0.0, spent - self._scoped_in_fit)
            self._fit_cpu_start = None
        self._reduce(trainer)
        report = self.report()
        out = trainer.log_dir or trainer.default_root_dir  # broadcasts under DDP: every rank calls it
        if self.filename:
            self._write(os.path.join(out, self.filename), report)
        if trainer.logger is not None:
            metrics = {"cost/flops": report["flops"]["total"], "cost/cpu_s": report["cpu_s"]["total"]}
            if report["replay_share"] is not None:
                metrics["cost/replay_share"] = report["replay_share"]
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    @rank_zero_only
    def _write(self, path: str, report: dict[str, Any]) -> None:
        atomic_write_json(path, report)

    # ------------------------------------------------------------------------------ reduction
    def _reduce(self, trainer: pl.Trainer) -> None:
        """Add every rank's counts since the last reduction to ``totals`` (a collective: all ranks call it)."""
        keys = self._keys(self.local)
        vector = torch.tensor([self._get(self.local, key) for key in keys], dtype=torch.float64)
        if trainer.world_size > 1:  # ranks may have seen different keys (scopes, tasks): agree on their union first
            gathered = gather_objects(keys)
            keys = sorted({k for rank_keys in gathered for k in rank_keys})
            vector = torch.tensor([self._get(self.local, key) for key in keys], dtype=torch.float64)
            vector = trainer.strategy.reduce(vector, reduce_op="sum")
        for key, value in zip(keys, vector.tolist()):
            self._add(self.totals, key, value)
        self.local = self._empty()

    @staticmethod
    def _keys(counts: dict[str, Any]) -> list[tuple[str, Any]]:
        keys: list[tuple[str, Any]] = []
        for name, value in counts.items():
            if isinstance(value, dict):
                keys.extend((name, sub) for sub in value)
            else:
                keys.append((name, None))
        return sorted(keys, key=lambda k: (k[0], str(k[1])))

    @staticmethod
    def _get(counts: dict[str, Any], key: tuple[str, Any]) -> float:
        name, sub = key
        return float(counts[name].get(sub, 0.0) if sub is not None else counts[name])

    @staticmethod
    def _add(counts: dict[str, Any], key: tuple[str, Any], value: float) -> None:
        name, sub = key
        if sub is None:
            counts[name] += value
        else:
            counts[name][sub] += value

    # ------------------------------------------------------------------------------ the record
    def report(self) -> dict[str, Any]:
        """The reduced totals as written to ``cost.json``."""
        t = self.totals
        tasks = sorted(int(k) for k in t["samples"])
        replayable = [k for k in tasks if k > 0]
        samples_after_first = sum(t["samples"][k] for k in replayable)
        replay_after_first = sum(t["replay_samples"][k] for k in replayable)
        n = self.parameters_non_embedding
        forward = sum(t["forward_positions"].values())
        backward = sum(t["backward_positions"].values())
        per_scope_flops = {s: 2 * n * t["forward_positions"][s] + 4 * n * t["backward_positions"].get(s, 0.0) for s in t["forward_positions"]}
        cpu = dict(t["cpu_s"])
        unlabelled = int(t["unlabelled_samples"])
        known = not unlabelled  # a share counted over batches that did not say what they replayed would be wrong
        return {
            "replay_share": (replay_after_first / samples_after_first if samples_after_first else 0.0) if known else None,
            "replay_share_per_task": {str(k): (t["replay_samples"][k] / t["samples"][k] if t["samples"][k] else 0.0) if known else None
                                      for k in tasks},
            **({} if known else {"replay_share_unknown": f"{unlabelled} trained samples came in batches without 'is_replay' "
                                                         "(lightning_cit's DataModule adds it; a DataModule of your own must, for a share)"}),
            "optimizer_steps": int(t["optimizer_steps"]),
            "samples": int(sum(t["samples"].values())),
            "replay_samples": int(sum(t["replay_samples"].values())),
            "tokens": int(t["tokens"]),
            "supervised_tokens": int(t["supervised_tokens"]),
            "forwards": {k: int(v) for k, v in sorted(t["forwards"].items())},
            "forward_positions": {k: int(v) for k, v in sorted(t["forward_positions"].items())},
            "backward_positions": {k: int(v) for k, v in sorted(t["backward_positions"].items())},
            "parameters": {"total": self.parameters_total, "non_embedding": n},
            "flops": {"total": 2 * n * forward + 4 * n * backward, "by_scope": per_scope_flops,
                      "convention": "2N per forward position + 4N per back-propagated position, N = non-embedding parameters"},
            "cpu_s": {"total": sum(cpu.values()), **{k: v for k, v in sorted(cpu.items())}},
        }

    def state_dict(self) -> dict[str, Any]:
        plain = lambda counts: {k: (dict(v) if isinstance(v, dict) else v) for k, v in counts.items()}
        return {**super().state_dict(), "local": plain(self.local), "totals": plain(self.totals)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for name in ("local", "totals"):
            counts = self._empty()
            for key, value in state_dict.get(name, {}).items():
                if isinstance(counts.get(key), dict):
                    counts[key].update({(int(k) if key in ("samples", "replay_samples") else k): v for k, v in value.items()})
                else:
                    counts[key] = value
            setattr(self, name, counts)
