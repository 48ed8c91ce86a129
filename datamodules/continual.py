"""``ContinualInstructionDataModule``: a task sequence streamed through the mixture sampler.

It implements the data contract (:class:`lightning_cit.contract.ContinualData`). The task it serves
comes from the module's task clock (:class:`~lightning_cit.contract.TaskClock`): with ``TaskClock("epoch")``
(``ContinualLM``'s default, the CLI) one ``fit`` walks the whole sequence, **task index = epoch index**,
and Lightning rebuilds the train dataloader at every epoch (``reload_dataloaders_every_n_epochs=1``);
with ``TaskClock("fit")`` each ``Trainer.fit`` (one epoch) trains the next task with the same DataModule.
The loader is a :class:`~lightning_cit.sampler.MixtureSampler` over the replay buffers of the earlier
tasks and the current task's data, with the weights the mixture controller scheduled.

Tasks come from ``tasks`` (specs read from files, ``synth:`` or ``callable:`` sources) or from a
project's own records (``datasets``: :func:`lightning_cit.tasks.task_from_records`); ``collate_fn``
replaces the built-in chat-template collator (the batch must hold ``input_ids``, ``attention_mask``
and ``labels``; the sample/task/source ids are added when it lacks them).

Sizes are global: ``global_batch_size`` samples per optimizer step across all ranks and
accumulation steps; the per-rank micro-batch is ``global_batch_size / (world_size *
accumulate_grad_batches)`` and must divide exactly. A task lasts ``steps`` optimizer steps.

Controllers reach the sampler through :meth:`set_mixture` only; buffers are filled when a task
ends (lazily, at the latest when the next task's dataloader is built) by the selection policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_cit.collate import Collator
from lightning_cit.errors import ConfigError
from lightning_cit.replay import SELECTION_POLICIES, ReplayBuffer, ReplayMemory, check_capacity
from lightning_cit.resume import data_settings, data_state_mismatches, task_fingerprints
from lightning_cit.sampler import MixtureSampler
from lightning_cit.tasks import TaskData, TaskDataError, TaskSpec, check_task, validate_specs

GENERATED_ID_BASE = 1_000_000_000


class _ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it is resumable: the position lives in the DataModule state.

    Lightning warns about mid-epoch resumption for loaders without ``state_dict``; ours resumes
    exactly (the sampler replays its draws up to the checkpointed batch), so the state here is
    informational only.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"task_index": self.batch_sampler.task_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _MixtureDataset(Dataset):
    """Resolves sampler keys ``(source, position)`` to samples for one task's epoch."""

    def __init__(self, datamodule: ContinualInstructionDataModule, task_index: int) -> None:
        self.dm = datamodule
        self.task_index = task_index

    def __len__(self) -> int:
        return len(self.dm.train_tasks[self.task_index].train)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        source, position = key
        if source == self.task_index:
            return self.dm.sample(source, position, source_id=source, is_replay=False)
        entry = self.dm.memory.get(source).entries[position]
        if isinstance(entry, dict):
            sample = dict(entry)
            sample.update(sample_id=self.dm.sample_id_of(source, entry, position), task_id=source, source_id=source, is_replay=True)
            return sample
        return self.dm.sample(source, int(entry), source_id=source, is_replay=True)


