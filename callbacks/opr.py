"""OPR: on-policy replay (Chen et al., arXiv 2605.29495; official code ``Yancey2024/OnPolicyReplay``).

Vanilla replay re-trains on the *gold* answers of earlier tasks, which are off-policy for the current
model. OPR replays the model's *own* answers instead: when task ``k`` ends, the model answers
prompts of every task seen so far, each answer is scored, and the best ones become the replay
buffers used while the next task trains. The rule (``core/OPRTrainer.py``,
``tools/generate_opr_{ru,sc}.py``; methods.md §5a):

- **Budget.** ``budget = ⌊ρ N⌋`` samples (``budget`` a fraction ρ of the finished task's training set
  size ``N``, or a count), split equally over the ``k`` tasks seen so far, task ``k`` included:
  ``n_per = ⌊budget / k⌋`` (1-based ``k``). The buffers are rebuilt from scratch at every boundary,
  so an old task's share shrinks as the sequence grows (§5f.2).
- **Rollout.** ``ŷ ~ π_θk(·|x)`` for the candidate prompts of each seen task: batched generation with
  left padding and the KV cache, no gradient, eval mode; temperature (paper 0.1) and
  ``max_new_tokens`` per task (the code's stage-keyed ``max_tokens`` rule is a latent bug, §5f.1).
  A multiple-choice task (``mc_accuracy``) is answered the way it is scored: the option with the
  highest log-likelihood (``choose_options``), stored as the answer text.
- **Reward.** ``ru``: the task's own metric of ``ŷ`` against the reference (0..100, TRACE-style);
  ``sc``: self-confidence, the mean token log-probability ``(1/|ŷ|) Σ_t log π(ŷ_t | x, ŷ_<t)``
  (here over the answer's tokens plus the end-of-turn token, from ``sample_losses``); or
  ``"module:function"`` called as ``fn(sample=..., answer=..., task=...) -> float``.
- **Selection.** The top ``n_per`` by score per task (``keep: bottom`` keeps the lowest: the paper's
  low-score ablation), whatever the scores (§5f.8). Ties keep candidate order: a seeded permutation
  of the task's data (``tie_break: random``, the default) or the data order (``data_order``, the
  official code's behaviour, §5f.4).
- **Replay.** Each buffer holds ``{messages, response: ŷ}`` samples; how much of each batch comes
  from them is the configured mixture controller's job (the paper concatenates and shuffles, i.e.
  :class:`~lightning_cit.callbacks.SizeProportional`), so OPR composes with any controller.

``answers: gold`` is *Vanilla replay at the same budget and split*: the same ``n_per`` prompts per
seen task (the first of the same candidate order), with their reference answers, rebuilt at every
boundary. It differs from OPR in the answers only.

Deviation: ``candidates_per_task`` caps the prompts rolled out per task (the first of the seeded
candidate order); the paper rolls out all of them (§5f.3). ``null`` rolls out every prompt.

Distributed: each rank rolls out ``candidates[rank::world]``; ``(task, index, answer, score)`` tuples
and the timing are gathered with ``all_gather_object``, and every rank selects from the same sorted
list, so all ranks hold identical buffers. Sampling runs under a forked RNG seeded with
``(data seed, task, rank)``: the training stream is untouched and a rollout repeats exactly.

State: buffers live in the DataModule's checkpoint; this callback keeps ``history`` (one record per
boundary: sizes, score means, tokens/s), whose ``task`` entries also say which boundaries are done,
so a resumed run never rolls out twice.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_cit.contract import DATA_MEMORY, ContinualCallback, Needs, ShardPlan, gather_objects, sharded
from lightning_cit.errors import ConfigError
from lightning_cit.metrics import MC_ACCURACY, TEXT_METRICS
from lightning_cit.plugins import import_callable
from lightning_cit.replay import check_capacity, resolve_capacity

REWARDS = ("ru", "sc")
ANSWERS = ("generated", "gold")
KEEP = ("top", "bottom")
TIE_BREAKS = ("random", "data_order")


def _flashbacks(dm: Any, task: int) -> list[dict]:
    """Answerless prompts another method stored in ``task``'s buffer (JFA's flashbacks): kept when OPR rewrites it.

    OPR rebuilds every buffer at every task end; without this, OPR + JFA in one run would silently drop JFA's
    flashback prompts (the KL term would have nothing to act on).
    """
    buffer = dm.memory.buffers.get(task)
    return [e for e in (buffer.entries if buffer is not None else []) if isinstance(e, dict) and e.get("prompt_only")]


def load_reward(path: str) -> Callable[..., float]:
    """Import ``"package.module:function"`` (a config can make the program import and run code)."""
    if ":" not in path:
        raise ConfigError(f"OnPolicyReplay.reward={path!r}: use one of {', '.join(REWARDS)} or 'module:function'")
    try:
        return import_callable(path)
    except TypeError:
        raise ConfigError(f"OnPolicyReplay.reward={path!r} is not callable") from None
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"OnPolicyReplay.reward={path!r} cannot be imported: {err}") from None


def per_task_quota(budget: int, seen_tasks: int) -> int:
    """``⌊budget / k⌋``: the equal share of each of the ``k`` seen tasks (current one included)."""
    return budget // seen_tasks if seen_tasks > 0 else 0


def select_by_score(scored: list[tuple[int, float]], n: int, keep: str = "top") -> list[int]:
    """Positions of the ``n`` best (``top``) or worst (``bottom``) scores; ties keep list order.

    ``scored`` is ``(position in candidate order, score)``; the sort is stable on the position, so
    every rank picks the same entries from the same gathered list. NaN scores rank last either way.
    """
    sign = -1.0 if keep == "top" else 1.0

    def key(item: tuple[int, float]) -> tuple[int, float, int]:
        position, score = item
        return (1, 0.0, position) if math.isnan(score) else (0, sign * score, position)

    return [position for position, _ in sorted(scored, key=key)[:n]]


class OnPolicyReplay(ContinualCallback):
    """Rebuilds the replay buffers from the model's own best answers at every task end (module docstring).

    Args:
        budget: replay samples after each task: a fraction ρ of the finished task's training size
            (float, paper 0.01 and 0.10) or a count (int); split equally over the tasks seen so far.
        reward: ``ru`` (the task's metric vs. the reference), ``sc`` (mean token log-probability) or
            ``"module:function"`` called as ``fn(sample=, answer=, task=) -> float`` (higher = better).
        answers: ``generated`` (OPR) or ``gold`` (Vanilla replay with the same budget and split).
        keep: ``top`` (OPR) or ``bottom`` (the low-score ablation).
        candidates_per_task: prompts rolled out per seen task (the first of the candidate order);
            null = all of them, as in the paper.
        temperature: sampling temperature, one value or ``{task: value}`` (paper 0.1; 0 = greedy).
        max_new_tokens: generation budget, one value or ``{task: value}``; null = each task's ``max_new_tokens``.
        tie_break: candidate order that breaks score ties: ``random`` (a seeded permutation) or ``data_order``.
    """

    def __init__(
        self,
        budget: int | float = 0.01,
        reward: str = "ru",
        answers: str = "generated",
        keep: str = "top",
        candidates_per_task: int | None = None,
        temperature: float | dict[str, float] = 0.1,
        max_new_tokens: int | dict[str, int] | None = None,
        tie_break: str = "random",
    ) -> None:
        check_capacity(budget, where="OnPolicyReplay.budget")
        for name, value, valid in (("answers", answers, ANSWERS), ("keep", keep, KEEP), ("tie_break", tie_break, TIE_BREAKS)):
            if value not in valid:
                raise ConfigError(f"OnPolicyReplay.{name}={value!r} is unknown; valid: {', '.join(valid)}")
        if not isinstance(reward, str) or not reward:
            raise ConfigError(f"OnPolicyReplay.reward must be one of {', '.join(REWARDS)} or 'module:function', got {reward!r}")
        self.reward_fn = None if reward in REWARDS else load_reward(reward)
        if candidates_per_task is not None and (not isinstance(candidates_per_task, int) or candidates_per_task < 1):
            raise ConfigError(f"OnPolicyReplay.candidates_per_task must be a positive int or null, got {candidates_per_task!r}")
        for name, value in (("temperature", temperature), ("max_new_tokens", max_new_tokens)):
            values = value.values() if isinstance(value, dict) else [value]
            if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0) for v in values):
                raise ConfigError(f"OnPolicyReplay.{name}={value!r}: use a number >= 0 or a {{task: number}} mapping")
        self.budget = budget
        self.reward = reward
        self.answers = answers
        self.keep = keep
        self.candidates_per_task = candidates_per_task
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.tie_break = tie_break
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------ set-up
    roles = ("rollout",)

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        module = ("generate_answers", "choose_options", "sample_losses", "tokenizer") if self.answers == "generated" else ()
        return Needs(module=module, data=DATA_MEMORY + ("end_task", "sample_id_of"))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        dm = trainer.datamodule
        if hasattr(dm, "load_tasks"):
            dm.load_tasks()
        names = dm.task_names
        for field in ("temperature", "max_new_tokens"):
            value = getattr(self, field)
            if isinstance(value, dict) and set(value) - set(names):
                raise ConfigError(f"OnPolicyReplay.{field} names unknown task(s) {sorted(set(value) - set(names))}; valid: {', '.join(names)}")

    def _per_task(self, value: Any, task: Any, default: Any) -> Any:
        if isinstance(value, dict):
            return value.get(task.spec.name, default)
        return default if value is None else value

    @property
    def done_tasks(self) -> set[int]:
        return {int(record["task"]) for record in self.history}

    # ------------------------------------------------------------------------------------ the boundary
    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        dm = trainer.datamodule
        if task >= dm.num_tasks - 1 or task in self.done_tasks:  # nothing follows the last task; never twice
            return
        with pl_module.continual.cost_scope("rollout"):
            record = self.rebuild_buffers(trainer, pl_module, task)
        self.history.append(record)
        if record["tokens"]:
            pl_module.log_dict(
                {"opr/tokens_per_s": record["tokens_per_s"], "opr/rollout_s": record["seconds"]},
                on_step=False, on_epoch=True, rank_zero_only=True,
            )
        rank_zero_info(
            f"OPR after task {task + 1} ({dm.task_names[task]!r}): {record['per_task']} per task kept "
            f"({self.answers}, reward {self.reward}, keep {self.keep}) from {sum(record['candidates'])} candidates; "
            f"{record['tokens']} tokens in {record['seconds']:.1f} s ({record['tokens_per_s']:.0f} tokens/s)"
        )

    def candidates(self, dm: Any, task: int) -> list[int]:
        """Indices of the prompts of ``task`` that may be rolled out, in tie-break order (identical on every rank)."""
        size = len(dm.train_tasks[task].train)
        order = list(range(size))
        random.Random(f"opr/{dm.seed}/{task}").shuffle(order)
        if self.candidates_per_task is not None:
            order = order[: self.candidates_per_task]
        return sorted(order) if self.tie_break == "data_order" else order

    def rebuild_buffers(self, trainer: pl.Trainer, pl_module: pl.LightningModule, finished: int) -> dict[str, Any]:
        """Roll out, score and select for every task ``0..finished``; replace their buffers."""
        dm = trainer.datamodule
        budget = resolve_capacity(self.budget, len(dm.train_tasks[finished].train))
        n_per = per_task_quota(budget, finished + 1)
        pools = {j: self.candidates(dm, j) for j in range(finished + 1)}
        record: dict[str, Any] = {
            "task": finished, "budget": budget, "per_task": n_per,
            "candidates": [len(pools[j]) for j in range(finished + 1)],
            "kept": [], "mean_score_kept": [], "mean_score_all": [],
            "tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0, "rollout_seconds": 0.0,
        }
        if self.answers == "gold":
            for j in range(finished + 1):
                dm.end_task(j)
                dm.memory.replace(j, sorted(pools[j][:n_per]) + _flashbacks(dm, j))  # references into the task's data: the gold answers
                record["kept"].append(dm.memory.size(j))
            return record
        rank, world = trainer.global_rank, trainer.world_size
        # equal shards per task (short ones padded with a repeat whose answer is dropped): under FSDP FULL_SHARD every
        # rank must run the same generate calls, in lockstep
        local, real = [], []
        for j in range(finished + 1) if n_per else ():
            shard = ShardPlan(pools[j], world, rank)
            local += [(j, i) for i in shard.local]
            real += [p < shard.real for p in range(len(shard.local))]
        began = time.perf_counter()
        synced = world > 1 and sharded(trainer)
        scored, tokens, seconds = self.rollout(pl_module, dm, local, seed=dm.seed * 1000 + finished, rank=rank, real=real, synced_gpus=synced)
        gathered = [item for part in gather_objects([(scored, tokens, seconds, time.perf_counter() - began)]) for item in part]
        results: dict[tuple[int, int], tuple[str, float]] = {}
        for part, part_tokens, part_seconds, part_total in gathered:
            results.update({(j, i): (answer, score) for j, i, answer, score in part})
            record["tokens"] += part_tokens
            # ranks work concurrently: the slowest one is the wall time
            record["seconds"] = max(record["seconds"], part_seconds)
            record["rollout_seconds"] = max(record["rollout_seconds"], part_total)
        record["tokens_per_s"] = record["tokens"] / record["seconds"] if record["seconds"] > 0 else 0.0
        for j in range(finished + 1):
            scores = [(position, results[(j, i)][1]) for position, i in enumerate(pools[j]) if (j, i) in results]
            # stored in data order, like Vanilla replay's references: the sampler walks a buffer by position,
            # so the same kept set gives the same replay stream whatever the scores' order
            chosen = sorted(select_by_score(scores, n_per, self.keep), key=lambda position: pools[j][position])
            entries = []
            for position in chosen:
                index = pools[j][position]
                answer, score = results[(j, index)]
                sample = dm.train_tasks[j].train[index]
                entries.append({
                    "messages": sample["messages"],
                    "response": answer,
                    "sample_id": dm.sample_id_of(j, index, 0),  # the prompt's id: the same prompt, a new answer
                    "prompt_index": int(index),
                    "opr_score": float(score),
                })
            dm.end_task(j)
            dm.memory.replace(j, entries + _flashbacks(dm, j))  # the memory's one way to rewrite a buffer: its version changes
            kept = [e["opr_score"] for e in entries]
            every = [s for _, s in scores]
            record["kept"].append(len(entries))
            record["mean_score_kept"].append(sum(kept) / len(kept) if kept else float("nan"))
            record["mean_score_all"].append(sum(every) / len(every) if every else float("nan"))
        return record

    @torch.no_grad()
    def rollout(
        self, pl_module: pl.LightningModule, dm: Any, local: list[tuple[int, int]], seed: int, rank: int = 0,
        real: list[bool] | None = None, synced_gpus: bool = False,
    ) -> tuple[list[tuple[int, int, str, float]], int, float]:
        """Answer and score the ``(task, index)`` prompts given: ``[(task, index, answer, score)]``, tokens, seconds.

        ``real[p]`` False marks padding (shards made equal for lockstep generation): it is run, not returned.

        Eval mode and no gradient while generating; the module's mode is restored afterwards and
        nothing but Python strings and floats leaves this method.
        """
        was_training = pl_module.training
        pl_module.eval()
        batch_size = getattr(pl_module, "eval_batch_size", 64)  # prompts per generation batch
        out: list[tuple[int, int, str, float]] = []
        tokens, seconds = 0, 0.0
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 100 + rank)
                flags = real if real is not None else [True] * len(local)
                by_task: dict[int, list[tuple[int, bool]]] = {}
                for (j, index), keep in zip(local, flags):
                    by_task.setdefault(j, []).append((index, keep))
                for j, indices in by_task.items():
                    task = dm.train_tasks[j]
                    for start in range(0, len(indices), batch_size):
                        chunk = indices[start : start + batch_size]
                        samples = [task.train[i] for i, _ in chunk]
                        began = time.perf_counter()
                        answers = self._answer(pl_module, task, samples, synced_gpus)
                        if task.metric != MC_ACCURACY:
                            seconds += time.perf_counter() - began
                            tokens += sum(len(pl_module.tokenizer(a, add_special_tokens=False)["input_ids"])
                                          for a, (_, keep) in zip(answers, chunk) if keep)
                        scores = self._score(pl_module, task, samples, answers)
                        out.extend((j, i, a, float(s)) for (i, keep), a, s in zip(chunk, answers, scores) if keep)
        finally:
            if was_training:
                pl_module.train()
        return out, tokens, seconds

    def _answer(self, pl_module: pl.LightningModule, task: Any, samples: list[dict], synced_gpus: bool = False) -> list[str]:
        if task.metric == MC_ACCURACY:  # answered as it is scored: the most likely option
            return [str(s["options"][c]) for s, c in zip(samples, pl_module.choose_options(samples))]
        temperature = float(self._per_task(self.temperature, task, 0.1))
        max_new = int(self._per_task(self.max_new_tokens, task, task.spec.max_new_tokens))
        if synced_gpus:
            return pl_module.generate_answers(samples, max_new, temperature=temperature, synced_gpus=True)
        return pl_module.generate_answers(samples, max_new, temperature=temperature)

    def _score(self, pl_module: pl.LightningModule, task: Any, samples: list[dict], answers: list[str]) -> list[float]:
        if self.reward_fn is not None:
            return [float(self.reward_fn(sample=s, answer=a, task=task.spec.name)) for s, a in zip(samples, answers)]
        if self.reward == "sc":
            own = [{"messages": s["messages"], "response": a} for s, a in zip(samples, answers)]
            return [-loss for loss in pl_module.sample_losses(own)]
        return ru_scores(task.metric, samples, answers)

    # ------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "task_events": self.task_events()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.load_task_events(state_dict)



def ru_scores(metric: str, samples: list[dict], answers: list[str]) -> list[float]:
    """OPR-RU: the task's own metric of each answer against the reference (0..100)."""
    if metric == MC_ACCURACY:
        return [100.0 * (answer == str(s["options"][int(s["answer_index"])])) for s, answer in zip(samples, answers)]
    scorer = TEXT_METRICS[metric]
    return [scorer(answer, s["response"]) for s, answer in zip(samples, answers)]


__all__ = ["OnPolicyReplay", "load_reward", "per_task_quota", "ru_scores", "select_by_score"]
