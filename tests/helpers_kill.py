"""Test helpers for the reliability tests: SIGKILL a run at a chosen point, and record what DDP ranks hold.

The kill point comes from the environment variable ``CIT_KILL_AT``, so one config runs uninterrupted
in-process (the reference and the resumed runs) and is killed in a subprocess that sets it. Before
dying the process writes the point it reached to ``CIT_KILL_MARK`` (a file path), so a test can tell a
kill at the requested point from a crash anywhere else. Points:

- ``step:N``: after optimizer step N (``on_train_batch_end``, before that step's periodic checkpoint);
- ``task_start:K`` / ``task_end:K``: at the start / end of task K (0-based); ``KillSwitch`` goes first in
  ``trainer.callbacks``, so no other callback has done its task-start / task-end work yet;
- ``eval:N``: inside the N-th task scored by the evaluator in this process (``Killable<Evaluator>``);
- ``decide:N``: inside the N-th controller decision of this process (``Killable<Controller>``);
- ``opr:N``: inside the N-th OPR answer batch of this process (during a rollout);
- ``jfa:N``: inside the N-th JFA reference generation of this process (flashbacks at a task end).

- ``last_write:N``: half-way through writing the N-th ``last.ckpt`` of this process (``KillingCheckpointIO``,
  given as ``trainer.plugins``: the CLI's atomic ``SafeCheckpointIO`` with a kill between two halves of the bytes).

With ``CIT_KILL_HOW=raise`` the point raises a ``RuntimeError`` instead (failure injection in-process); with
``CIT_KILL_HOW=term`` the process sends itself SIGTERM and carries on (what a scheduler's pre-emption does).
Under DDP every rank reaches the point; ``CIT_KILL_RANK0_ONLY=1`` or ``CIT_KILL_RANK=<local rank>`` limits it to one rank.

``Killable<Name>`` is ``lightning_cit.callbacks.<Name>`` with a kill check in front of the method that
does that work (a subclass built on first access; the library is not patched). A callback this table
does not know gets no kill point and behaves exactly as its base class.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import signal
import sys
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_cit.cli import SafeCheckpointIO

KILL_ENV = "CIT_KILL_AT"
MARK_ENV = "CIT_KILL_MARK"
_calls: collections.Counter[str] = collections.Counter()


def maybe_kill(point: str, value: int | None = None) -> None:
    """SIGKILL this process if ``CIT_KILL_AT`` names ``point`` and ``value`` (or the point's call count) matches."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, wanted = spec.partition(":")
    if name != point:
        return
    if value is None:
        _calls[point] += 1
        value = _calls[point]
    if value != int(wanted):
        return
    if os.environ.get("CIT_KILL_RANK0_ONLY") == "1" and os.environ.get("LOCAL_RANK", "0") != "0":
        return  # the signal reaches rank 0 only
    if os.environ.get("CIT_KILL_RANK") not in (None, os.environ.get("LOCAL_RANK", "0")):
        return  # the signal reaches that rank only
    how = os.environ.get("CIT_KILL_HOW")
    if how == "raise":  # failure injection: an exception instead of a kill
        raise RuntimeError(f"injected failure at {spec}")
    mark = os.environ.get(MARK_ENV)
    if mark:
        with open(mark, "w") as handle:
            handle.write(spec)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGTERM if how == "term" else signal.SIGKILL)


class KillSwitch(Callback):
    """Kills at a global step or a task boundary (put it first in ``trainer.callbacks``)."""

    def on_fit_start(self, trainer, pl_module):
        _calls.clear()  # counted points count from the start of this fit (several fits run in one test process)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        maybe_kill("step", trainer.global_step)

    def on_train_epoch_start(self, trainer, pl_module):
        maybe_kill("task_start", trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module):
        maybe_kill("task_end", trainer.current_epoch)


class KillingCheckpointIO(SafeCheckpointIO):
    """``SafeCheckpointIO`` whose ``last.ckpt`` writes can be killed half-way (kill point ``last_write:N``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self._target = os.path.basename(str(path))
        super().save_checkpoint(checkpoint, path, storage_options)

    def _write(self, checkpoint: dict[str, Any], handle: Any) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        if self._target.startswith("last"):
            maybe_kill("last_write")
        handle.write(data[len(data) // 2 :])


def _kill_points() -> list[tuple[type, str, str]]:
    from lightning_cit.callbacks import ForgettingEvaluator, JointFlashbackAdaptation, MixtureController, OnPolicyReplay

    return [
        (MixtureController, "decide", "decide"),
        (ForgettingEvaluator, "_score_task", "eval"),
        (OnPolicyReplay, "_answer", "opr"),
        (JointFlashbackAdaptation, "_reference_generate", "jfa"),
    ]


def _killable(base: type) -> type:
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": base.__doc__}
    cls = type(f"Killable{base.__name__}", (base,), namespace)
    for owner, method, point in _kill_points():
        if issubclass(base, owner):

            def wrapper(self, *args, _method=method, _point=point, **kwargs):
                maybe_kill(_point)
                return getattr(super(cls, self), _method)(*args, **kwargs)

            setattr(cls, method, wrapper)
    return cls


def __getattr__(name: str) -> Any:
    # class_path: helpers_kill.Killable<Name> -> a subclass of lightning_cit.callbacks.<Name>
    if name.startswith("Killable"):
        from lightning_cit import callbacks

        base = getattr(callbacks, name[len("Killable"):], None)
        if isinstance(base, type):
            cls = _killable(base)
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------- DDP


def digest(value: Any) -> str:
    """A stable hash of nested dicts/lists/tensors/numbers/strings (tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=str):
                h.update(repr(k).encode())
                feed(v[k])
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                feed(x)
            h.update(b"]")
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()


class RecordRankState(Callback):
    """Writes, per rank, the samples it trained on and digests of every piece of state at every task end.

    State: the DataModule's checkpoint state (mixture schedule, buffers, sampler position), each
    callback's ``state_dict`` (controllers, EMA, OPR history, JFA reference, evaluator rows; checkpoint
    callbacks and this recorder excepted), and the trainable parameters. Ranks must agree on all of it.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.seen: list[list[Any]] = []
        self.digests: list[dict[str, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append([trainer.current_epoch, trainer.global_step, batch["source_ids"].tolist(), batch["sample_ids"].tolist()])

    def on_train_epoch_end(self, trainer, pl_module):
        state = {"datamodule": digest(trainer.datamodule.state_dict()), "schedule": digest(trainer.datamodule.schedule)}
        for callback in trainer.callbacks:
            if callback is self or isinstance(callback, ModelCheckpoint):
                continue
            state[type(callback).__name__] = digest(callback.state_dict())
        state["trainable"] = digest({n: p for n, p in pl_module.named_parameters() if p.requires_grad})
        self.digests.append(state)

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"seen": self.seen, "digests": self.digests, "world_size": trainer.world_size}, handle)