class ContinualInstructionDataModule(pl.LightningDataModule):
    """A continual instruction-tuning sequence: task data, replay buffers, a controller-driven sampler.

    Args:
        tasks: the sequence, in training order (see :class:`~lightning_cit.tasks.TaskSpec`).
        global_batch_size: samples per optimizer step over all ranks and accumulation steps.
        steps_per_task: optimizer steps per task unless the task sets ``steps``.
        buffer_size: replay memory per finished task: a count (int) or a fraction of the task (float).
        buffer_policy: how a finished task's buffer is filled: ``random``, ``reservoir`` or ``first``.
        max_length: tokens per training sample (prompt + response); longer samples are truncated.
        seed: seeds data splits, buffer selection and the sampler's draws.
        num_workers: DataLoader worker processes (0 draws and collates in the main process).
        datasets: a project's own tasks instead of ``tasks`` (:class:`~lightning_cit.tasks.TaskData`, e.g. from
            :func:`~lightning_cit.tasks.task_from_records`), in training order.
        collate_fn: a project's own collate function (list of samples -> batch dict); default: the chat-template collator.
    """

    def __init__(
        self,
        tasks: list[TaskSpec] | None = None,
        global_batch_size: int = 32,
        steps_per_task: int = 300,
        buffer_size: int | float = 0.1,
        buffer_policy: str = "random",
        max_length: int = 256,
        seed: int = 0,
        num_workers: int = 0,
        datasets: list[TaskData] | None = None,
        collate_fn: Any = None,
    ) -> None:
        super().__init__()
        if (tasks is None) == (datasets is None):
            raise ConfigError("ContinualInstructionDataModule needs exactly one of data.tasks (specs) or datasets= (TaskData)")
        if datasets is not None:
            bad = [type(d).__name__ for d in datasets if not isinstance(d, TaskData)]
            if bad:
                raise ConfigError(f"datasets= takes lightning_cit.tasks.TaskData (see task_from_records), got {bad}")
            tasks = [d.spec for d in datasets]
        tasks = [t if isinstance(t, TaskSpec) else TaskSpec(**t) for t in tasks]
        validate_specs(tasks)
        check_capacity(buffer_size)
        if buffer_policy not in SELECTION_POLICIES:
            raise ConfigError(f"data.buffer_policy={buffer_policy!r} is unknown; valid: {', '.join(SELECTION_POLICIES)}")
        for name, value in (("global_batch_size", global_batch_size), ("steps_per_task", steps_per_task), ("max_length", max_length)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name} must be a positive integer, got {value!r}")
        self.specs = tasks
        self.global_batch_size = global_batch_size
        self.steps_per_task = steps_per_task
        self.buffer_size = buffer_size
        self.buffer_policy = buffer_policy
        self.max_length = max_length
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self.train_tasks: list[TaskData] = []
        self.eval_only_tasks: list[TaskData] = []
        self.memory = ReplayMemory(buffer_size, buffer_policy, seed)
        self._datasets = list(datasets) if datasets is not None else None
        self._user_collate = collate_fn
        self.schedule: dict[int, dict[int, list[float]]] = {}
        self.entry_schedule: dict[int, dict[int, dict[int, list[float]]]] = {}
        self._resume_position: tuple[int, int] | None = None
        self._id_offsets: list[int] = []
        self._collator: Collator | None = None

    # ---------------------------------------------------------------------------------------- set-up
    @property
    def task_names(self) -> list[str]:
        """Names of the trained tasks, in order (the columns of the score matrix)."""
        return [s.name for s in self.specs if s.train]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def connect(self, tokenizer: Any) -> None:
        """Give the DataModule the model's tokenizer (done by :meth:`setup` from ``ContinualLM``)."""
        self.tokenizer = tokenizer

    def load_tasks(self) -> None:
        """Validate every task's data and read what can be read now (idempotent; raises ``TaskDataError`` with a precise message).

        Large JSONL files are checked on a sample and their held-out samples read; their training data opens
        when the task first needs it (:func:`~lightning_cit.tasks.check_task`, :class:`~lightning_cit.tasks.LazyTaskData`).
        """
        if self.train_tasks:
            return
        loaded = self._datasets if self._datasets is not None else [check_task(spec, seed=self.seed) for spec in self.specs]
        self.train_tasks = [t for t in loaded if t.spec.train]
        self.eval_only_tasks = [t for t in loaded if not t.spec.train]
        self._id_offsets = [0]  # sample_id = offset of its task + index; extended as tasks open (_id_offset)

    def _id_offset(self, task_index: int) -> int:
        """The sum of the sizes of the tasks before ``task_index`` (opens them: they were trained before it)."""
        while len(self._id_offsets) <= task_index:
            k = len(self._id_offsets) - 1
            self._id_offsets.append(self._id_offsets[k] + len(self.train_tasks[k].train))
        return self._id_offsets[task_index]

    def open_task(self, task_index: int) -> None:
        """Open a trained task's data now (a large file converts and every row is validated): done at its start."""
        _ = self.train_tasks[task_index].train

    def setup(self, stage: str) -> None:
        self.load_tasks()
        if self.tokenizer is None and self.trainer is not None:
            self.tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None)
        if self.tokenizer is None:
            raise RuntimeError("ContinualInstructionDataModule needs a tokenizer: call connect(tokenizer) or use a module with `.tokenizer`")
        self._collator = Collator(self.tokenizer, self.max_length, self.task_names)
        if stage == "fit" and self.trainer is not None:
            self._check_trainer()

    @property
    def buffers(self) -> dict[int, ReplayBuffer]:
        """Read-only view of the replay memory's buffers (change them through :attr:`memory`)."""
        return dict(self.memory.buffers)

    def _clock(self) -> Any:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(module, "task_clock", None)

    def current_task(self, starting: bool = False) -> int:
        """The task being trained, from the module's task clock (``trainer.current_epoch`` without one).

        ``starting``: called while a fit builds its loader, before ``on_train_start``: start the clock's fit
        (idempotent) so a new fit of the ``fit`` style moves to its task first.
        """
        clock = self._clock()
        if clock is None:
            return int(self.trainer.current_epoch)
        if starting:
            clock.start_fit(self.trainer)
        return clock.task_of(self.trainer)

    def _check_trainer(self) -> None:
        trainer = self.trainer
        clock = self._clock()
        if clock is not None and clock.style == "fit":
            if trainer.max_epochs != 1:
                raise ConfigError(
                    f"with TaskClock('fit') each fit trains one task for steps_per_task steps in one epoch: set Trainer(max_epochs=1), "
                    f"got max_epochs={trainer.max_epochs}"
                )
            _ = self.micro_batch_size
            return
        if clock is not None and clock.epochs_per_task != 1:
            raise ConfigError("ContinualInstructionDataModule runs one epoch per task: use TaskClock('epoch', epochs_per_task=1) "
                              "(a task's length is data.steps_per_task)")
        if trainer.max_epochs != self.num_tasks:
            raise ConfigError(
                f"trainer.max_epochs={trainer.max_epochs} but the sequence has {self.num_tasks} trained tasks; "
                f"one epoch is one task, so set trainer.max_epochs={self.num_tasks} (the lightning-cit CLI does this for you)"
            )
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ConfigError("set trainer.reload_dataloaders_every_n_epochs=1: each epoch (task) builds its own dataloader")
        _ = self.micro_batch_size  # raises when the global batch does not divide

    @property
    def micro_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if self.global_batch_size % (world * accumulate):
            raise ConfigError(
                f"data.global_batch_size={self.global_batch_size} is not divisible by world_size ({world}) x "
                f"trainer.accumulate_grad_batches ({accumulate}); choose sizes whose product divides it"
            )
        return self.global_batch_size // (world * accumulate)

    @property
    def draw_ahead(self) -> int:
        """How many batches are drawn before the training step that consumes the current one.

        Lightning prefetches one batch; worker processes prefetch ``prefetch_factor`` (2) batches
        each. Controllers schedule a decision at least this many batches ahead.
        """
        return 2 + 2 * self.num_workers

    def steps_for(self, task_index: int) -> int:
        return self.train_tasks[task_index].spec.steps or self.steps_per_task

    def task_start_step(self, task_index: int) -> int:
        """Global optimizer step at which ``task_index`` starts."""
        return sum(self.steps_for(k) for k in range(task_index))

    def batches_for(self, task_index: int) -> int:
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return self.steps_for(task_index) * accumulate

    # -------------------------------------------------------------------------------------- samples
    def sample(self, task_index: int, position: int, source_id: int, is_replay: bool) -> dict:
        sample = dict(self.train_tasks[task_index].train[position])
        sample.update(sample_id=self._id_offset(task_index) + position, task_id=task_index, source_id=source_id, is_replay=is_replay)
        return sample

    def sample_id_of(self, task_index: int, entry: int | dict, position: int) -> int:
        """The ``sample_id`` a batch carries for buffer entry ``position`` of ``task_index``."""
        if isinstance(entry, dict):
            return int(entry.get("sample_id", GENERATED_ID_BASE + task_index * 1_000_000 + position))
        return self._id_offset(task_index) + int(entry)

    def buffer_samples(self, task_index: int) -> list[dict]:
        """The samples of a task's replay buffer, in entry order."""
        view = _MixtureDataset(self, task_index + 1)
        return [view[(task_index, position)] for position in range(self.memory.size(task_index))]

    def end_task(self, task_index: int) -> ReplayBuffer:
        """Fill the replay buffer of a finished task (once; later calls return the existing buffer)."""
        return self.memory.fill(task_index, len(self.train_tasks[task_index].train))

    # -------------------------------------------------------------------------------------- mixture
    def set_mixture(
        self,
        weights: list[float],
        from_batch: int,
        task_index: int | None = None,
        entry_weights: dict[int, list[float]] | None = None,
    ) -> None:
        """Schedule mixture weights (one per trained task) from ``from_batch`` of the task on.

        Weights for future tasks must be zero; earlier tasks whose buffer is empty are dropped and
        the rest renormalized. ``entry_weights`` optionally gives per-entry draw weights inside
        buffers (``{task: [weight per buffer entry]}``, e.g. MSSR's ``m^-zeta``) for the same batches;
        buffers without them use :meth:`ReplayBuffer.sampling_weights`. Called by mixture
        controllers; identical on every rank.
        """
        task_index = self.current_task() if task_index is None else task_index
        weights = [float(w) for w in weights]
        if len(weights) != self.num_tasks:
            raise ConfigError(f"mixture has {len(weights)} weights for {self.num_tasks} tasks")
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ConfigError(f"mixture weights must be finite and >= 0, got {weights}")
        if any(w > 0 for w in weights[task_index + 1 :]):
            raise ConfigError(f"mixture {weights} puts weight on future tasks (current task index {task_index})")
        self.schedule.setdefault(task_index, {})[int(from_batch)] = weights
        if entry_weights is not None:
            for j, per_entry in entry_weights.items():
                if len(per_entry) != self.memory.size(int(j)):
                    raise ConfigError(f"entry weights for task {j} have {len(per_entry)} values for {self.memory.size(int(j))} buffer entries")
            clean = {int(j): [float(w) for w in v] for j, v in entry_weights.items()}
            self.entry_schedule.setdefault(task_index, {})[int(from_batch)] = clean

    def has_decision(self, task_index: int, batch: int) -> bool:
        return batch in self.schedule.get(task_index, {})

    def entry_weights_for(self, task_index: int, batch: int) -> list[list[float] | None]:
        """Per-entry draw weights of each source for ``batch`` (None = seeded permutation walk)."""
        decisions = self.entry_schedule.get(task_index, {})
        keys = [b for b in decisions if b <= batch]
        scheduled = decisions[max(keys)] if keys else {}
        return [scheduled.get(j, self.memory.get(j).sampling_weights()) for j in range(task_index)] + [None]

    def weights_for(self, task_index: int, batch: int) -> list[float]:
        """The weights in force for ``batch`` of ``task_index``, over its sources (buffers then current)."""
        decisions = self.schedule.get(task_index, {})
        keys = [b for b in decisions if b <= batch]
        if keys:
            weights = list(decisions[max(keys)][: task_index + 1])
        else:
            weights = [0.0] * task_index + [1.0]
        for j in range(task_index):
            if self.memory.size(j) == 0:
                weights[j] = 0.0
        if sum(weights) <= 0:
            weights[task_index] = 1.0
        total = sum(weights)
        return [w / total for w in weights]

    # ---------------------------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        task_index = self.current_task(starting=True)
        if task_index >= self.num_tasks:
            raise ConfigError(f"task index {task_index} has no task: the sequence has {self.num_tasks} trained tasks ({self.task_names})")
        for earlier in range(task_index):
            self.end_task(earlier)
        start = 0
        if self._resume_position is not None:
            resume_task, resume_batch = self._resume_position
            if resume_task == task_index and 0 < resume_batch < self.batches_for(task_index):
                start = resume_batch
            self._resume_position = None
        sources = [self.memory.size(j) for j in range(task_index)] + [len(self.train_tasks[task_index].train)]
        sampler = MixtureSampler(
            source_sizes=sources,
            weights_for_batch=lambda b: self.weights_for(task_index, b),
            task_index=task_index,
            num_batches=self.batches_for(task_index),
            micro_batch_size=self.micro_batch_size,
            world_size=self.trainer.world_size,
            rank=self.trainer.global_rank,
            seed=self.seed,
            start_batch=start,
            entry_weights_for_batch=lambda b: self.entry_weights_for(task_index, b),
        )
        rank_zero_info(
            f"task {task_index + 1}/{self.num_tasks} {self.task_names[task_index]!r}: {self.steps_for(task_index)} steps, "
            f"buffers {sources[:-1]}" + (f", resuming at batch {start}" if start else "")
        )
        return _ResumableLoader(
            _MixtureDataset(self, task_index),
            batch_sampler=sampler,
            collate_fn=self._collate,
            num_workers=self.num_workers,
        )

    def _collate(self, samples: list[dict]) -> dict[str, Any]:
        if self._user_collate is None:
            return self._collator(samples)
        import torch

        batch = dict(self._user_collate(samples))
        for key, field_name, default in (("sample_ids", "sample_id", -1), ("task_ids", "task_id", -1), ("source_ids", "source_id", -1),
                                         ("is_replay", "is_replay", False), ("prompt_only", "prompt_only", False)):
            if key not in batch:
                values = [s.get(field_name, default) for s in samples]
                batch[key] = torch.tensor([bool(v) for v in values] if isinstance(default, bool) else [int(v) for v in values])
        return batch

    # ------------------------------------------------------------------------------------ evaluation
    def val_dataloader(self) -> list[DataLoader]:
        """One loader per evaluated task over its eval samples (used by ``lightning-cit validate``/``test``)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return [
            DataLoader(task.eval[rank::world], batch_size=64, collate_fn=list, shuffle=False)
            for task in self.evaluation_tasks()
        ]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def evaluation_tasks(self) -> list[TaskData]:
        """Every task scored by the evaluator: the trained ones in order, then evaluation-only probes."""
        self.load_tasks()
        return self.train_tasks + self.eval_only_tasks

    # ------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        position = None
        if self.trainer is not None and self.trainer.training:
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
            # batches whose training step ran; Lightning resumes at this batch index
            position = (self.current_task(), progress.processed)
        return {
            "schedule": {k: dict(v) for k, v in self.schedule.items()},
            "entry_schedule": {k: dict(v) for k, v in self.entry_schedule.items()},
            "buffers": {j: b.state_dict() for j, b in self.memory.items()},
            "memory_versions": dict(self.memory.versions),
            "position": position,
            "truncated": dict(self._collator.truncated) if self._collator else {},
            "tasks": [asdict(s) for s in self.specs],
            # the resume rule (lightning_cit.resume): settings and each task's data fingerprint are compared on load
            "settings": data_settings(self),
            "fingerprints": task_fingerprints(self),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        problems = data_state_mismatches(self, state)
        if problems:
            raise TaskDataError(f"the checkpoint's data differs from this run's: {' | '.join(problems)}")
        self.schedule = {int(k): {int(b): list(w) for b, w in v.items()} for k, v in state["schedule"].items()}
        self.entry_schedule = {
            int(k): {int(b): {int(j): list(w) for j, w in e.items()} for b, e in v.items()}
            for k, v in state.get("entry_schedule", {}).items()
        }
        self.memory.load_state_dict({"buffers": state["buffers"], "versions": state.get("memory_versions", {j: 1 for j in state["buffers"]})})
        self._resume_position = tuple(state["position"]) if state.get("position") else None
