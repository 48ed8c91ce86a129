"""The ``lightning-cit`` command: a LightningCLI for ``fit``/``validate``/``test``, plus tool subcommands.

``lightning-cit fit --config configs/quickstart.yaml`` trains a whole task sequence in one ``fit``.
Tool subcommands that are not Trainer entry points (``prepare-base`` here; later ``proxymix``,
``report``) are dispatched by name before LightningCLI sees the arguments: register one in
:data:`SUBCOMMANDS` as ``name -> "module:function"`` taking ``argv`` and returning an exit code.

The CLI sets ``trainer.max_epochs`` to the number of trained tasks (one epoch per task), turns on
``reload_dataloaders_every_n_epochs=1`` and ``use_distributed_sampler=False`` (the mixture sampler
is rank-aware itself), and reports bad input as one ``error:`` line with exit code 2.

Reliability (README "Reliability"): ``fit`` holds an exclusive lock on ``default_root_dir`` for the
whole run (a second run into the same directory is refused); checkpoints are written to a temporary
file in their own directory, fsynced and renamed; every run gets ``FiniteLossGuard`` (a NaN/inf loss
stops it, exit 1) and ``SignalCheckpoint`` (SIGTERM saves ``last.ckpt`` and exits 143); and a resume
(``--ckpt_path``) must match the checkpoint: model hyperparameters, data settings, every task's
definition and data fingerprint, and the controller. A difference is refused, naming it.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from lightning_cit.errors import ConfigError, RunError

SUBCOMMANDS: dict[str, str] = {
    "prepare-base": "lightning_cit.base:main",
    "proxymix": "lightning_cit.callbacks.proxymix.commands:main",
    "convert-gguf": "lightning_cit.named_models:main",
    "report": "lightning_cit.report:main",
    "compare": "lightning_cit.compare:main",
    "cache": "lightning_cit.cache:main",
}

TRAINER_DEFAULTS: dict[str, Any] = {
    "use_distributed_sampler": False,
    "reload_dataloaders_every_n_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


def checkpoint_error(path: Any, err: BaseException) -> ConfigError:
    """A checkpoint that does not load (damaged, truncated, or holding more than tensors and plain values) as one line."""
    if isinstance(err, FileNotFoundError):
        return ConfigError(f"checkpoint {str(path)!r} does not exist")
    paragraphs = [part.strip() for part in str(err).split("\n\n") if part.strip()]
    if len(paragraphs) > 1 and paragraphs[0].startswith("Weights only load failed"):
        paragraphs = paragraphs[1:]  # torch's boilerplate; the next paragraph names the global it refused
    reason = paragraphs[0].splitlines()[0] if paragraphs else "the file is empty or truncated"
    return ConfigError(
        f"cannot load checkpoint {str(path)!r} ({type(err).__name__}: {reason[:200]}). Checkpoints load with "
        "torch.load(weights_only=True), tensors and plain Python values only: this file is damaged, truncated, or was not "
        "written by lightning-cit. Load only checkpoints you made."
    )


TEMP_SUFFIX = ".lightning-cit-tmp"
"""Suffix of the temporary file a checkpoint is written to (in the checkpoint's own directory) before the rename."""

LOCK_FILE = ".lightning-cit.lock"
"""The lock file ``fit`` creates in ``default_root_dir`` and holds (``flock``) while it runs."""


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, always ``weights_only=True`` and atomic on local disks.

    A file that does not load is a :class:`ConfigError`. Saving writes a temporary file in the target's
    own directory (never ``$TMPDIR``, which may be another filesystem, where the final step would be a
    copy), fsyncs it and ``os.replace``-s it over the target: a kill at any moment leaves the previous
    checkpoint whole. A failed write (a full disk) removes its temporary file and raises a :class:`RunError`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote storage: fsspec's transaction
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        except OSError as err:
            raise RunError(f"cannot write checkpoint {str(path)!r}: {err.strerror or err}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                self._write(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a power loss
            finally:
                os.close(directory)
        except BaseException as err:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, RunError):
                # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ...") whose context is
                # the OSError: name that cause
                reason = _os_error_reason(err) or _full_disk(path.parent) or (str(err).splitlines() or [type(err).__name__])[0]
                raise RunError(
                    f"cannot write checkpoint {str(path)!r} ({reason}); nothing partial was left behind and the previous "
                    "checkpoint is intact. Free space (or fix permissions) and resume with --ckpt_path last"
                ) from None
            raise

    def _write(self, checkpoint: dict[str, Any], handle: Any) -> None:
        """Serialize ``checkpoint`` into the open temporary file (a seam for tests that kill mid-write)."""
        import torch

        torch.save(checkpoint, handle)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location or (lambda storage, loc: storage), weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch/pickle/zip raise many types for a bad file
            raise checkpoint_error(path, err) from None


def _os_error_reason(err: BaseException) -> str | None:
    """The ``strerror`` of the first ``OSError`` in ``err``'s chain of causes and contexts, if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        err = err.__cause__ or err.__context__
    return None


def _full_disk(directory: Path) -> str | None:
    """"No space left on device" when the checkpoint's filesystem has under 1 MiB free (a writer that hid the OSError)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    return f"No space left on device ({free} bytes free)" if free < 2**20 else None


class CITCLI(LightningCLI):
    """LightningCLI over :class:`~lightning_cit.ContinualLM` and the continual DataModule."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from lightning_cit.datamodules import ContinualInstructionDataModule
        from lightning_cit.module import ContinualLM

        kwargs.setdefault("trainer_defaults", dict(TRAINER_DEFAULTS))
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(ContinualLM, ContinualInstructionDataModule, *args, **kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        tasks = self.datamodule.num_tasks
        if config.get("max_epochs") not in (None, -1, tasks):
            raise ConfigError(
                f"trainer.max_epochs={config['max_epochs']} but the sequence has {tasks} trained tasks; one epoch is one "
                "task, so leave trainer.max_epochs unset"
            )
        config["max_epochs"] = tasks
        _check_callbacks(config.get("callbacks") or [], self.subcommand)
        if self.subcommand == "fit":
            config["callbacks"] = _with_guards(config.get("callbacks") or [])
        for key, value in TRAINER_DEFAULTS.items():
            if key in ("use_distributed_sampler", "reload_dataloaders_every_n_epochs") and config.get(key) != value:
                raise ConfigError(f"trainer.{key} must be {value} for continual runs (the mixture sampler handles ranks and tasks)")
        if self.subcommand == "fit" and config.get("limit_val_batches") is None:
            # during fit the ForgettingEvaluator scores every task; the validate loop is for `lightning-cit validate`
            config["limit_val_batches"] = 0
        if getattr(self.model, "lora", None):
            # the base is frozen: checkpoints keep the adapters only (the base is rebuilt on resume, fingerprint-checked)
            from lightning_cit.callbacks.adapter_checkpoint import AdapterOnlyCheckpoint

            given = config.get("callbacks") or []
            given = given if isinstance(given, list) else [given]
            if not any(isinstance(c, AdapterOnlyCheckpoint) for c in [*given, *callbacks]):
                config["callbacks"] = [*given, AdapterOnlyCheckpoint()]
        trainer = super()._instantiate_trainer(config, callbacks)
        _check_batch_division(trainer, self.datamodule)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own checkpoint IO is left alone
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        for callback in trainer.checkpoint_callbacks:
            # a fixed directory, so that `--ckpt_path last` finds last.ckpt from a later invocation of the same run
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
            if type(callback) is ModelCheckpoint and getattr(callback, "_every_n_train_steps", 0):
                rank_zero_warn(
                    "a ModelCheckpoint with every_n_train_steps can save on a task's last step; resuming from such a checkpoint "
                    "skips that task's end (score row, buffers). Use lightning_cit.callbacks.TaskCheckpoint instead."
                )
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model's arguments by a --ckpt_path file's hyperparameters (weights_only=True)
        # before anything else. For `fit` that would silently drop explicit arguments; instead the resume is
        # checked against the checkpoint in before_fit and any difference is refused (the resume rule).
        try:
            if self.config.get("subcommand") == "fit":
                path = self.config.fit.get("ckpt_path")
                if path and Path(path).is_file():
                    _load_checkpoint(path)
                return
            super()._parse_ckpt_path()
        except Exception as err:  # noqa: BLE001 - as in SafeCheckpointIO
            raise checkpoint_error(self.config[self.config.subcommand].get("ckpt_path"), err) from None

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:  # the run lock is released when the run ends, however it ends (the process may go on: tests, notebooks)
            lock = getattr(self, "_run_lock", None)
            if lock is not None:
                lock.close()
                self._run_lock = None

    def before_fit(self) -> None:
        # read every task file now, so malformed data fails before any model is built or file written
        self.datamodule.load_tasks()
        self._run_lock = lock_run_dir(self.trainer.default_root_dir)
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                remove_stale_temporaries(callback.dirpath)
        ckpt_path = self.config_init["fit"].get("ckpt_path")
        if ckpt_path:
            from lightning_cit.resume import check_resume

            check_resume(self.trainer, self.model, self.datamodule, ckpt_path)


def _load_checkpoint(path: Any) -> dict[str, Any]:
    import torch

    return torch.load(path, weights_only=True, map_location="cpu", mmap=True)


def _check_callbacks(callbacks: list[Any], subcommand: str | None) -> None:
    """Two mixture controllers are refused; a run without a controller or an evaluator is told what it will not do."""
    from lightning_cit.callbacks import ForgettingEvaluator, MixtureController

    controllers = [type(c).__name__ for c in callbacks if isinstance(c, MixtureController)]
    if len(controllers) > 1:
        raise ConfigError(
            f"trainer.callbacks has {len(controllers)} mixture controllers ({', '.join(controllers)}); one run has one "
            "controller (the first to decide would win and the others be ignored): keep one"
        )
    if subcommand != "fit":
        return
    if not controllers:
        rank_zero_warn(
            "no mixture controller in trainer.callbacks: every task trains on its own data only, no replay of earlier tasks "
            "(add lightning_cit.callbacks.NoReplay to say so explicitly, or FixedRatio/... to replay)"
        )
    if not any(isinstance(c, ForgettingEvaluator) for c in callbacks):
        rank_zero_warn(
            "no ForgettingEvaluator in trainer.callbacks: no task is scored, no scores.json is written and controllers "
            "that read probe losses get none (add lightning_cit.callbacks.ForgettingEvaluator)"
        )


def _with_guards(callbacks: list[Any]) -> list[Any]:
    """The configured callbacks with ``FiniteLossGuard`` first and ``SignalCheckpoint`` (unless configured already)."""
    from lightning_cit.callbacks.guards import FiniteLossGuard, SignalCheckpoint

    callbacks = list(callbacks)
    if not any(isinstance(c, FiniteLossGuard) for c in callbacks):
        callbacks.insert(0, FiniteLossGuard())
    if not any(isinstance(c, SignalCheckpoint) for c in callbacks):
        callbacks.append(SignalCheckpoint())
    return callbacks


def _check_batch_division(trainer: Any, datamodule: Any) -> None:
    """``global_batch_size`` must divide over the devices, checked before any DDP process is started."""
    world = int(getattr(trainer, "num_nodes", 1) or 1) * int(getattr(trainer, "num_devices", 1) or 1)
    accumulate = trainer.accumulate_grad_batches
    size = getattr(datamodule, "global_batch_size", None)
    if isinstance(size, int) and size % (world * accumulate):
        raise ConfigError(
            f"data.global_batch_size={size} is not divisible by the {world} devices x trainer.accumulate_grad_batches "
            f"({accumulate}); choose sizes whose product divides it"
        )


def _is_launcher_process() -> bool:
    """The process that holds the run lock: not a worker of rank > 0 (started by Lightning, torchrun, srun or mpirun)."""
    names = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    return all(os.environ.get(name, "0") == "0" for name in names)


def lock_run_dir(root: str | os.PathLike) -> Any:
    """Take the run lock of ``root`` (created if missing); returns the open lock file, held until the process exits.

    ``fcntl.flock`` is released by the kernel when the process dies, so a killed run never blocks the next one.
    """
    if not _is_launcher_process():
        return None
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole run
    except OSError as err:
        reason = "not a directory" if isinstance(err, (NotADirectoryError, FileExistsError)) else err.strerror
        raise ConfigError(f"trainer.default_root_dir {str(root)!r} cannot be written ({reason}); choose a writable directory") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(
                f"another lightning-cit run is using trainer.default_root_dir {str(root)!r} (it holds {LOCK_FILE}); "
                "wait for it to finish or choose another directory"
            ) from None
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    if not os.access(root, os.W_OK):
        raise ConfigError(f"trainer.default_root_dir {str(root)!r} is not writable")
    return handle


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete checkpoint temporaries a killed run left in ``directory`` (only our own ``*.lightning-cit-tmp`` files).

    Called with the run lock held, so no other run can be writing them.
    """
    removed = []
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.glob(f".*{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed


def _check_class_paths(argv: list[str]) -> None:
    """Unknown ``lightning_cit.*`` class paths get a message listing the valid names."""
    import yaml

    texts = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            try:
                with open(argv[i + 1], encoding="utf-8") as handle:
                    texts.append(handle.read())
            except OSError as err:
                raise ConfigError(f"cannot read config {argv[i + 1]!r}: {err.strerror}") from None
        elif arg.startswith("--config="):
            with open(arg.split("=", 1)[1], encoding="utf-8") as handle:
                texts.append(handle.read())
    paths: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "class_path" and isinstance(value, str):
                    paths.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for text in texts:
        try:
            walk(yaml.safe_load(text))
        except yaml.YAMLError as err:
            raise ConfigError(f"config is not valid YAML: {err}") from None
    for path in paths:
        module_name, _, name = path.rpartition(".")
        if not module_name.startswith("lightning_cit"):
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ConfigError(f"unknown module in class_path {path!r}") from None
        if not hasattr(module, name):
            public = sorted(
                n for n in getattr(module, "__all__", dir(module))
                if isinstance(getattr(module, n, None), type) and n not in ("MixtureController", "MixtureSignals")
            )
            kind = "controller or callback" if module_name.endswith("callbacks") else "class"
            raise ConfigError(f"unknown {kind} {name!r} in class_path {path!r}; valid: {', '.join(public)}")


def main(argv: list[str] | None = None) -> int:
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("lightning-cit: continual instruction tuning on PyTorch Lightning\n")
        print("Trainer subcommands (LightningCLI): fit, validate, test, predict  -- e.g. lightning-cit fit --config configs/quickstart.yaml")
        print("Tool subcommands: " + ", ".join(SUBCOMMANDS) + "  -- e.g. lightning-cit prepare-base --help\n")
        if not argv:
            return 0
    if argv and argv[0] in SUBCOMMANDS:
        module_name, _, function = SUBCOMMANDS[argv[0]].partition(":")
        return int(getattr(importlib.import_module(module_name), function)(argv[1:]) or 0)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_cit.callbacks.guards import SIGTERM_EXIT_CODE

    try:
        _check_class_paths(argv)
        CITCLI(args=argv if explicit else None)
    except SIGTERMException:
        if _is_launcher_process():  # once, not once per DDP rank
            print("error: stopped by SIGTERM before the run finished; the last checkpoint is in place: rerun the same "
                  "command with --ckpt_path last to resume exactly", file=sys.stderr)
        return SIGTERM_EXIT_CODE
    except Exception as err:
        # jsonargparse wraps errors raised in a class's __init__ (e.g. a callback's) in its own ValueError
        config_error = _find_config_error(err)
        if isinstance(config_error, RunError):
            print(f"error: {config_error}", file=sys.stderr)
            return 1
        if config_error is None:
            raise
        print(f"error: {config_error}", file=sys.stderr)
        return 2
    return 0


def _find_config_error(err: BaseException | None) -> ConfigError | RunError | None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (ConfigError, RunError)):
            return err
        if isinstance(err, MisconfigurationException):  # Lightning's own "this setting is wrong" (e.g. a callback's argument)
            return ConfigError(str(err).strip().replace("\n", " "))
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def resolve_config(configs: Any, *args: str, subcommand: str = "fit") -> dict[str, Any]:
    """What ``lightning-cit SUBCOMMAND --config C1 --config C2 ... ARGS`` resolves to (its ``--print_config``), as a dict.

    Composed configs (a base plus overlays, later ones override) are read by jsonargparse itself; nothing is
    built. Benchmarks and tests use it to edit a composition as one config.
    """
    import contextlib
    import io
    import warnings

    import yaml

    argv = [subcommand]
    for config in configs:
        argv += ["--config", str(config)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        try:
            code = main([*argv, *args, "--print_config"])
        except SystemExit as exit_:
            code = exit_.code
    if code:
        raise ConfigError(f"{' '.join(argv)} does not resolve (exit code {code})")
    return yaml.safe_load(out.getvalue())


if __name__ == "__main__":
    sys.exit(main())
