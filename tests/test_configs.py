"""The shipped configs: every composition resolves, and no "(default: X)" comment can drift from the code.

A run is a base config per setting plus, optionally, a method overlay (``configs/README.md``)::

    lightning-cit fit --config configs/base/cit_synth_lora.yaml --config configs/methods/jfa.yaml

:data:`COMPOSITIONS` is the table of every shipped composition with the callbacks it must resolve to, in
order (the overlay replaces ``trainer.callbacks`` as a whole). Each one is resolved in-process with
``--print_config`` (no model is built), about 0.2 s each.

:data:`BEFORE_COMPOSITION` pins each composition to the single file it replaced (as of commit
:data:`PINNED_COMMIT`): both must resolve to the same config, so runs and ``docs/results`` stay what they
were. It reads the old files with ``git show`` and skips outside a git checkout. When a config is changed
on purpose, drop its pin here (and regenerate the docs/results that used it).

Default comments: every comment in ``configs/`` (but ``configs/gpu/``) that says ``default: X`` must
belong to a key, either inline (``key: value  # ... (type: T, default: X)``) or in the comment block right
above the key, and ``X`` must equal the value the code uses when the key is left out: the parameter's
default in the signature of the class that reads it (``Trainer`` with the CLI's own defaults,
``ContinualLM``, the DataModule, the ``TaskSpec`` of ``data.tasks``, ``TinyLlama``, peft's
``LoraConfig``, a callback's ``class_path``), or the ``lightning-cit proxymix train`` parser's default.
Text after ``;`` explains the default and is not compared (``default: null; null = all``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from lightning_cit.cli import resolve_config

CB = "lightning_cit.callbacks."
EVAL_CKPT = [CB + "ForgettingEvaluator", CB + "TaskCheckpoint"]
LORA_BASE = "configs/base/cit_synth_lora.yaml"

# name -> (the --config files, in order; the callbacks they resolve to, in order)
COMPOSITIONS: dict[str, tuple[list[str], list[str]]] = {
    "quickstart": (["configs/quickstart.yaml"], [CB + "FixedRatio", *EVAL_CKPT]),
    "quickstart_no_replay": (["configs/quickstart.yaml", "configs/methods/no_replay.yaml"], [CB + "NoReplay", *EVAL_CKPT]),
    "mssr": (["configs/quickstart.yaml", "configs/methods/mssr.yaml"], [CB + "MSSRReplay", *EVAL_CKPT]),
    "cit_synth_lora": ([LORA_BASE], [CB + "FixedRatio", *EVAL_CKPT]),
    "lcia": ([LORA_BASE, "configs/methods/lcia.yaml"], [CB + "NoReplay", CB + "InstructionGrouping", CB + "DynamicEMA", *EVAL_CKPT]),
    "opr": ([LORA_BASE, "configs/methods/opr.yaml"], [CB + "SizeProportional", CB + "OnPolicyReplay", *EVAL_CKPT]),
    "jfa": ([LORA_BASE, "configs/methods/jfa.yaml"], [CB + "FixedRatio", CB + "JointFlashbackAdaptation", *EVAL_CKPT]),
    "proxymix_proxy": (["configs/proxymix/proxy.yaml"], [CB + "ProxyMixController", *EVAL_CKPT]),
    "proxymix_target": (["configs/proxymix/proxy.yaml", "configs/proxymix/target.yaml"], [CB + "ProxyMixController", *EVAL_CKPT]),
    "real_smollm2": (["configs/real/smollm2_sequence.yaml"], [CB + "FixedRatio", *EVAL_CKPT]),
    "jsonl_tasks": (["configs/examples/jsonl_tasks.yaml"], [CB + "FixedRatio", *EVAL_CKPT]),
    "compare_full": (["configs/quickstart.yaml", "configs/compare/full.yaml"], [CB + "FixedRatio", *EVAL_CKPT]),
    "compare_lora": ([LORA_BASE, "configs/compare/lora.yaml"], [CB + "FixedRatio", *EVAL_CKPT]),
    "compare_lora_general": ([LORA_BASE, "configs/compare/lora.yaml", "configs/compare/lora_general.yaml"], [CB + "FixedRatio", *EVAL_CKPT]),
    "compare_disjoint_full": (["configs/quickstart.yaml", "configs/compare/disjoint_full.yaml"], [CB + "FixedRatio", *EVAL_CKPT]),
    "compare_paraphrase_lcia": ([LORA_BASE, "configs/compare/lora.yaml", "configs/methods/lcia.yaml", "configs/compare/paraphrase_lcia.yaml"],
                                [CB + "NoReplay", CB + "InstructionGrouping", CB + "DynamicEMA", *EVAL_CKPT]),
    "compare_quick": (["configs/quickstart.yaml", "configs/compare/full.yaml", "configs/compare/quick.yaml"], [CB + "FixedRatio", *EVAL_CKPT]),
    "proxymix_mirror_64x1": (["configs/proxymix/proxy.yaml", "configs/proxymix/mirror_sequence.yaml", "configs/proxymix/mirror_shape_64x1.yaml"],
                              [CB + "FixedRatio", *EVAL_CKPT]),
    "proxymix_mirror_96x2": (["configs/proxymix/proxy.yaml", "configs/proxymix/mirror_sequence.yaml", "configs/proxymix/mirror_shape_96x2.yaml"],
                              [CB + "FixedRatio", *EVAL_CKPT]),
    "proxymix_mirror_128x2": (["configs/proxymix/proxy.yaml", "configs/proxymix/mirror_sequence.yaml", "configs/proxymix/mirror_shape_128x2.yaml"],
                              [CB + "FixedRatio", *EVAL_CKPT]),
    "proxymix_mirror_192x3": (["configs/proxymix/proxy.yaml", "configs/proxymix/mirror_sequence.yaml", "configs/proxymix/mirror_shape_192x3.yaml"],
                              [CB + "FixedRatio", *EVAL_CKPT]),
    "compare_proxymix_proxy": (["configs/quickstart.yaml", "configs/compare/full.yaml", "configs/compare/proxymix_proxy.yaml"],
                               [CB + "ProxyMixController", CB + "ForgettingEvaluator"]),
}
# the `lightning-cit proxymix train` configs: their episode's fit (fit_config plus the --config files of fit_args)
TRAIN_CONFIGS = {"configs/proxymix/train_controller.yaml": "proxymix_proxy", "configs/proxymix/oracle.yaml": "proxymix_target",
                 "configs/compare/proxymix_train.yaml": "compare_proxymix_proxy"}

PINNED_COMMIT = "c71ee3b264040ced920f82b7ca00209f16797154"  # the last commit with one file per config
BEFORE_COMPOSITION = {
    "quickstart": "configs/quickstart.yaml",
    "quickstart_no_replay": "configs/quickstart_no_replay.yaml",
    "mssr": "configs/mssr.yaml",
    "cit_synth_lora": "configs/cit_synth_lora.yaml",
    "lcia": "configs/lcia.yaml",
    "opr": "configs/opr.yaml",
    "jfa": "configs/jfa.yaml",
    "proxymix_proxy": "configs/proxymix/proxy.yaml",
    "proxymix_target": "configs/proxymix/transfer.yaml",
    "real_smollm2": "configs/real/smollm2_sequence.yaml",
    "jsonl_tasks": "configs/examples/jsonl_tasks.yaml",
}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # task sources and fit_config paths are relative to the repository root


_RESOLVED: dict[tuple[str, ...], dict[str, Any]] = {}


def resolved(*configs: str) -> dict[str, Any]:
    if configs not in _RESOLVED:
        _RESOLVED[configs] = resolve_config(configs)
    return _RESOLVED[configs]


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_composition_resolves_to_its_callbacks(name):
    configs, callbacks = COMPOSITIONS[name]
    config = resolved(*configs)
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == callbacks
    assert config["data"]["tasks"] and config["model"]["model"]


def test_every_config_file_is_in_a_composition_and_every_run_has_its_own_directory():
    used = {path for configs, _ in COMPOSITIONS.values() for path in configs} | set(TRAIN_CONFIGS)
    grids = {"configs/compare/grid.yaml"}  # the grid of `lightning-cit compare` (not a fit config; tests/test_compare.py loads it)
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if "gpu" not in p.parts} - grids
    assert shipped == used, "a config file that no composition uses, or a composition of a missing file"
    roots = [resolved(*configs)["trainer"]["default_root_dir"] for configs, _ in COMPOSITIONS.values()]
    assert len(set(roots)) == len(roots), "two compositions write (and resume) in the same default_root_dir"


@pytest.mark.parametrize("path", list(TRAIN_CONFIGS))
def test_proxymix_train_configs_run_the_right_episode_config(path):
    from lightning_cit.callbacks.proxymix.commands import train_parser

    args = train_parser().parse_args(["--config", path])
    fit_args = list(args.fit_args)
    configs = [args.fit_config] + [fit_args[i + 1] for i, arg in enumerate(fit_args) if arg == "--config"]
    assert tuple(configs) == tuple(COMPOSITIONS[TRAIN_CONFIGS[path]][0])
    assert resolved(*configs)["trainer"]["callbacks"][0]["class_path"] == CB + "ProxyMixController"


def test_benchmarks_use_shipped_compositions():
    """The sweeps behind docs/results run shipped compositions (resolved as above), and the real-data sweep finds
    each method's init_args in its overlay."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cit_synth
        import proxymix as proxymix_benchmark
        import real_sequence
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    shipped = {tuple(configs) for configs, _ in COMPOSITIONS.values()}
    used = [suite["config"] for suite in cit_synth.SUITES.values()] + [proxymix_benchmark.TRANSFER, proxymix_benchmark.PROXY]
    assert all(tuple(configs) in shipped for configs in used), used
    assert tuple(real_sequence.CONFIG.split()) in shipped
    methods = real_sequence.real_methods()
    assert methods["MSSR"]["controller"]["init_args"]["lambda_0"] == 0.04  # read from configs/methods/mssr.yaml


