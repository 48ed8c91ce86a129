"""Task definitions (what a YAML ``tasks:`` entry means) and the loaders for each kind of source.

A task is a name, a source, a metric and sizes. Sources:

- ``synth:<generator>``: a built-in ``cit-synth`` generator (:mod:`lightning_cit.synth`).
- a path to a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, or to a directory written
  by ``datasets.Dataset.save_to_disk`` (read offline with the ``datasets`` library). Relative paths
  resolve against the current directory.
- ``callable:<module>:<function>``: a Python function called as ``fn(split=..., n=..., seed=...)``
  returning a list of dicts (or a ``datasets.Dataset``).

Large tasks (why: reading every record into Python objects cost ~20x the file size and a garbage-
collector walk per record, before step 1 and again at exit): ``.jsonl`` / ``.csv`` / ``.parquet`` files,
``datasets`` directories and ``callable:`` sources that return a ``datasets.Dataset`` stay in Arrow,
memory-mapped (files are converted once into ``$LIGHTNING_CIT_CACHE/datasets``, keyed by the file's
content fingerprint that ``datasets`` computes). The training split is an :class:`ArrowSamples`: row
indices into the table, each sample normalized when it is read. Every record is validated before its
task trains (before training for files under :data:`LAZY_MIN_BYTES`): the schema and null counts of prompt/response columns are checked vectorized; other layouts
(chat ``messages``, multiple choice) are normalized row by row in batches without being kept. A record
that fails names the task, the file and line (JSONL: the line number; CSV: the row's line) and the
field. When ``datasets`` cannot read a file (malformed JSON, mixed types) the Python reader takes over
and names the line. ``.json`` files (a list, or ``{"data": [...]}``) are parsed whole once and stream into
the same cache (a memory peak at the first conversion only). Synthetic and callable lists stay Python lists.
Large JSONL files (at least :data:`LAZY_MIN_BYTES`) open lazily: see :class:`LazyTaskData`.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
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
                if isinstance(split, ArrowSamples):  # the source's bytes and the rows taken (not every record normalized)
                    digest.update(b"arrow:" + _arrow_source_digest(split).encode() + split.indices.tobytes())
                else:
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
        samples = _open_samples(spec, spec.source, seed, "train")
        if not len(samples):
            raise TaskDataError(f"task {spec.name!r}: source {spec.source!r} holds no samples (empty task)")
        samples = _shuffled(samples, random.Random(f"{spec.name}/{seed}"))
        if spec.eval_split:
            held = list(_open_samples(spec, spec.eval_split, seed, "eval"))
            if not held:
                raise TaskDataError(f"task {spec.name!r}: eval_split {spec.eval_split!r} holds no samples")
            evals, probes = held[: spec.eval_size], held[spec.eval_size : n_held] or held[: spec.probe_size]
        else:
            if spec.train and len(samples) <= n_held:
                raise TaskDataError(
                    f"task {spec.name!r}: {len(samples)} samples in {spec.source!r} cannot give eval_size + probe_size = "
                    f"{n_held} held-out samples and leave any for training; lower them or set eval_split"
                )
            evals, probes = list(samples[: spec.eval_size]), list(samples[spec.eval_size : n_held])
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


LAZY_MIN_BYTES = 1 << 20
"""JSONL task files at least this large open when their task first needs its training data (smaller ones are read whole up front)."""
SAMPLE_ROWS = 64
"""Random records (besides the first and the last) validated up front in a file that opens later."""


class LazyTaskData(TaskData):
    """A large JSONL task whose training data opens (converts to Arrow, every row validated) when first read.

    Up front (:func:`check_task`) one byte scan of the file checks UTF-8, counts the records and notes
    where each starts; the first, the last and :data:`SAMPLE_ROWS` random records are parsed and
    normalized, and the held-out ``eval``/``probe`` samples (the same ones :func:`load_task` picks) are
    read by seeking, so the evaluator's rows need no opening. ``train`` opens the task: a bad record found
    then is a :class:`TaskDataError` naming the task, the file's line and the field, raised at that task's start.
    ``fingerprint()`` hashes the file's bytes, the task and the seed, opened or not.
    """

    def __init__(self, spec: TaskSpec, seed: int, metric: str, evals: list[dict], probes: list[dict], stamp: str, digest: str) -> None:
        self.spec, self.metric, self.eval, self.probe = spec, metric, evals, probes
        self._seed, self._stamp, self._opened = seed, stamp, None
        self._fingerprint = digest

    @property
    def opened(self) -> bool:
        return self._opened is not None

    def __repr__(self) -> str:  # the dataclass repr would read (open) the training data
        return f"LazyTaskData(spec={self.spec!r}, metric={self.metric!r}, opened={self.opened})"

    @property
    def train(self) -> Any:  # type: ignore[override]
        if self._opened is None:
            path = Path(os.path.expanduser(self.spec.source))
            if _stamp(path) != self._stamp:
                raise TaskDataError(f"task {self.spec.name!r}: {path} changed after the run started (size or modification time): "
                                    "a task's file must stay as it was while the sequence trains")
            task = load_task(self.spec, seed=self._seed)  # converts to Arrow and validates every row
            if task.eval != self.eval or task.probe != self.probe:
                raise TaskDataError(f"task {self.spec.name!r}: {path} no longer holds the held-out samples read at the start")
            self._opened = task
        return self._opened.train


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def check_task(spec: TaskSpec, seed: int = 0) -> TaskData:
    """:func:`load_task`, except for large JSONL files: those are checked on a sample and open later (:class:`LazyTaskData`)."""
    path = Path(os.path.expanduser(spec.source)) if not spec.source.startswith(("synth:", "callable:")) else None
    if (path is None or spec.eval_split or not spec.train or path.suffix.lower() != ".jsonl" or not path.is_file()
            or path.stat().st_size < LAZY_MIN_BYTES):
        return load_task(spec, seed)
    metric = spec.metric or _default_metric(spec)
    stamp = _stamp(path)
    starts, lines, digest = _scan_jsonl(spec, path)
    if starts is None:
        return load_task(spec, seed)  # a line break Python's text mode reads differently ('\r' alone): the whole file now
    n, n_held = len(starts), spec.eval_size + spec.probe_size
    if not n:
        raise TaskDataError(f"task {spec.name!r}: source {spec.source!r} holds no samples (empty task)")
    if n <= n_held:
        raise TaskDataError(
            f"task {spec.name!r}: {n} samples in {spec.source!r} cannot give eval_size + probe_size = "
            f"{n_held} held-out samples and leave any for training; lower them or set eval_split"
        )
    order = list(range(n))
    random.Random(f"{spec.name}/{seed}").shuffle(order)  # the permutation load_task applies
    check_rng = random.Random(f"{spec.name}/{seed}/check")
    sample_rows = sorted({0, n - 1, *check_rng.sample(range(n), min(SAMPLE_ROWS, n))})
    held_rows = order[:n_held]
    records = _read_rows(spec, path, starts, lines, sorted(set(sample_rows) | set(held_rows)))
    evals = [records[r] for r in order[: spec.eval_size]]
    probes = [records[r] for r in order[spec.eval_size : n_held]]
    if metric == MC_ACCURACY and any("options" not in s or "answer_index" not in s for s in evals):
        raise TaskDataError(f"task {spec.name!r}: metric 'mc_accuracy' needs fields 'options' and 'answer_index' in every eval sample")
    fingerprint = hashlib.sha256(json.dumps({"spec": asdict(spec), "seed": seed, "file": digest}, sort_keys=True, default=repr).encode())
    return LazyTaskData(spec, seed, metric, evals, probes or evals[: spec.probe_size], stamp, fingerprint.hexdigest())


def _scan_jsonl(spec: TaskSpec, path: Path) -> tuple[Any, Any, str]:
    """One pass over the bytes: UTF-8 checked per line, ``(record start offsets, their line numbers, sha256)``.

    Records are the non-blank lines, numbered as the JSONL readers number them; ``(None, None, "")`` when a
    line holds a ``\\r`` that is not part of ``\\r\\n`` (text mode would split it there). About 0.5 CPU s for
    1M short lines (a vectorized numpy scan over a memory map measured slower in a fresh process).
    """
    import numpy as np

    starts, lines, digest, offset = [], [], hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            digest.update(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TaskDataError(
                    f"task {spec.name!r}: {path}:{lineno}: not valid UTF-8 (byte {raw[err.start]:#04x}); save the file as UTF-8"
                ) from None
            if "\r" in (text.removesuffix("\r\n")):  # a '\r' alone ends a line in text mode
                return None, None, ""
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                starts.append(offset)
                lines.append(lineno)
            offset += len(raw)
    return np.asarray(starts, dtype=np.int64), np.asarray(lines, dtype=np.int64), digest.hexdigest()


def _read_rows(spec: TaskSpec, path: Path, starts: Any, lines: Any, rows: list[int]) -> dict[int, dict]:
    """Records ``rows`` (indices among the non-blank lines) parsed and normalized, read by seeking."""
    out = {}
    with open(path, "rb") as handle:
        for row in rows:
            handle.seek(int(starts[row]))
            text = handle.readline().decode("utf-8")
            if row == 0:
                text = text.removeprefix("\ufeff")
            where = f"{path}:{int(lines[row])}"
            out[row] = _normalize(spec, _json_object(spec, text, where), where)
    return out


class ArrowSamples(Sequence):
    """A task's samples as row indices into a memory-mapped ``datasets.Dataset``, normalized when read.

    Memory is the index array (8 bytes a sample) whatever the records hold; slicing gives another view.
    Every row was validated when the task was loaded (:func:`_validate_arrow`).
    """

    def __init__(self, spec: TaskSpec, dataset: Any, indices: Any, where: str) -> None:
        import numpy as np

        self.spec, self.dataset, self.where = spec, dataset, where
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, slice):
            return ArrowSamples(self.spec, self.dataset, self.indices[item], self.where)
        row = int(self.indices[item])
        return _normalize(self.spec, _arrow_record(self.dataset[row]), self.where.format(row=row))  # validated at load

    def __iter__(self) -> Any:
        # a batch of rows per Arrow read: a scan over every sample (e.g. instruction grouping) is not a row lookup each
        for start in range(0, len(self), 1024):
            rows = [int(r) for r in self.indices[start : start + 1024]]
            batch = self.dataset[rows]
            for offset, row in enumerate(rows):
                record = _arrow_record({k: v[offset] for k, v in batch.items()})
                yield _normalize(self.spec, record, self.where.format(row=row))

    def __add__(self, other: Any) -> list:
        return list(self) + list(other)

    def __radd__(self, other: Any) -> list:
        return list(other) + list(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> Any:  # DataLoader workers: the dataset pickles as its memory-mapped files
        return (ArrowSamples, (self.spec, self.dataset, self.indices, self.where))


def _arrow_source_digest(samples: ArrowSamples) -> str:
    """sha256 of an Arrow task's source: the file's bytes, a ``datasets`` directory's files, else the dataset's own fingerprint."""
    path = Path(os.path.expanduser(samples.spec.source))
    if samples.spec.source.startswith(("synth:", "callable:")) or not path.exists():
        return str(getattr(samples.dataset, "_fingerprint", ""))
    digest = hashlib.sha256()
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path) if file != path else "").encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _arrow_record(record: dict) -> dict:
    """An Arrow row as a file record: a null is a missing field (Arrow fills absent keys with null), in turns too."""
    out = {k: v for k, v in record.items() if v is not None}
    for key, value in out.items():
        if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
            out[key] = [{k: v for k, v in t.items() if v is not None} for t in value]
    return out


def _shuffled(samples: Any, rng: random.Random) -> Any:
    """The same permutation ``rng.shuffle`` gives a list (results do not depend on the storage)."""
    if isinstance(samples, list):
        rng.shuffle(samples)
        return samples
    order = list(range(len(samples)))
    rng.shuffle(order)
    return ArrowSamples(samples.spec, samples.dataset, samples.indices[order], samples.where)


ARROW_SUFFIXES = {".jsonl": "json", ".json": "json_array", ".csv": "csv", ".parquet": "parquet"}


def _open_samples(spec: TaskSpec, source: str, seed: int, split: str) -> Any:
    """The normalized samples of a source: an :class:`ArrowSamples` where the data can stay in Arrow, else a list."""
    if source.startswith("callable:"):
        result = _call_source(spec, source, seed, split)
        if _is_arrow_dataset(result):
            where = f"{source[len('callable:'):]}()[{{row}}]"
            _validate_arrow(spec, result, where, source)
            return ArrowSamples(spec, result, range(len(result)), where)
        return [_normalize(spec, r, w) for w, r in _callable_records(spec, source, result)]
    dataset, where = _open_arrow(spec, source, seed, split)
    if dataset is None:
        return [_normalize(spec, r, w) for w, r in _read_source(spec, source, seed, split)]
    _validate_arrow(spec, dataset, where, source)
    return ArrowSamples(spec, dataset, range(len(dataset)), where)


def _open_arrow(spec: TaskSpec, source: str, seed: int, split: str) -> tuple[Any, str]:
    """``(datasets.Dataset, location template)`` for Arrow-capable sources; ``(None, "")`` for the rest."""
    if source.startswith("callable:"):
        return None, ""  # _read_source calls it; a Dataset it returns comes back through _callable_dataset
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise TaskDataError(f"task {spec.name!r}: source file {str(path)!r} does not exist")
    if path.is_dir():
        return _load_datasets_dir(spec, path), f"{path}[row {{row}}]"
    builder = ARROW_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        return None, ""
    import datasets

    from lightning_cit.base import cache_root

    if builder == "json":
        _read_text_head_check(spec, path)
    if builder == "csv":
        _check_csv(spec, path)  # a row with more cells than the header is named by its line (Arrow would only fail)
    try:
        if builder == "json_array":
            # a JSON list (or {"data": [...]}) is parsed whole once, then streamed into the same Arrow cache as JSONL
            stat = path.stat()
            dataset = datasets.Dataset.from_generator(
                _json_array_records, gen_kwargs={"path": str(path), "stamp": f"{stat.st_size}-{stat.st_mtime_ns}"},
                cache_dir=str(cache_root() / "datasets"),
            )
        elif builder == "json":
            # pyarrow's JSON reader crashes the whole process (a segfault, not an exception) on some malformed lines,
            # found by tests/test_tasks.py's hypothesis test: Python's json module parses each line and the records
            # stream into the same memory-mapped Arrow cache, keyed by the file's size and modification time
            stat = path.stat()
            dataset = datasets.Dataset.from_generator(
                _jsonl_records, gen_kwargs={"path": str(path), "stamp": f"{stat.st_size}-{stat.st_mtime_ns}"},
                cache_dir=str(cache_root() / "datasets"),
            )
        else:
            options = {"encoding": "utf-8-sig"} if builder == "csv" else {}  # a BOM is not data
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_root() / "datasets"), **options)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for unreadable files
        if builder in ("json", "json_array"):
            return None, ""  # the Python reader names the line that is wrong (or reads what Arrow cannot type)
        raise TaskDataError(f"task {spec.name!r}: cannot read {path} as {builder}: {err}") from None
    from lightning_cit.cache import record_entry

    record_entry(dataset, path, _stamp(path), cache_root() / "datasets")  # what `lightning-cit cache clean` may remove
    if builder in ("json", "json_array") and not _json_types_exact(spec, dataset):
        return None, ""  # Arrow unified a column's types (int -> float, ...): the Python reader keeps every value as written
    where = {"csv": f"{path}:csv row {{row}}", "json": f"{path}:record {{row}}", "json_array": f"{path}[{{row}}]"}.get(builder, f"{path}[row {{row}}]")
    return dataset, where


def _jsonl_records(path: str, stamp: str) -> Any:
    """The JSON objects of a JSONL file, line by line (``stamp`` only keys the Arrow cache); anything else raises."""
    with open(path, encoding="utf-8-sig", newline=None) as handle:
        for line in handle:
            if not line.strip():
                continue
            # NaN/Infinity would become nulls in Arrow: the Python reader refuses them, naming the line
            record = json.loads(line, parse_constant=_refuse_constant)
            if not isinstance(record, dict):
                raise TypeError("not a JSON object")  # the Python reader then names the line
            yield record


def _json_array_records(path: str, stamp: str) -> Any:
    """The objects of a ``.json`` file holding a list (or ``{"data": [...]}``); anything else raises (``stamp`` keys the cache)."""
    with open(path, encoding="utf-8-sig") as handle:
        data = json.load(handle, parse_constant=_refuse_constant)
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise TypeError("not a non-empty JSON list of objects")  # the Python reader then says what is wrong
    yield from data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _json_types_exact(spec: TaskSpec, dataset: Any) -> bool:
    """Whether Arrow kept every value a JSONL task uses as written.

    Type inference unifies a column: one float (or an int beyond int64) turns every int of
    ``answer_index`` into a float, numbers and strings mixed in a text column fail or change. Only
    string text columns, integer ``answer_index``, boolean ``harmful``, string ``options`` and
    string-struct ``messages`` are taken from Arrow; anything else goes through the Python reader.
    """
    import pyarrow as pa

    def text(t: Any) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)

    expected = {
        spec.prompt_field: text,
        spec.response_field: text,
        "answer_index": lambda t: pa.types.is_integer(t) or pa.types.is_null(t),
        "harmful": lambda t: pa.types.is_boolean(t) or pa.types.is_null(t),
        "options": lambda t: pa.types.is_null(t) or (pa.types.is_list(t) and text(t.value_type)),
        spec.messages_field: lambda t: pa.types.is_null(t) or (
            pa.types.is_list(t) and pa.types.is_struct(t.value_type) and all(text(f.type) for f in t.value_type)),
    }
    schema = dataset.data.schema
    return all(check(schema.field(name).type) for name, check in expected.items() if name in schema.names)


def _read_text_head_check(spec: TaskSpec, path: Path) -> None:
    """Undecodable bytes are reported with their line (``datasets`` would only say the file failed)."""
    with open(path, "rb") as handle:
        lineno = 1
        for raw in handle:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TaskDataError(
                    f"task {spec.name!r}: {path}:{lineno}: not valid UTF-8 (byte {raw[err.start]:#04x}); save the file as UTF-8"
                ) from None
            lineno += 1


def _load_datasets_dir(spec: TaskSpec, path: Path) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - as above, for load_from_disk
        raise TaskDataError(f"task {spec.name!r}: {path} is not a directory saved by datasets.save_to_disk: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise TaskDataError(f"task {spec.name!r}: {path} holds splits {list(loaded)}, expected a 'train' split")
        loaded = loaded["train"]
    return loaded


def _validate_arrow(spec: TaskSpec, dataset: Any, where: str, source: str) -> None:
    """Every row is valid, or a :class:`TaskDataError` names the first bad one (see module docstring)."""
    import pyarrow as pa

    columns = set(dataset.column_names)
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating)
    simple = (
        spec.messages_field not in columns
        and (spec.metric or _default_metric(spec)) != MC_ACCURACY
        and all(c in columns and table.column(c).null_count == 0 and any(t(table.schema.field(c).type) for t in text)
                for c in (spec.prompt_field, spec.response_field))
    )
    if simple:
        return  # every row has a text prompt and response: what _normalize would check
    for start in range(0, len(dataset), 4096):
        batch = dataset[start : start + 4096]
        keys = list(batch)
        for offset in range(len(batch[keys[0]]) if keys else 0):
            row = start + offset
            record = _arrow_record({k: batch[k][offset] for k in keys})
            _normalize(spec, record, _locate(where, source, row))


def _locate(where: str, source: str, row: int) -> str:
    """A row's location for an error message: the JSONL line (blank lines skipped, as the reader does), the CSV line."""
    if where.endswith(":record {row}"):
        path = os.path.expanduser(source)
        with open(path, encoding="utf-8", newline=None) as handle:
            seen = -1
            for lineno, line in enumerate(handle, start=1):
                seen += bool(line.strip())
                if seen == row:
                    return f"{path}:{lineno}"
    if where.endswith(":csv row {row}"):
        return where[: -len("csv row {row}")] + str(row + 2)  # line 1 is the header
    return where.format(row=row)


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


