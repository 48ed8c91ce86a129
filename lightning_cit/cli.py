"""The ``lightning-cit`` command: a LightningCLI for ``fit``/``validate``/``test``, plus tool subcommands.

``lightning-cit fit --config configs/quickstart.yaml`` trains a whole task sequence in one ``fit``.
Tool subcommands that are not Trainer entry points (``prepare-base`` here; later ``proxymix``,
``report``) are dispatched by name before LightningCLI sees the arguments: register one in
:data:`SUBCOMMANDS` as ``name -> "module:function"`` taking ``argv`` and returning an exit code.

The CLI sets ``trainer.max_epochs`` to the number of trained tasks (one epoch per task), turns on
``reload_dataloaders_every_n_epochs=1`` and ``use_distributed_sampler=False`` (the mixture sampler
is rank-aware itself), and reports bad input as one ``error:`` line with exit code 2.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from lightning_cit.errors import ConfigError

SUBCOMMANDS: dict[str, str] = {
    "prepare-base": "lightning_cit.base:main",
    "proxymix": "lightning_cit.callbacks.proxymix.commands:main",
    "convert-gguf": "lightning_cit.named_models:main",
    "report": "lightning_cit.report:main",
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


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, always ``weights_only=True``; a file that does not load is a :class:`ConfigError`."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location or (lambda storage, loc: storage), weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch/pickle/zip raise many types for a bad file
            raise checkpoint_error(path, err) from None


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
        # LightningCLI reads hyperparameters from a --ckpt_path file (weights_only=True) before anything else
        try:
            super()._parse_ckpt_path()
        except Exception as err:  # noqa: BLE001 - as in SafeCheckpointIO
            raise checkpoint_error(self.config[self.config.subcommand].get("ckpt_path"), err) from None

    def before_fit(self) -> None:
        # read every task file now, so malformed data fails before any model is built or file written
        self.datamodule.load_tasks()


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
    try:
        _check_class_paths(argv)
        CITCLI(args=argv if explicit else None)
    except Exception as err:
        # jsonargparse wraps errors raised in a class's __init__ (e.g. a callback's) in its own ValueError
        config_error = _find_config_error(err)
        if config_error is None:
            raise
        print(f"error: {config_error}", file=sys.stderr)
        return 2
    return 0


def _find_config_error(err: BaseException | None) -> ConfigError | None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
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