def _git_show(path: str) -> str | None:
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", "-C", str(REPO), "show", f"{PINNED_COMMIT}:{path}"], capture_output=True, text=True, check=False)
    return proc.stdout if proc.returncode == 0 else None


@pytest.mark.parametrize("name", list(BEFORE_COMPOSITION))
def test_composition_resolves_like_the_file_it_replaced(name, tmp_path):
    text = _git_show(BEFORE_COMPOSITION[name])
    if text is None:
        pytest.skip(f"no git history with {PINNED_COMMIT[:7]}")
    old = tmp_path / "old.yaml"
    old.write_text(text, encoding="utf-8")
    assert resolved(*COMPOSITIONS[name][0]) == _as_shipped_after_issue18(name, resolve_config([old]))


def _as_shipped_after_issue18(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The old file under today's defaults, plus what issue 18 set on purpose in the shipped configs.

    ``ForgettingEvaluator``'s default became ``score: needed``; the shipped configs whose results are in
    ``docs/results`` set ``score: all`` (the old behaviour), the JSONL example shows the new default.
    ``TaskCheckpoint`` keeps the last 2 mid-task checkpoints (``keep_mid_task: 2``) where it writes them.
    """
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ForgettingEvaluator") and name != "jsonl_tasks":
            callback["init_args"]["score"] = "all"
        if callback["class_path"].endswith("TaskCheckpoint") and callback["init_args"].get("every_n_train_steps"):
            callback["init_args"]["keep_mid_task"] = 2  # the retention policy issue 18 added
        if callback["class_path"].endswith("MSSRReplay"):  # issue 19: the paper's hazards, per review interval
            callback["init_args"].update({"alpha": 0.01, "gamma_d": 0.2, "hazard_unit": "review",
                                          "paper_review_interval": 1024 / (256 * 0.3), "budget": None})
    return config


# ------------------------------------------------------------------------------------------ default comments
def _signature_defaults(obj: Any) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(obj).parameters.items() if p.default is not inspect.Parameter.empty}


def _dataclass_defaults(cls: Any) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _annotation_class(function: Any, name: str) -> Any:
    """The dataclass in a parameter's annotation (``tasks: list[TaskSpec]`` -> TaskSpec, ``TinyLlama | None`` -> TinyLlama)."""
    todo = [typing.get_type_hints(function)[name]]
    while todo:
        hint = todo.pop()
        if dataclasses.is_dataclass(hint):
            return hint
        todo.extend(typing.get_args(hint))
    raise AssertionError(f"no dataclass in the annotation of {name}")


def _fit_defaults() -> dict[tuple[str, ...], dict[str, Any]]:
    """Code defaults per section of a fit config: section path (list items as "[]") -> {key: default}."""
    from lightning.pytorch import Trainer
    from lightning_cit.datamodules import ContinualInstructionDataModule
    from peft import LoraConfig

    from lightning_cit.cli import TRAINER_DEFAULTS
    from lightning_cit.module import ContinualLM

    return {
        (): {"seed_everything": 0},  # CITCLI's seed_everything_default
        ("trainer",): {**_signature_defaults(Trainer.__init__), **TRAINER_DEFAULTS},
        ("model",): _signature_defaults(ContinualLM.__init__),
        ("model", "tiny"): _dataclass_defaults(_annotation_class(ContinualLM.__init__, "tiny")),
        ("model", "lora"): _dataclass_defaults(LoraConfig),
        ("data",): _signature_defaults(ContinualInstructionDataModule.__init__),
        ("data", "tasks", "[]"): _dataclass_defaults(_annotation_class(ContinualInstructionDataModule.__init__, "tasks")),
    }


def _train_defaults() -> dict[tuple[str, ...], dict[str, Any]]:
    from lightning_cit.callbacks.proxymix.commands import train_parser

    flat = train_parser().get_defaults().as_dict()
    out: dict[tuple[str, ...], dict[str, Any]] = {(): {}}
    for key, value in flat.items():
        if isinstance(value, dict):
            out[(key,)] = value
        else:
            out[()][key] = value
    return out


KEY = re.compile(r"^(?P<indent>\s*)(?P<dash>- )?(?P<key>[A-Za-z_][\w]*):(?P<rest>.*)$")
DEFAULT = re.compile(r"\bdefault: (?P<value>[^;)]*)")


def _inline_comment(rest: str) -> str:
    """The comment of a YAML line's value part (a '#' after whitespace, outside quotes)."""
    quote = None
    for i, char in enumerate(rest):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[i + 1:]
    return ""


def default_comments(path: Path) -> list[tuple[int, tuple[str, ...], str | None, str, str]]:
    """Every ``default: X`` of a YAML file's comments: (line, key path, class_path of the enclosing list item, key, X).

    A comment block belongs to the key right below it; a ``default:`` in a comment that belongs to no key
    is returned with key ``""`` (the test refuses it). List items are ``"[]"`` in the key path.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[tuple[int, tuple[str, ...], str | None, str, str]] = []
    stack: list[tuple[float, str, str | None]] = []  # (indent, key or "[]", the list item's class_path)
    pending: list[tuple[int, str]] = []  # the comment block above the current line

    def orphans() -> None:
        found.extend((n, (), None, "", m["value"].strip()) for n, comment in pending for m in DEFAULT.finditer(comment))

    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append((number, stripped[1:]))
            continue
        match = KEY.match(line)
        if not match:
            orphans()
            pending = []
            continue
        indent = len(match["indent"]) + (2 if match["dash"] else 0)
        while stack and stack[-1][0] >= (indent - 0.5 if match["dash"] else indent):
            stack.pop()  # a list item sits half a column left of its keys: its keys keep it, the next item closes it
        if match["dash"]:
            item = yaml.safe_load(_item_text(lines, number - 1, indent))
            stack.append((indent - 0.5, "[]", item.get("class_path") if isinstance(item, dict) else None))
        parents = tuple(key for _, key, _ in stack)
        cls = next((c for _, key, c in reversed(stack) if key == "[]"), None)
        comments = pending + [(number, _inline_comment(match["rest"]))]
        found.extend((n, parents, cls, match["key"], m["value"].strip()) for n, comment in comments for m in DEFAULT.finditer(comment))
        pending = []
        stack.append((indent, match["key"], None))
    orphans()
    return found


def _item_text(lines: list[str], start: int, indent: int) -> str:
    """The YAML text of the list item starting at ``lines[start]`` (its keys at column ``indent``), dedented."""
    out = [lines[start][indent:]]
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        out.append(line[indent:])
    return "\n".join(out)


def _same(documented: str, default: Any) -> bool:
    try:
        value = yaml.safe_load(documented)
    except yaml.YAMLError:
        value = documented
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(value) == float(default)
        except (TypeError, ValueError):
            return False
    if isinstance(default, (list, tuple)):
        return isinstance(value, list) and list(default) == value
    return value == default or (default is not None and str(default) == documented)


def _class_defaults(class_path: str) -> dict[str, Any]:
    import importlib

    module, _, name = class_path.rpartition(".")
    return _signature_defaults(getattr(importlib.import_module(module), name).__init__)


COMMENTED = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if "gpu" not in p.parts)


def drifted_comments(path: str) -> tuple[list[str], list[tuple[int, str, Any]]]:
    """Problems of a config's default comments, and the drifted ones as (line, documented, code default)."""
    sections = _train_defaults() if path in TRAIN_CONFIGS else _fit_defaults()
    problems, drifted = [], []
    for line, parents, cls, key, documented in default_comments(REPO / path):
        where = f"{path}:{line} {'.'.join(parents + (key,)) or '(no key)'}"
        if not key:
            problems.append(f"{where}: 'default: {documented}' in a comment that belongs to no key")
            continue
        defaults = _class_defaults(cls) if cls is not None and parents[-1:] == ("init_args",) else sections.get(parents)
        if defaults is None or key not in defaults:
            problems.append(f"{where}: 'default: {documented}' but the code has no default for this key")
        elif not _same(documented, defaults[key]):
            problems.append(f"{where}: comment says default {documented!r}, the code's default is {defaults[key]!r}")
            drifted.append((line, documented, defaults[key]))
    return problems, drifted


@pytest.mark.parametrize("path", COMMENTED)
def test_default_comments_match_the_code(path):
    problems, _ = drifted_comments(path)
    assert not problems, "\n".join(problems) + "\n(python tests/test_configs.py --fix rewrites the drifted values)"


def fix(path: str) -> int:
    """Rewrite every drifted ``default: X`` of ``path`` with the code's value; the number rewritten."""
    _, drifted = drifted_comments(path)
    lines = (REPO / path).read_text(encoding="utf-8").splitlines(keepends=True)
    for line, documented, default in drifted:
        value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines[line - 1] = lines[line - 1].replace(f"default: {documented}", f"default: {value}", 1)
    (REPO / path).write_text("".join(lines), encoding="utf-8")
    return len(drifted)


def test_the_checker_sees_every_kind_of_comment(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "# header (default: 1)\n\ntrainer:\n  # precision (type: str, default: 32-true)\n  precision: 32-true\n  callbacks:\n"
        "    - class_path: lightning_cit.callbacks.FixedRatio\n      init_args:\n        ratio: 0.1  # share (default: 0.2)\n"
        "data:\n  tasks:\n    - name: a  # (type: str)\n      eval_size: 8  # held out (type: int, default: 64; per task)\n",
        encoding="utf-8",
    )
    found = [(parents, cls, key, value) for _, parents, cls, key, value in default_comments(config)]
    assert found == [
        ((), None, "", "1"),
        (("trainer",), None, "precision", "32-true"),
        (("trainer", "callbacks", "[]", "init_args"), CB + "FixedRatio", "ratio", "0.2"),
        (("data", "tasks", "[]"), None, "eval_size", "64"),
    ]
    assert _class_defaults(CB + "FixedRatio")["ratio"] == 0.2


if __name__ == "__main__":  # python tests/test_configs.py [--fix]: check (or rewrite) the default comments
    if "--fix" in sys.argv:
        for name in COMMENTED:
            print(f"{name}: {fix(name)} default comments rewritten")
    sys.exit(pytest.main([__file__, "-q", "-k", "default_comments or checker"]))
