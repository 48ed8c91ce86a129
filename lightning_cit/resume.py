"""The resume rule: a run resumed with ``--ckpt_path`` must be the run that wrote the checkpoint.

Explicit arguments are never silently replaced by the checkpoint's, and the checkpoint's state is never
silently applied to a different run. Any difference is refused with one error naming every differing
item with its checkpoint value and its value in this run:

- the model's hyperparameters (``model.*``), except :data:`FREE_MODEL_KEYS` (how evaluation is batched
  and where a base is cached: they do not change what is trained);
- the DataModule's settings (:data:`DATA_SETTINGS`);
- every task's definition (``data.tasks[*]``, field by field) and a fingerprint of its data (a sha256 over
  its normalized train/eval/probe samples), so an edited data file is named by its task;
- the mixture controller (a checkpoint has state for the controller it was trained with).

The DataModule checks its part again in ``load_state_dict`` (for plain-Lightning users); the CLI checks
everything before training starts (:func:`check_resume`).
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, is_dataclass
from typing import Any

from lightning_cit.errors import ConfigError

FREE_MODEL_KEYS = frozenset({"eval_batch_size", "base_cache_dir"})
"""Model arguments that may differ on resume: they change how evaluation is batched or where files are cached."""

DATA_SETTINGS = ("global_batch_size", "steps_per_task", "buffer_size", "buffer_policy", "max_length", "seed")
"""DataModule arguments stored in its checkpoint state and compared on resume."""


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        return _plain(value.as_dict())
    return value


def _differences(prefix: str, saved: dict[str, Any], current: dict[str, Any], skip: frozenset[str] = frozenset()) -> list[str]:
    keys = [k for k in dict.fromkeys([*saved, *current]) if k not in skip]
    return [f"{prefix}{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def data_state_mismatches(datamodule: Any, state: dict[str, Any]) -> list[str]:
    """What differs between a DataModule checkpoint state and ``datamodule`` (empty when they match)."""
    problems: list[str] = []
    if "settings" in state:
        problems += _differences("data.", state["settings"], data_settings(datamodule))
    saved_tasks = {t["name"]: t for t in state.get("tasks", [])}
    saved_names = [t["name"] for t in state.get("tasks", []) if t.get("train", True)]
    if saved_names and saved_names != datamodule.task_names:
        problems.append(f"trained tasks: checkpoint {saved_names}, this run {datamodule.task_names}")
        return problems
    fingerprints = state.get("fingerprints") or {}
    for spec in datamodule.specs:
        saved = saved_tasks.get(spec.name)
        if saved is None:
            continue
        changed = _differences("", saved, asdict(spec))
        if changed:
            problems.append(f"task {spec.name!r} changed: " + "; ".join(changed))
        elif spec.name in fingerprints and fingerprints[spec.name] != task_fingerprints(datamodule).get(spec.name):
            problems.append(f"task {spec.name!r}: its data changed since the checkpoint (same definition, different samples)")
    return problems


def data_settings(datamodule: Any) -> dict[str, Any]:
    return {key: getattr(datamodule, key) for key in DATA_SETTINGS}


def task_fingerprints(datamodule: Any) -> dict[str, str]:
    """sha256 of each task's normalized samples (cached on the loaded :class:`~lightning_cit.tasks.TaskData`)."""
    datamodule.load_tasks()
    return {task.spec.name: task.fingerprint() for task in datamodule.train_tasks + datamodule.eval_only_tasks}


def refuse(problems: list[str], where: str) -> None:
    if problems:
        raise ConfigError(
            f"cannot resume from {where}: this run differs from the one that wrote it ({' | '.join(problems)}). "
            "Resume with the checkpoint's settings, or start a new run in another trainer.default_root_dir"
        )


def resolve_checkpoint(trainer: Any, ckpt_path: str) -> str | None:
    """The file ``--ckpt_path`` names (``last``: the newest ``last*.ckpt`` of the checkpoint callbacks), or None."""
    if ckpt_path == "last":
        from lightning.pytorch.callbacks import ModelCheckpoint

        candidates = []
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                candidates += glob.glob(os.path.join(glob.escape(str(callback.dirpath)), f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}"))
        return max(candidates, key=os.path.getmtime) if candidates else None
    return ckpt_path if os.path.isfile(ckpt_path) else None


def check_resume(trainer: Any, model: Any, datamodule: Any, ckpt_path: str) -> None:
    """Refuse a ``fit --ckpt_path`` whose checkpoint was written by a different run (see module docstring)."""
    from lightning_cit.callbacks import MixtureController
    from lightning_cit.cli import _load_checkpoint, checkpoint_error

    path = resolve_checkpoint(trainer, ckpt_path)
    if path is None:
        return  # nothing to resume (Lightning says so and starts from the beginning) or a path Lightning reports
    try:
        checkpoint = _load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - as in SafeCheckpointIO
        raise checkpoint_error(path, err) from None
    problems = []
    if "hyper_parameters" in checkpoint:  # (a checkpoint written by another tool may have none: nothing to compare)
        problems += _differences("model.", _plain(checkpoint["hyper_parameters"]), _plain(dict(model.hparams)), FREE_MODEL_KEYS)
    state = checkpoint.get(type(datamodule).__qualname__)
    if isinstance(state, dict):
        problems += data_state_mismatches(datamodule, state)
    saved_callbacks = set(checkpoint.get("callbacks") or {})
    for callback in trainer.callbacks:
        if isinstance(callback, MixtureController) and callback.state_key not in saved_callbacks:
            problems.append(f"controller: this run's {callback.state_key} has no state in the checkpoint (its callbacks: {sorted(saved_callbacks)})")
    refuse(problems, repr(path))
