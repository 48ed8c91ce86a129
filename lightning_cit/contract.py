"""The one contract between the data, the module and the callbacks of lightning-cit.

Everything a lightning-cit callback may use from the LightningModule and the DataModule is written
here, and nothing else. A user's own Lightning project uses our callbacks through it:

- **The task clock** (:class:`TaskClock`, on the module as ``task_clock``): which task is training and
  whether one just started or ended. It supports the three ways people train a sequence:
  ``TaskClock("fit")`` — one ``Trainer.fit`` per task with the same callback objects (the default for a
  user's module; each fit trains the next task, or the one named by :meth:`TaskClock.begin_task`);
  ``TaskClock("epoch")`` — one ``fit`` walks the sequence, epoch ``e`` trains task ``e``
  (``ContinualLM`` and the CLI); ``TaskClock("epoch", epochs_per_task=n)`` — several epochs per task.
  Callbacks never read ``trainer.current_epoch`` as a task index; they receive
  :meth:`ContinualCallback.on_task_start` / :meth:`ContinualCallback.on_task_end`.
- **The module contract** (:class:`ContinualModule`, a mixin): needs only ``self.model`` (a Hugging Face
  causal LM or a ``peft.PeftModel``) and ``self.tokenizer``, and gives what callbacks use: per-sample
  losses (:meth:`~ContinualModule.continual_loss` makes ``training_step``'s outputs), sample losses,
  answers, option choice, evaluation with adapter routing, loss components and a small registry of
  services (probe losses, score sections, the adapter router) that callbacks register explicitly
  instead of patching the module or scanning the callback list.
- **The data contract** (:class:`ContinualData`, a ``typing.Protocol``): task metadata, the replay memory
  (:class:`~lightning_cit.replay.ReplayMemory`, the one owner of the buffers, versioned), the mixture plan
  per batch. ``ContinualInstructionDataModule`` implements it; a user's DataModule can implement it or
  hand its datasets to ``ContinualInstructionDataModule`` (``datasets=``, ``collate_fn=``).
- **Cost scopes** (:meth:`ContinualRegistry.cost_scope`): a callback that runs forwards of its own (evaluation,
  probes, rollouts, reference passes, re-scoring) wraps them in ``module.continual.cost_scope(label)`` so a
  cost meter (:class:`~lightning_cit.callbacks.CostMeter`) can attribute tokens and CPU time to it.
- **One setup check** (:class:`Needs`, :func:`check_contract`): every callback states what it needs;
  at ``setup`` one error lists *everything* missing, and the required order of callbacks is checked
  for every pair that has one (:data:`ORDER`). The batch keys and ``training_step`` outputs a callback
  reads can only be seen at the first step: they are checked then, once, for every registered callback
  together (:meth:`ContinualRegistry.check_batch`, :meth:`ContinualRegistry.check_step_outputs`).

Arrows run one way: this file imports nothing of ours above the pure helpers (collate, metrics, loss).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from lightning.pytorch.callbacks import Callback

from lightning_cit.collate import Collator, count_eval_truncation, left_padded_prompts
from lightning_cit.errors import ConfigError
from lightning_cit.metrics import MC_ACCURACY, TEXT_METRICS

TaskStyle = Literal["fit", "epoch"]
BASE_ADAPTER = "__base__"
"""What an adapter router returns for "answer with the adapters disabled"."""


class ContractError(ConfigError):
    """A callback needs something the module, the data or the callback order does not provide."""


# ============================================================================================ the task clock
class TaskClock:
    """Which task is training, and did one just start or end: the one source of truth for every callback.

    Args:
        style: ``fit`` (one ``Trainer.fit`` per task, same callback objects; every epoch of a fit
            trains its task) or ``epoch`` (one ``fit`` for the sequence; epoch ``e`` trains task
            ``e // epochs_per_task``).
        epochs_per_task: epochs of one task in the ``epoch`` style (must be 1 in the ``fit`` style:
            there a fit's ``max_epochs`` / ``max_steps`` bound the task).

    A task **starts** at the first ``on_train_epoch_start`` of its first epoch (Lightning skips that hook
    when it resumes mid-epoch, and each callback remembers the last task it started, so a resumed task
    never restarts). A task **ends** at the ``on_train_epoch_end`` of its last epoch (``epoch`` style), or,
    in the ``fit`` style, at the end of the epoch where the fit reaches ``max_epochs`` / ``max_steps``
    (at ``on_train_end`` when it stops otherwise, e.g. early stopping). State (``state_dict``) is saved by
    :class:`ContinualModule` in the module's checkpoint, so ``fit(ckpt_path=...)`` of an interrupted fit
    continues the same task.
    """

    def __init__(self, style: TaskStyle = "fit", epochs_per_task: int = 1) -> None:
        if style not in ("fit", "epoch"):
            raise ConfigError(f"TaskClock style={style!r} is unknown; valid: fit, epoch")
        if isinstance(epochs_per_task, bool) or not isinstance(epochs_per_task, int) or epochs_per_task < 1:
            raise ConfigError(f"TaskClock epochs_per_task must be a positive integer, got {epochs_per_task!r}")
        if style == "fit" and epochs_per_task != 1:
            raise ConfigError("TaskClock('fit') trains one task per fit: bound it with the Trainer's max_epochs/max_steps, not epochs_per_task")
        self.style: TaskStyle = style
        self.epochs_per_task = epochs_per_task
        self.task = -1  # fit style: the task of the current (or last) fit
        self.status: Literal["idle", "running", "ended"] = "idle"
        self.first_step = 0  # fit style: the trainer's global step at which the current task started
        self._requested: int | None = None
        self._fit: Any = None  # weak reference to the trainer of the current fit

    # ------------------------------------------------------------------ driving it
    def begin_task(self, index: int) -> None:
        """``fit`` style: the next ``fit`` trains task ``index`` (default: the task after the last one)."""
        if self.style != "fit":
            raise ConfigError("TaskClock.begin_task is for the 'fit' style; in the 'epoch' style the epoch is the task")
        if self.status == "running":
            raise ConfigError(f"task {self.task} has not ended yet (its fit was interrupted): resume it with fit(ckpt_path=...) first")
        self._requested = int(index)

    def start_fit(self, trainer: Any) -> None:
        """Called at ``on_train_start`` by every :class:`ContinualCallback` (idempotent within one fit)."""
        if self._fit is not None and self._fit() is trainer and self.status == "running":
            return
        self._fit = weakref.ref(trainer)
        if self.style == "epoch":
            self.status = "running"
            return
        if self.status == "running":  # an interrupted fit of this task, resumed from its checkpoint
            return
        self.task = self._requested if self._requested is not None else self.task + 1
        self._requested = None
        self.first_step = int(trainer.global_step)
        self.status = "running"

    # ------------------------------------------------------------------ reading it
    def task_of(self, trainer: Any) -> int:
        if self.style == "epoch":
            return int(trainer.current_epoch) // self.epochs_per_task
        if self.task < 0:
            raise ContractError("no task is training yet: the task clock starts at on_train_start (is the callback a ContinualCallback?)")
        return self.task

    def sequence_step(self, trainer: Any, datamodule: Any) -> int:
        """Optimizer steps since the sequence started (a new Trainer per task restarts ``global_step``)."""
        if self.style == "epoch":
            return int(trainer.global_step)
        return int(datamodule.task_start_step(self.task_of(trainer))) + int(trainer.global_step) - self.first_step

    def is_task_end(self, trainer: Any) -> bool:
        """At ``on_train_epoch_end``: does this epoch end the current task?"""
        epoch = int(trainer.current_epoch)
        if self.style == "epoch":
            return (epoch + 1) % self.epochs_per_task == 0
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        max_steps = trainer.max_steps if trainer.max_steps is not None else -1
        return (max_epochs not in (-1, None) and epoch + 1 >= max_epochs) or (max_steps not in (-1, None) and trainer.global_step >= max_steps)

    def mark_ended(self) -> None:
        if self.style == "fit":
            self.status = "ended"

    def check_trainer(self, trainer: Any) -> None:
        """Refuse trainer settings this style cannot honour (called by the contract check at setup)."""
        if self.style == "fit":
            max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
            if (max_epochs in (None, -1)) and (max_steps in (None, -1)):
                raise ContractError("TaskClock('fit'): the fit of a task needs an end: set the Trainer's max_epochs or max_steps")

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"style": self.style, "epochs_per_task": self.epochs_per_task, "task": self.task, "status": self.status,
                "first_step": self.first_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("style", self.style) != self.style or int(state.get("epochs_per_task", self.epochs_per_task)) != self.epochs_per_task:
            raise ContractError(
                f"the checkpoint was trained with TaskClock({state.get('style')!r}, epochs_per_task={state.get('epochs_per_task')}), "
                f"this run uses TaskClock({self.style!r}, epochs_per_task={self.epochs_per_task})"
            )
        self.task = int(state["task"])
        self.status = state["status"]
        self.first_step = int(state.get("first_step", 0))


# ============================================================================================ requirements
@dataclass(frozen=True)
class Needs:
    """What a callback uses: module members, data members, training-batch keys, ``training_step`` output keys, a PEFT model.

    ``module``, ``data`` and ``peft`` are checked at ``setup``; ``batch`` and ``step_outputs`` can only be seen
    when the first training batch arrives and its step returns, and are checked then, once per fit, for every
    registered callback together (:meth:`ContinualRegistry.check_batch`, :meth:`ContinualRegistry.check_step_outputs`).
    """

    module: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    batch: tuple[str, ...] = ()
    step_outputs: tuple[str, ...] = ()
    peft: bool = False
    why: str = ""


MODULE_BASICS = ("task_clock", "continual")
"""Every ContinualCallback needs these (they come with :class:`ContinualModule`)."""

ORDER: tuple[tuple[str, str, str], ...] = (
    ("adapter-slots", "average", "the adapter a task trains must be active before the average tracks the trainable tensors"),
    ("average", "scores", "the task-end scores must see the averaged weights"),
    ("average", "rollout", "OPR's answers must come from the averaged weights"),
    ("average", "snapshot", "JFA's reference snapshot must be taken of the averaged weights"),
)
"""(role A, role B, why): a callback with role A must come before every callback with role B in ``trainer.callbacks``."""


def _missing(obj: Any, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not hasattr(obj, n)]


def check_contract(trainer: Any, pl_module: Any, callbacks: list[ContinualCallback]) -> None:
    """One error listing everything ``callbacks`` need that the module, the data or the trainer lack."""
    problems: list[str] = []
    dm = getattr(trainer, "datamodule", None)
    for cb in callbacks:
        needs = cb.needs
        name = type(cb).__name__
        missing_module = _missing(pl_module, MODULE_BASICS + needs.module)
        if missing_module:
            problems.append(f"{name} needs module members {missing_module} (inherit lightning_cit.ContinualModule in {type(pl_module).__name__})")
        if needs.data:
            if dm is None:
                problems.append(f"{name} needs a DataModule implementing lightning_cit.contract.ContinualData (members {list(needs.data)}); "
                                "pass datamodule= to fit, e.g. ContinualInstructionDataModule(datasets=...)")
            else:
                missing_data = _missing(dm, needs.data)
                if missing_data:
                    problems.append(f"{name} needs DataModule members {missing_data} of lightning_cit.contract.ContinualData "
                                    f"({type(dm).__name__} lacks them; wrap your datasets with ContinualInstructionDataModule(datasets=...))")
        if needs.peft:
            model = getattr(pl_module, "model", None)
            if model is None or not hasattr(model, "disable_adapter") or not hasattr(model, "peft_config"):
                problems.append(f"{name} needs LoRA adapters: the module's .model must be a peft.PeftModel ({needs.why or 'adapter-only state'})")
    if problems:
        raise ContractError("lightning-cit callbacks cannot run with this module/data:\n  - " + "\n  - ".join(problems))
    clock = getattr(pl_module, "task_clock", None)
    if clock is not None:
        clock.check_trainer(trainer)


# ============================================================================================ the callback base
class ContinualCallback(Callback):
    """Base of every lightning-cit callback: the contract check, the task events, the role order.

    Subclasses state :attr:`needs` and :attr:`roles`, and override :meth:`on_task_start` /
    :meth:`on_task_end` instead of reading epochs. Hooks they override (``setup``, ``on_train_start``,
    ``on_train_batch_start``, ``on_train_batch_end``, ``on_train_epoch_start``, ``on_train_epoch_end``,
    ``on_train_end``) must call ``super()``; their
    ``state_dict`` must include :meth:`task_events` (``super().state_dict()``).
    """

    needs: ClassVar[Needs] = Needs()
    roles: ClassVar[tuple[str, ...]] = ()
    _started_task: int = -1
    _ended_task: int = -1

    # ------------------------------------------------------------------ events for subclasses
    def on_task_start(self, trainer: Any, pl_module: Any, task: int) -> None:
        """Task ``task`` starts (never called again for it, also not after a resume)."""

    def on_task_end(self, trainer: Any, pl_module: Any, task: int) -> None:
        """Task ``task`` ended: its last optimizer step ran (called once per task)."""

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_contract(trainer, pl_module, [self])
        pl_module.continual.register_callback(self)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        pl_module.task_clock.start_fit(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        pl_module.continual.check_batch(batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        pl_module.continual.check_step_outputs(outputs)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        task = pl_module.task_clock.task_of(trainer)
        if task != self._started_task:
            self._started_task = task
            self.on_task_start(trainer, pl_module, task)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        clock = pl_module.task_clock
        if clock.is_task_end(trainer):
            self._end(trainer, pl_module, clock)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        clock = pl_module.task_clock
        if clock.style == "fit" and clock.status == "running":  # a fit that stopped early (e.g. early stopping)
            self._end(trainer, pl_module, clock)

    def _end(self, trainer: Any, pl_module: Any, clock: TaskClock) -> None:
        task = clock.task_of(trainer)
        if task != self._ended_task:
            self._ended_task = task
            self.on_task_end(trainer, pl_module, task)
        pl_module.continual.task_ended(self, clock)

    # ------------------------------------------------------------------ checkpoint
    def task_events(self) -> dict[str, int]:
        return {"started": self._started_task, "ended": self._ended_task}

    def load_task_events(self, state: dict[str, Any]) -> None:
        events = state.get("task_events", {})
        self._started_task = int(events.get("started", -1))
        self._ended_task = int(events.get("ended", -1))

    def state_dict(self) -> dict[str, Any]:
        return {"task_events": self.task_events()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_task_events(state_dict)


# ============================================================================================ the registry
_COST_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("lightning_cit_cost_scope", default=None)


def current_cost_scope() -> str | None:
    """The label of the innermost :meth:`ContinualRegistry.cost_scope` being run (None: the training step's own work)."""
    return _COST_SCOPE.get()


class ContinualRegistry:
    """Services and callbacks registered with one module (``module.continual``); never checkpointed.

    Callbacks register here explicitly at ``setup`` (in ``trainer.callbacks`` order): services other
    callbacks call (``probes``: the evaluator's probe losses; ``adapter_router``: instruction grouping),
    score sections written into ``scores.json``, and their roles, whose order :data:`ORDER` checks.
    """

    def __init__(self) -> None:
        self.callbacks: list[ContinualCallback] = []
        self.services: dict[str, Any] = {}
        self.score_sections: dict[str, Any] = {}
        self._ended: set[int] = set()
        self._checked: set[str] = set()

    def check_batch(self, batch: Any) -> None:
        """Once per fit, at the first training batch: one error listing every registered callback's missing batch keys."""
        self._check_keys("batch", batch, "training batches lack keys", "the batch is a {kind}, not a mapping",
                         "yield them from your DataModule's collate function (lightning_cit.collate.Collator adds them all)")

    def check_step_outputs(self, outputs: Any) -> None:
        """Once per fit, after the first training step: one error listing every registered callback's missing step outputs."""
        self._check_keys("step_outputs", outputs, "training_step's returned dict lacks keys", "training_step returned a {kind}, not a dict",
                         "return them from training_step (lightning_cit.ContinualModule.training_step does)")

    def _check_keys(self, field: str, got: Any, lack: str, not_mapping: str, fix: str) -> None:
        if field in self._checked:
            return
        self._checked.add(field)
        wanted = [(type(c).__name__, getattr(c.needs, field)) for c in self.callbacks if getattr(c.needs, field)]
        if not wanted:
            return
        if not isinstance(got, Mapping):
            problems = [f"{name} needs {list(keys)}: " + not_mapping.format(kind=type(got).__name__) for name, keys in wanted]
        else:
            problems = [f"{name} needs {[k for k in keys if k not in got]}" for name, keys in wanted if any(k not in got for k in keys)]
        if problems:
            raise ContractError(f"lightning-cit callbacks cannot run: {lack}; {fix}:\n  - " + "\n  - ".join(problems))

    def register_callback(self, callback: ContinualCallback) -> None:
        if any(c is callback for c in self.callbacks):
            return
        for earlier in self.callbacks:
            for first, then, why in ORDER:
                if first in callback.roles and then in earlier.roles:
                    order = ", ".join(type(c).__name__ for c in [*self.callbacks, callback])
                    raise ContractError(
                        f"{type(callback).__name__} must come before {type(earlier).__name__} in trainer.callbacks: {why} "
                        f"(order now: {order})"
                    )
        self.callbacks.append(callback)

    def register_service(self, name: str, provider: Any) -> None:
        current = self.services.get(name)
        if current is not None and current is not provider:
            raise ContractError(f"two callbacks provide the {name!r} service ({type(current).__name__} and {type(provider).__name__}); keep one")
        self.services[name] = provider

    def service(self, name: str) -> Any:
        return self.services.get(name)

    def register_scores_section(self, name: str, section: Any) -> None:
        """``section()`` returns a dict written under ``methods.<name>`` of ``scores.json`` with every row."""
        self.score_sections[name] = section

    def sections(self) -> dict[str, Any]:
        return {name: section() for name, section in self.score_sections.items()}

    def record_cost(self, label: str, *, forward_positions: int = 0, backward_positions: int = 0) -> None:
        """Passes a callback runs that no forward hook sees (e.g. an extra backward through the step's graph), for the cost meter."""
        meter = self.services.get("cost")
        if meter is not None:
            meter.add_passes(label, forward_positions, backward_positions)

    @contextlib.contextmanager
    def cost_scope(self, label: str) -> Iterator[None]:
        """Attribute the forwards and the CPU time inside this block to ``label`` (the outermost scope wins).

        Forwards outside any scope are the training step's own. A registered ``cost`` service (the
        :class:`~lightning_cit.callbacks.CostMeter`) receives the block's process CPU seconds; without one
        this only sets the label.
        """
        if _COST_SCOPE.get() is not None:  # nested: the outer caller owns the cost
            yield
            return
        token = _COST_SCOPE.set(label)
        start = time.process_time()
        try:
            yield
        finally:
            _COST_SCOPE.reset(token)
            meter = self.services.get("cost")
            if meter is not None:
                meter.add_cpu(label, time.process_time() - start)

    def task_ended(self, callback: ContinualCallback, clock: TaskClock) -> None:
        """Once every registered callback has ended the task, the ``fit``-style clock closes it."""
        if all(c._ended_task == clock.task for c in self.callbacks):
            clock.mark_ended()


# ============================================================================================ the module contract
def inference(method: Any) -> Any:
    """Run a forward-only method (evaluation, probes, rollouts) the way Lightning runs its own steps.

    ``torch.no_grad`` plus the trainer's precision context (autocast under ``*-mixed``). Under
    ``FSDPStrategy`` the call goes through the root FSDP module's forward (Lightning's forward
    redirection, as for ``training_step``): a callback calling inner FSDP units first would make one of
    them the root and break FSDP's lazy initialization, and the root's own parameters (embeddings,
    head) are only gathered by the root's forward. That redirection is Lightning's private
    ``strategy._forward_redirection``: there is no public hook for "run this module method as a step".
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        trainer = self._trainer
        if trainer is not None and _outside_fsdp_root_forward(trainer.strategy):
            strategy = trainer.strategy
            with torch.no_grad():  # no backward hooks from this forward
                return strategy._forward_redirection(strategy.model, self, method.__name__, *args, **kwargs)
        precision = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
        with torch.no_grad(), precision:
            return method(self, *args, **kwargs)

    return wrapper


def _outside_fsdp_root_forward(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(strategy, FSDPStrategy) or strategy.model is None or strategy.model is strategy.lightning_module:
        return False
    from torch.distributed.fsdp._common_utils import TrainingState

    return strategy.model.training_state == TrainingState.IDLE


class LossComponent:
    """A method's contribution to the training loss, registered with :meth:`ContinualModule.add_loss_component`.

    The step's loss starts as ``{"nll": task NLL}`` (prompt-only samples excluded). Each component's
    :meth:`loss_terms` returns named, already weighted terms that are added to it (each is logged as
    ``train/<name>``; the policy logits of the batch are passed in, so a term costs no second
    forward). Then :meth:`backward_loss` may replace the summed loss by the tensor to back-propagate,
    e.g. a gradient-surgery surrogate. Components run in registration order.
    """

    def loss_terms(self, module: Any, batch: dict[str, Any], logits: torch.Tensor, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def backward_loss(self, module: Any, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        return loss


class ContinualModule:
    """Mixin for a ``LightningModule`` with ``self.model`` (HF causal LM or ``PeftModel``) and ``self.tokenizer``.

    Put it first in the bases: ``class MyLM(ContinualModule, pl.LightningModule)``. In ``training_step``
    return :meth:`continual_loss` (or merge its dict into yours): callbacks read ``per_sample_loss`` and
    the batch's ``sample_ids``/``task_ids``/``source_ids`` from the step outputs, and registered loss
    components are applied. Set ``self.task_clock = TaskClock("epoch")`` for one fit over the sequence
    (the default is ``TaskClock("fit")``, one fit per task). If you override ``on_save_checkpoint`` /
    ``on_load_checkpoint``, call ``super()``: the task clock is saved there.

    Optional attributes: ``eval_batch_size`` (default 64), ``max_eval_length`` (tokens per evaluated
    prompt; default None: the DataModule's ``max_length``, else 2048; longer prompts keep their end, are
    counted and warned about once).
    """

    eval_batch_size: int = 64
    max_eval_length: int | None = None

    # ------------------------------------------------------------------ contract state
    @property
    def task_clock(self) -> TaskClock:
        clock = self.__dict__.get("_task_clock")
        if clock is None:
            clock = self.__dict__["_task_clock"] = TaskClock("fit")
        return clock

    @task_clock.setter
    def task_clock(self, clock: TaskClock) -> None:
        if not isinstance(clock, TaskClock):
            raise ConfigError(f"task_clock must be a lightning_cit.contract.TaskClock, got {type(clock).__name__}")
        self.__dict__["_task_clock"] = clock

    @property
    def continual(self) -> ContinualRegistry:
        registry = self.__dict__.get("_continual_registry")
        if registry is None:
            registry = self.__dict__["_continual_registry"] = ContinualRegistry()
        return registry

    @property
    def loss_components(self) -> list[LossComponent]:
        return self.__dict__.setdefault("_loss_components", [])

    def add_loss_component(self, component: LossComponent) -> None:
        """Register a :class:`LossComponent` (once); components run in registration order."""
        if all(c is not component for c in self.loss_components):
            self.loss_components.append(component)

    def register_trainable_module(self, name: str, module: torch.nn.Module) -> None:
        """A method's own trainable module (e.g. JFA's latent pool): trained, saved and moved with the model."""
        if getattr(self, name, None) is None:
            self.add_module(name, module)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["task_clock"] = self.task_clock.state_dict()
        router = self.continual.service("adapter_router")
        if router is not None:  # also needed by validate/test, where callback states are not restored
            checkpoint["adapter_router"] = router.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "task_clock" in checkpoint:
            self.task_clock.load_state_dict(checkpoint["task_clock"])
        router = self.continual.service("adapter_router")
        if router is not None and "adapter_router" in checkpoint:
            router.load_state_dict(checkpoint["adapter_router"])

    # ------------------------------------------------------------------ training
    def continual_loss(self, batch: dict[str, Any], logits: torch.Tensor | None, losses: tuple[torch.Tensor, torch.Tensor] | None = None,
                       chunk_tokens: int | None = None) -> dict[str, Any]:
        """The step's outputs: ``loss`` (token-mean NLL plus loss components) and ``per_sample_loss`` with ids.

        Prompt-only samples (stored prompts whose response is no target, e.g. JFA's flashbacks) are
        left out of the NLL. Return this dict (or merge it into yours) from ``training_step``. The per-sample
        losses come from ``logits`` (in chunks of ``chunk_tokens`` rows, no full float32 copy), or are given
        as ``losses=(per-sample losses, target counts)`` (e.g. :func:`lightning_cit.loss.per_sample_loss_from_hidden`;
        then no loss component can run: they need the logits).
        """
        from lightning_cit.loss import DEFAULT_CHUNK_TOKENS, per_sample_loss

        if losses is None:
            losses, counts = per_sample_loss(logits, batch["labels"], chunk_tokens or DEFAULT_CHUNK_TOKENS)
        else:
            losses, counts = losses
            if self.loss_components:
                raise ContractError("loss components need the logits: call continual_loss(batch, logits)")
        nll_counts = counts * ~batch["prompt_only"] if "prompt_only" in batch else counts
        loss = (losses * nll_counts).sum() / nll_counts.sum().clamp(min=1)
        if self.loss_components:
            terms = {"nll": loss}
            for component in self.loss_components:
                terms.update(component.loss_terms(self, batch, logits, dict(terms)))
            loss = sum(terms.values())
            for name, term in terms.items():
                self.log(f"train/{name}", term.detach(), batch_size=len(losses))
            for component in self.loss_components:
                loss = component.backward_loss(self, terms, loss)
        out = {"loss": loss, "per_sample_loss": losses.detach()}
        for key in ("sample_ids", "task_ids", "source_ids"):
            if key in batch:
                out[key] = batch[key]
        return out

    # ------------------------------------------------------------------ inference (what callbacks call)
    def eval_max_length(self) -> int:
        """Tokens per evaluated prompt: ``max_eval_length``, else the data's ``max_length`` (as in training), else 2048.

        Everything that reaches the model is cut to a limit: one 10 MB record in an eval split must not ask for
        petabytes (issue 16). Cuts keep a prompt's end, are counted (``collate.EVAL_TRUNCATED``) and warned about once.
        """
        if self.max_eval_length:
            return int(self.max_eval_length)
        trainer = self._trainer
        value = getattr(getattr(trainer, "datamodule", None), "max_length", None) if trainer is not None else None
        return value if isinstance(value, int) and value > 0 else 2048

    def probe_loss(self, samples: list[dict], max_length: int = 256) -> float:
        """Mean teacher-forced loss over ``samples`` (the cheap probe the controllers read)."""
        losses = self.sample_losses(samples, max_length)
        return float(sum(losses) / max(1, len(losses)))

    @inference
    def sample_losses(self, samples: list[dict], max_length: int | None = None) -> list[float]:
        """Teacher-forced loss of each sample (token mean over its response)."""
        from lightning_cit.loss import per_sample_loss

        # probes and eval losses have always been cut at 256 tokens (prompt cut from the left): comparable across releases
        collate = Collator(self.tokenizer, int(max_length or 256), [])
        out: list[float] = []
        for i in range(0, len(samples), self.eval_batch_size):
            batch = collate(samples[i : i + self.eval_batch_size])
            logits = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)).logits
            losses, _ = per_sample_loss(logits, batch["labels"].to(self.device))
            out.extend(losses.tolist())
        return out

    @inference
    def generate_answers(self, samples: list[dict], max_new_tokens: int, temperature: float = 0.0, synced_gpus: bool = False) -> list[str]:
        """Answers to each sample's prompt, batched with left padding (KV cache on).

        ``temperature`` 0 is greedy decoding; above 0 samples from the temperature-scaled softmax
        (no top-k / top-p truncation) with torch's global generator. ``synced_gpus`` keeps every rank
        stepping until all ranks are done (needed under FSDP FULL_SHARD, where every forward is a
        collective); callers pass equal-sized shards.
        """
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        if synced_gpus:
            sampling["synced_gpus"] = True
        answers: list[str] = []
        for i in range(0, len(samples), self.eval_batch_size):
            chunk = samples[i : i + self.eval_batch_size]
            batch = left_padded_prompts(tokenizer, [s["messages"] for s in chunk], pad_id, self.eval_max_length())
            output = self.model.generate(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            answers.extend(tokenizer.batch_decode(output[:, batch["input_ids"].size(1) :], skip_special_tokens=True))
        return answers

    @inference
    def choose_options(self, samples: list[dict]) -> list[int]:
        """Index of the option with the highest total log-likelihood as the answer to each prompt."""
        return [max(range(len(scores)), key=scores.__getitem__) for scores in self.option_log_likelihoods(samples)]

    @inference
    def option_log_likelihoods(self, samples: list[dict]) -> list[list[float]]:
        """Total log-likelihood of each option of each sample, the shared prompt read once per sample.

        Why one pass: re-reading a prompt once per option made multiple choice cost options x a loss pass.
        The prompts of a chunk are run once (left-padded, explicit positions) and their KV cache is
        repeated per option; the options (right-padded) are then run against it in one batch. The first
        option token is scored from the prompt's last logits. Scores equal :meth:`_option_log_likelihoods_per_option`
        (the per-option reference) up to float rounding; a prompt too long for ``max_eval_length`` is cut
        once for the sample's longest option, and all its options are scored against that cut
        (:func:`~lightning_cit.collate.encode_options`; counted in ``collate.EVAL_TRUNCATED``). Chunks hold
        ``eval_batch_size`` samples whatever their option counts, so every rank runs the same number of
        forwards for equal shards (FSDP FULL_SHARD); the option forward has at most ``eval_batch_size`` x options rows.
        """
        from lightning_cit.collate import encode_options

        if not samples:
            return []
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        per_chunk = max(1, int(self.eval_batch_size))
        limit = self.eval_max_length()
        out: list[list[float]] = []
        for start in range(0, len(samples), per_chunk):
            chunk = samples[start : start + per_chunk]
            encoded = [encode_options(tokenizer, s["messages"], [str(o) for o in s["options"]], limit) for s in chunk]
            count_eval_truncation("choose_options", sum(1 for _, _, cut in encoded if cut), limit)
            out.extend(self._score_shared_prompts([(p, opts) for p, opts, _ in encoded], pad_id))
        return out

    def _score_shared_prompts(self, encoded: list[tuple[list[int], list[list[int]]]], pad_id: int) -> list[list[float]]:
        device = self.device
        prompt_len = max(1, max(len(p) for p, _ in encoded))
        prompt_ids = torch.full((len(encoded), prompt_len), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(encoded), prompt_len), dtype=torch.long)
        for row, (p, _) in enumerate(encoded):
            if p:
                prompt_ids[row, prompt_len - len(p) :] = torch.tensor(p)
                prompt_mask[row, prompt_len - len(p) :] = 1
        rows = torch.tensor([row for row, (_, opts) in enumerate(encoded) for _ in opts], dtype=torch.long)
        options = [o for _, opts in encoded for o in opts]
        option_len = max(1, max(len(o) for o in options))
        option_ids = torch.full((len(options), option_len), pad_id, dtype=torch.long)
        option_mask = torch.zeros((len(options), option_len), dtype=torch.long)
        for row, o in enumerate(options):
            if o:
                option_ids[row, : len(o)] = torch.tensor(o)
                option_mask[row, : len(o)] = 1
        prompt_ids, prompt_mask, option_ids, option_mask, rows = (t.to(device) for t in (prompt_ids, prompt_mask, option_ids, option_mask, rows))
        # positions from the mask (left padding), as generate() does; the options continue from each prompt's length
        prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        first = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True, logits_to_keep=1)
        cache = first.past_key_values if getattr(first, "cache", None) is None else first.cache
        cache.batch_select_indices(rows)  # one copy of each prompt's keys/values per option, no recompute
        option_pos = prompt_mask.sum(-1)[rows].unsqueeze(1) + torch.arange(option_len, device=device).unsqueeze(0)
        second = self.model(input_ids=option_ids, attention_mask=torch.cat([prompt_mask[rows], option_mask], dim=1),
                            position_ids=option_pos, use_cache=True, **{_cache_argument(self.model): cache})
        # token t of an option is predicted by the prompt's last position (t = 0) or by option position t - 1
        logits = torch.cat([first.logits[:, -1][rows].unsqueeze(1), second.logits[:, :-1]], dim=1).float()
        token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), option_ids.reshape(-1), reduction="none")
        totals = (-(token.view(option_ids.shape) * option_mask)).sum(dim=1).tolist()
        scores: list[list[float]] = []
        for _, opts in encoded:
            scores.append(totals[: len(opts)])
            totals = totals[len(opts) :]
        return scores

    @inference
    def _option_log_likelihoods_per_option(self, samples: list[dict]) -> list[list[float]]:
        """The reference: every option scored with its own copy of the prompt (options x the prompt's cost)."""
        from lightning_cit.loss import per_sample_loss

        expanded = [
            {"messages": s["messages"], "response": str(option), "index": (i, j)}
            for i, s in enumerate(samples)
            for j, option in enumerate(s["options"])
        ]
        collate = Collator(self.tokenizer, self.eval_max_length(), [])
        scores: dict[tuple[int, int], float] = {}
        for start in range(0, len(expanded), self.eval_batch_size):
            chunk = expanded[start : start + self.eval_batch_size]
            batch = collate(chunk)
            logits = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)).logits
            losses, counts = per_sample_loss(logits, batch["labels"].to(self.device))
            for sample, loss, count in zip(chunk, losses.tolist(), counts.tolist()):
                scores[sample["index"]] = -loss * count
        count_eval_truncation("choose_options", sum(collate.truncated.values()), collate.max_length)
        return [[scores[(i, j)] for j in range(len(s["options"]))] for i, s in enumerate(samples)]

    def evaluate_samples(self, samples: list[dict], metric: str, max_new_tokens: int, synced_gpus: bool = False) -> dict[str, list]:
        """Per-sample ``scores`` (0..100), teacher-forced ``losses`` and ``predictions`` for one task.

        With an ``adapter_router`` service registered (instruction grouping) the prompts are answered by
        the adapter it picks for them.
        """
        router = self.continual.service("adapter_router")
        adapter = router.route(samples) if router is not None and samples else None
        active = getattr(self.model, "active_adapter", None)
        if adapter is None or adapter == active:
            return self._evaluate_samples(samples, metric, max_new_tokens, synced_gpus)
        if adapter == BASE_ADAPTER:  # the router's "no group fits": the base model answers
            with self.model.disable_adapter():
                return self._evaluate_samples(samples, metric, max_new_tokens, synced_gpus)
        self.model.set_adapter(adapter)
        try:
            return self._evaluate_samples(samples, metric, max_new_tokens, synced_gpus)
        finally:
            self.model.set_adapter(active)

    def _evaluate_samples(self, samples: list[dict], metric: str, max_new_tokens: int, synced_gpus: bool = False) -> dict[str, list]:
        losses = self.sample_losses(samples)
        if metric == MC_ACCURACY:
            chosen = self.choose_options(samples)
            predictions = [str(s["options"][c]) for s, c in zip(samples, chosen)]
            scores = [100.0 * (c == int(s["answer_index"])) for s, c in zip(samples, chosen)]
        else:
            predictions = self.generate_answers(samples, max_new_tokens, synced_gpus=synced_gpus)
            scorer = TEXT_METRICS[metric]
            scores = [scorer(p, s["response"]) for p, s in zip(predictions, samples)]
        return {"scores": scores, "losses": losses, "predictions": predictions}


def _cache_argument(model: Any) -> str:
    """The forward's name for a KV cache: ``cache`` from transformers 5.2x on, ``past_key_values`` before (removed in 5.40)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


# ============================================================================================ the data contract
@runtime_checkable
class ContinualData(Protocol):
    """What replay methods need from a DataModule (``ContinualInstructionDataModule`` implements it).

    Task metadata: ``task_names``, ``num_tasks``, ``train_tasks`` (:class:`~lightning_cit.tasks.TaskData`
    per trained task), ``evaluation_tasks()``, ``seed``. Steps: ``steps_for(k)`` optimizer steps of task
    ``k``, ``batches_for(k)`` its batches (× accumulation), ``task_start_step(k)`` its first global step.
    The replay memory: ``memory`` (:class:`~lightning_cit.replay.ReplayMemory`, the one owner of every
    buffer). The mixture plan per batch: ``set_mixture(weights, from_batch, task_index, entry_weights)``,
    ``has_decision(task, batch)``, ``draw_ahead`` (batches drawn before the step that trains on them).
    """

    seed: int

    @property
    def task_names(self) -> list[str]: ...

    @property
    def num_tasks(self) -> int: ...

    @property
    def draw_ahead(self) -> int: ...

    train_tasks: list[Any]
    memory: Any

    def evaluation_tasks(self) -> list[Any]: ...

    def steps_for(self, task_index: int) -> int: ...

    def batches_for(self, task_index: int) -> int: ...

    def task_start_step(self, task_index: int) -> int: ...

    def set_mixture(self, weights: list[float], from_batch: int, task_index: int | None = None,
                    entry_weights: dict[int, list[float]] | None = None) -> None: ...

    def has_decision(self, task_index: int, batch: int) -> bool: ...


DATA_TASKS = ("task_names", "num_tasks", "train_tasks", "seed")
DATA_MEMORY = DATA_TASKS + ("memory", "steps_for", "task_start_step")
DATA_MIXTURE = DATA_MEMORY + ("set_mixture", "has_decision", "batches_for", "draw_ahead")


def sharded(trainer: Any) -> bool:
    """Whether the strategy shards the model, so every forward (and each ``generate`` step) is a collective."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (a collective: every rank calls it); ``[obj]`` outside a distributed run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return [obj]
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts


@dataclass
class ShardPlan:
    """Equal-sized shards of a list for ``world`` ranks: rank ``r`` gets ``items[r::world]`` padded by repeats.

    Under FSDP FULL_SHARD every forward is a collective, so every rank must run the same number of
    forwards: short shards are padded with copies of their first item (or of ``items[0]``) and the
    padding is dropped from the results (``weights`` 0).
    """

    items: list[Any]
    world: int
    rank: int
    local: list[Any] = field(init=False)
    real: int = field(init=False)

    def __post_init__(self) -> None:
        self.local = list(self.items[self.rank :: self.world])
        self.real = len(self.local)
        size = -(-len(self.items) // self.world) if self.items else 0
        filler = self.local[0] if self.local else (self.items[0] if self.items else None)
        while len(self.local) < size:
            self.local.append(filler)

    def keep(self, values: list[Any]) -> list[Any]:
        return list(values[: self.real])


__all__ = [
    "BASE_ADAPTER",
    "ORDER",
    "ContinualCallback",
    "ContinualData",
    "ContinualModule",
    "ContinualRegistry",
    "ContractError",
    "LossComponent",
    "Needs",
    "ShardPlan",
    "TaskClock",
    "check_contract",
    "current_cost_scope",
    "gather_objects",
    "inference",
]
