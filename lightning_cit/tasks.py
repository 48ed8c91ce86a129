"""Task definitions (what a YAML ``tasks:`` entry means) and the loaders for each kind of source.

A task is a name, a source, a metric and sizes. Sources:

- ``synth:<generator>``: a built-in ``cit-synth`` generator (:mod:`lightning_cit.synth`).
- a path to a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, or to a directory written
  by ``datasets.Dataset.save_to_disk`` (read offline with the ``datasets`` library). Relative paths
  resolve against the current directory.
- ``callable:<module>:<function>``: a Python function called as ``fn(split=..., n=..., seed=...)``
  returning a list of dicts (or a ``datasets.Dataset``).

Every sample becomes ``{"messages": [...], "response": str}`` plus optional ``options`` /
``answer_index`` (multiple choice) and ``harmful`` (safety): ``messages`` are the prompt turns,
``response`` is the answer the loss is computed on. Records are read either as ``prompt``/
``response`` fields or as chat ``messages`` whose last turn is the assistant's answer; the field
names are configurable per task.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_cit import synth
from lightning_cit.errors import ConfigError
from lightning_cit.metrics import MC_ACCURACY, check_metric
from lightning_cit.plugins import import_callable


class TaskDataError(ConfigError):
    """A task definition or its data is malformed; the message says where and what to fix."""


@dataclass
class TaskSpec:
    """One task of the continual sequence."""

    name: str
    """Unique task name; used as the column name in ``scores.json``."""
    source: str
    """``synth:<generator>``, a local file/``datasets`` directory, or ``callable:<module>:<fn>``."""
    metric: str | None = None
    """``exact_match``, ``edit_similarity``, ``rouge_l`` or ``mc_accuracy``; synth tasks default to theirs."""
    train_size: int | None = 1000
    """Training samples to use (files: the first N after a seeded shuffle, None: all; synth/callable: None means 1000)."""
    eval_size: int = 64
    """Held-out samples scored after every task (files: taken from ``eval_split`` or held out)."""
    probe_size: int = 32
    """Held-out samples used by the cheap loss-only probe during training."""
    steps: int | None = None
    """Optimizer steps for this task; None uses the DataModule's ``steps_per_task``."""
    max_new_tokens: int = 48
    """Generation budget when scoring this task."""
    eval_split: str | None = None
    """A second file or ``datasets`` directory with the eval samples; None holds them out of ``source``."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (ignored when ``messages_field`` is present in a record)."""
    response_field: str = "response"
    """Record field holding the reference answer."""
    messages_field: str = "messages"
    """Record field holding chat turns ``[{"role", "content"}, ...]``; the last must be the assistant's."""
    system_prompt: str | None = None
    """Optional system turn prepended to every prompt."""
    train: bool = True
    """False makes this an evaluation-only probe (e.g. a safety set): scored at every row, never trained."""


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[dict]
    eval: list[dict]
    probe: list[dict]
    metric: str = field(default="exact_match")
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> str:
        """sha256 over the normalized train/eval/probe samples: a resume names a task whose data changed."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for split in (self.train, self.eval, self.probe):
                digest.update(json.dumps(split, sort_keys=True, default=repr, ensure_ascii=False).encode("utf-8"))
                digest.update(b"\0")
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def validate_specs(specs: list[TaskSpec]) -> None:
    if not specs:
        raise TaskDataError("no tasks given: `data.tasks` must list at least one task")
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        where = f"task #{i} ({spec.name!r})"
        if not spec.name or not isinstance(spec.name, str):
            raise TaskDataError(f"task #{i}: field 'name' is missing or empty")
        if spec.name in (".", "..") or any(c in spec.name for c in "/\\\0\n\r"):
            # a task name is part of metric names (probe/loss/<task>), which some loggers (MLflow's file store) turn into
            # file paths: no separators, no '..'
            raise TaskDataError(f"task #{i}: name {spec.name!r} may not contain '/', '\\', line breaks or be '.' or '..'")
        if spec.name in seen:
            raise TaskDataError(f"duplicate task name {spec.name!r}: task names must be unique")
        seen.add(spec.name)
        if not spec.source:
            raise TaskDataError(f"{where}: field 'source' is missing")
        metric = spec.metric or _default_metric(spec)
        try:
            check_metric(metric, where)
        except ConfigError as err:
            raise TaskDataError(str(err)) from None
        for size_field in ("train_size", "eval_size", "probe_size", "steps", "max_new_tokens"):
            value = getattr(spec, size_field)
            if value is not None and (not isinstance(value, int) or value < (0 if size_field == "probe_size" else 1)):
                raise TaskDataError(f"{where}: field {size_field!r} must be a positive integer, got {value!r}")
    if not any(spec.train for spec in specs):
        raise TaskDataError("every task has `train: false`: at least one task must be trained")


def _default_metric(spec: TaskSpec) -> str:
    if spec.source.startswith("synth:"):
        return synth.DEFAULT_METRICS.get(spec.source.split(":", 1)[1], "exact_match")
    return "exact_match"


def load_task(spec: TaskSpec, seed: int = 0) -> TaskData:
    """Read, normalize and split one task's samples; raises :class:`TaskDataError` naming the problem."""
    metric = spec.metric or _default_metric(spec)
    n_held = spec.eval_size + spec.probe_size
    if spec.source.startswith("synth:"):
        name = spec.source.split(":", 1)[1]
        if name not in synth.GENERATORS:
            raise TaskDataError(
                f"task {spec.name!r}: unknown built-in generator {name!r}; valid: "
                + ", ".join(f"synth:{g}" for g in sorted(synth.GENERATORS))
            )
        train = synth.generate(name, spec.train_size or 1000, seed, "train") if spec.train else []
        records_eval = synth.generate(name, spec.eval_size, seed, "eval")
        records_probe = synth.generate(name, spec.probe_size, seed, "probe")
        train, evals, probes = ([_normalize(spec, r, f"{spec.source}[{i}]") for i, r in enumerate(rs)]
                                for rs in (train, records_eval, records_probe))
    else:
        records = _read_source(spec, spec.source, seed, "train")
        if not records:
            raise TaskDataError(f"task {spec.name!r}: source {spec.source!r} holds no samples (empty task)")
        samples = [_normalize(spec, r, where) for where, r in records]
        random.Random(f"{spec.name}/{seed}").shuffle(samples)
        if spec.eval_split:
            held = [_normalize(spec, r, where) for where, r in _read_source(spec, spec.eval_split, seed, "eval")]
            if not held:
                raise TaskDataError(f"task {spec.name!r}: eval_split {spec.eval_split!r} holds no samples")
            evals, probes = held[: spec.eval_size], held[spec.eval_size : n_held] or held[: spec.probe_size]
        else:
            if spec.train and len(samples) <= n_held:
                raise TaskDataError(
                    f"task {spec.name!r}: {len(samples)} samples in {spec.source!r} cannot give eval_size + probe_size = "
                    f"{n_held} held-out samples and leave any for training; lower them or set eval_split"
                )
            evals, probes = samples[: spec.eval_size], samples[spec.eval_size : n_held]
            samples = samples[n_held:]
        train = samples[: spec.train_size] if spec.train else []
    if spec.train and not train:
        raise TaskDataError(f"task {spec.name!r}: no training samples (empty task)")
    if not evals:
        raise TaskDataError(f"task {spec.name!r}: no evaluation samples")
    if metric == MC_ACCURACY:
        for s in evals:
            if "options" not in s or "answer_index" not in s:
                raise TaskDataError(
                    f"task {spec.name!r}: metric 'mc_accuracy' needs fields 'options' and 'answer_index' in every eval sample"
                )
    return TaskData(spec=spec, train=train, eval=evals, probe=probes or evals[: spec.probe_size], metric=metric)