def _json_object(spec: Any, line: str, where: str) -> dict:
    """One JSONL line as a record, or an error naming the task, file:line and what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise TaskDataError(f"task {spec.name!r}: {where}: malformed JSON line ({err.msg})") from None
    if not isinstance(record, dict):
        raise TaskDataError(f"task {spec.name!r}: {where}: expected a JSON object, got {type(record).__name__}")
    return record


def _read_jsonl(spec: TaskSpec, path: Path) -> list[tuple[str, dict]]:
    records = []
    # newline=None: the same universal-newline line splitting as reading the file in text mode
    for lineno, line in enumerate(io.StringIO(_read_text(spec, path), newline=None), start=1):
        if not line.strip():
            continue
        records.append((f"{path}:{lineno}", _json_object(spec, line, f"{path}:{lineno}")))
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
    return [(f"{path}[row {i}]", dict(r)) for i, r in enumerate(_load_datasets_dir(spec, path))]


def _is_arrow_dataset(value: Any) -> bool:
    return type(value).__module__.startswith("datasets") and type(value).__name__ == "Dataset"


def _read_callable(spec: TaskSpec, source: str, seed: int, split: str) -> list[tuple[str, dict]]:
    return _callable_records(spec, source, _call_source(spec, source, seed, split))


def _call_source(spec: TaskSpec, source: str, seed: int, split: str) -> Any:
    target = source[len("callable:") :]
    try:
        fn = import_callable(target)
    except (ImportError, AttributeError, ValueError, TypeError) as err:
        raise TaskDataError(f"task {spec.name!r}: cannot import {target!r} (expected callable:<module>:<function>): {err}") from None
    # like synth, train_size None asks for 1000 training samples (asking for 0 left none once eval/probe are held out)
    n = (spec.train_size or 1000) + spec.eval_size + spec.probe_size if split == "train" else spec.eval_size + spec.probe_size
    return fn(split=split, n=n, seed=seed)


def _callable_records(spec: TaskSpec, source: str, records: Any) -> list[tuple[str, dict]]:
    target = source[len("callable:") :]
    if _is_arrow_dataset(records):
        records = list(records)
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