def _read_source(spec: TaskSpec, source: str, seed: int, split: str) -> list[tuple[str, dict]]:
    """``(location, record)`` pairs; the location (``file:line``) makes later field errors precise."""
    if source.startswith("callable:"):
        return _read_callable(spec, source, seed, split)
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise TaskDataError(f"task {spec.name!r}: source file {str(path)!r} does not exist")
    if path.is_dir():
        return _read_datasets_dir(spec, path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(spec, path)
    if suffix == ".json":
        try:
            data = json.loads(_read_text(spec, path))
        except json.JSONDecodeError as err:
            raise TaskDataError(f"task {spec.name!r}: {path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise TaskDataError(f"task {spec.name!r}: {path} must hold a JSON list of objects (or {{'data': [...]}})")
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    if suffix in (".csv", ".parquet"):
        return _read_with_datasets(spec, path, suffix[1:])
    raise TaskDataError(
        f"task {spec.name!r}: cannot read {str(path)!r}; valid sources: .json, .jsonl, .csv, .parquet files, "
        "a directory saved by datasets, synth:<generator>, callable:<module>:<function>"
    )


def _read_jsonl(spec: TaskSpec, path: Path) -> list[tuple[str, dict]]:
    records = []
    # newline=None: the same universal-newline line splitting as reading the file in text mode
    for lineno, line in enumerate(io.StringIO(_read_text(spec, path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskDataError(f"task {spec.name!r}: {path}:{lineno}: malformed JSON line ({err.msg})") from None
        if not isinstance(record, dict):
            raise TaskDataError(f"task {spec.name!r}: {path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append((f"{path}:{lineno}", record))
    return records


def _read_text(spec: TaskSpec, path: Path) -> str:
    """The file decoded as UTF-8; undecodable bytes are a :class:`TaskDataError` naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark (some editors write one) is not data
    except UnicodeDecodeError as err:
        lineno = raw[: err.start].count(b"\n") + 1
        raise TaskDataError(
            f"task {spec.name!r}: {path}:{lineno}: not valid UTF-8 (byte {raw[err.start]:#04x}); save the file as UTF-8"
        ) from None


def _read_with_datasets(spec: TaskSpec, path: Path, builder: str) -> list[tuple[str, dict]]:
    import datasets

    if builder == "csv":
        _check_csv(spec, path)
    try:
        options = {"encoding": "utf-8-sig"} if builder == "csv" else {}
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise TaskDataError(f"task {spec.name!r}: cannot read {path} as {builder}: {err}") from None
    # csv rows are numbered from 2: line 1 is the header
    first = 2 if builder == "csv" else 0
    return [(f"{path}:{i + first}" if builder == "csv" else f"{path}[row {i}]", dict(r)) for i, r in enumerate(dataset)]


def _check_csv(spec: TaskSpec, path: Path) -> None:
    """A CSV whose rows do not parse, or have more cells than the header, is an error naming the line."""
    text = _read_text(spec, path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if len(row) > len(header):
                raise TaskDataError(
                    f"task {spec.name!r}: {path}:{reader.line_num}: {len(row)} cells but the header has {len(header)} "
                    f"({', '.join(header)}); quote cells that contain commas"
                )
    except csv.Error as err:
        raise TaskDataError(f"task {spec.name!r}: {path}:{reader.line_num}: malformed CSV ({err})") from None


def _read_datasets_dir(spec: TaskSpec, path: Path) -> list[tuple[str, dict]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - as above, for load_from_disk
        raise TaskDataError(f"task {spec.name!r}: {path} is not a directory saved by datasets.save_to_disk: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise TaskDataError(f"task {spec.name!r}: {path} holds splits {list(loaded)}, expected a 'train' split")
        loaded = loaded["train"]
    return [(f"{path}[row {i}]", dict(r)) for i, r in enumerate(loaded)]


def _read_callable(spec: TaskSpec, source: str, seed: int, split: str) -> list[tuple[str, dict]]:
    target = source[len("callable:") :]
    try:
        fn = import_callable(target)
    except (ImportError, AttributeError, ValueError, TypeError) as err:
        raise TaskDataError(f"task {spec.name!r}: cannot import {target!r} (expected callable:<module>:<function>): {err}") from None
    # like synth, train_size None asks for 1000 training samples (asking for 0 left none once eval/probe are held out)
    n = (spec.train_size or 1000) + spec.eval_size + spec.probe_size if split == "train" else spec.eval_size + spec.probe_size
    records = fn(split=split, n=n, seed=seed)
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise TaskDataError(
            f"task {spec.name!r}: {target}(split=..., n=..., seed=...) must return a list of dicts or a datasets.Dataset, "
            f"got {type(records).__name__}"
        )
    # non-mappings are kept as they are so that _normalize reports them with their index
    records = [dict(r) if isinstance(r, Mapping) else r for r in records]
    return [(f"{target}()[{i}]", r) for i, r in enumerate(records)]


def _normalize(spec: TaskSpec, record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise TaskDataError(f"task {spec.name!r}: {where}: expected a record (mapping), got {type(record).__name__}")
    if spec.messages_field in record and record[spec.messages_field] is not None:
        turns = record[spec.messages_field]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise TaskDataError(f"task {spec.name!r}: {where}: field {spec.messages_field!r} must be a non-empty list of turns")
        for i, t in enumerate(turns):
            if "role" not in t or "content" not in t:
                raise TaskDataError(f"task {spec.name!r}: {where}: every turn in {spec.messages_field!r} needs 'role' and 'content'")
            for key in ("role", "content"):
                _check_text(spec, t[key], where, f"{spec.messages_field}[{i}].{key}")
        if turns[-1]["role"] != "assistant":
            raise TaskDataError(f"task {spec.name!r}: {where}: the last turn of {spec.messages_field!r} must be the assistant's answer")
        if len(turns) < 2:
            raise TaskDataError(f"task {spec.name!r}: {where}: field {spec.messages_field!r} needs a prompt turn before the answer")
        messages = [{"role": str(t["role"]), "content": str(t["content"])} for t in turns[:-1]]
        response = str(turns[-1]["content"])
    else:
        for name in (spec.prompt_field, spec.response_field):
            if name not in record or record[name] is None:
                raise TaskDataError(
                    f"task {spec.name!r}: {where}: missing field {name!r} (records need {spec.prompt_field!r} and "
                    f"{spec.response_field!r}, or {spec.messages_field!r}; set prompt_field/response_field to map yours)"
                )
            _check_text(spec, record[name], where, name)
        messages = [{"role": "user", "content": str(record[spec.prompt_field])}]
        response = str(record[spec.response_field])
    if spec.system_prompt:
        messages = [{"role": "system", "content": spec.system_prompt}, *messages]
    sample = {"messages": messages, "response": response}
    for key in ("options", "answer_index", "harmful"):
        if key in record and record[key] is not None:
            sample[key] = record[key]
    if (spec.metric or _default_metric(spec)) == MC_ACCURACY:
        _check_choice(spec, sample, where)
    return sample


def _check_text(spec: TaskSpec, value: Any, where: str, name: str) -> None:
    # numbers are fine as text (a CSV column of digits); a list or mapping would train on its Python repr,
    # a NaN (an empty cell read by a dataframe library, or JSON's NaN) on the text "nan"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TaskDataError(f"task {spec.name!r}: {where}: field {name!r} must be text, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TaskDataError(f"task {spec.name!r}: {where}: field {name!r} is {value!r}, not text (an empty or missing value?)")


def _check_choice(spec: TaskSpec, sample: dict, where: str) -> None:
    """A multiple-choice record: a non-empty ``options`` list and an integer ``answer_index`` into it."""
    options, index = sample.get("options"), sample.get("answer_index")
    needs = f"task {spec.name!r}: {where}: metric 'mc_accuracy' needs fields 'options' (a non-empty list) and 'answer_index'"
    if not isinstance(options, (list, tuple)) or not options:
        raise TaskDataError(f"{needs} (an index into it); 'options' is {options!r:.60}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(options):
        raise TaskDataError(f"{needs} (an integer in [0, {len(options) - 1}]); 'answer_index' is {index!r:.60}")


def task_from_records(name: str, train: list[Any], eval: list[Any], probe: list[Any] | None = None, metric: str = "exact_match",
                      max_new_tokens: int = 48, train_task: bool = True, **fields: Any) -> TaskData:
    """A task from a user's own records (dicts with ``prompt``/``response``, ``messages``, ... as in files).

    What a project that keeps its own datasets hands to ``ContinualInstructionDataModule(datasets=...)``
    and ``ForgettingEvaluator(tasks=...)``; records are validated and normalized like a file's, and a bad
    one names the task, the split and the index.
    """
    spec = TaskSpec(name=name, source=f"records:{name}", metric=metric, train_size=len(train), eval_size=max(1, len(eval)),
                    probe_size=len(probe or []), max_new_tokens=max_new_tokens, train=train_task, **fields)
    check_metric(metric, f"task {name!r}")
    splits = {split: [_normalize(spec, r, f"records:{name}/{split}[{i}]") for i, r in enumerate(rows or [])]
              for split, rows in (("train", train), ("eval", eval), ("probe", probe))}
    if train_task and not splits["train"]:
        raise TaskDataError(f"task {name!r}: no training records given")
    if not splits["eval"]:
        raise TaskDataError(f"task {name!r}: no evaluation records given")
    return TaskData(spec=spec, train=splits["train"], eval=splits["eval"], probe=splits["probe"] or splits["eval"][:8], metric=metric)
