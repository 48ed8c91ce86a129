"""``lightning-cit compare``: every method on the same settings, at the same measured budgets, with costs and seeds.

A *grid* file (``configs/compare/grid.yaml``) names settings (a composed config each: a base plus
overlays), methods (a controller and callbacks, with ``{budget}`` where the replay budget goes),
budgets and seeds. Every (setting, method, budget, seed) is one ``lightning-cit fit`` of the setting's
config with the method's callbacks swapped in, the setting's evaluator kept, and a
:class:`~lightning_cit.callbacks.CostMeter` added, so every run is scored the same way and measured
the same way. The harness then writes ``compare.md``, ``compare.json`` and the figures:

- **Budgets are measured.** Each run's replay share is read from its ``cost.json`` (the sampler's own
  per-sample records, flashback prompts included), not from its config. A method whose share is not set
  by a budget (``budget: none``: No replay, Proportional, LCIA) runs once per seed and is placed at its
  measured share.
- **Cost is reported**: optimizer steps, training tokens, forward positions by purpose (evaluation,
  probes, rollouts, reference passes, re-scoring), FLOPs without evaluation, CPU seconds without
  evaluation, and the FLOPs and CPU ratios to No replay at the same setting and seed.
- **Statistics**: mean ± standard error over seeds; each method's paired difference to the reference
  method (``reference``, Fixed ratio) at the same setting, budget and seed, with a percentile bootstrap
  interval of the mean difference (scipy). A method *wins* (or *loses*) a cell only when that interval
  excludes 0; with 3 seeds the interval is close to the range of the three differences, so a win needs
  every seed to agree.
- **Resumable**: each finished run leaves ``run.json`` (summary, cost, the hash of its inputs: the setting's
  config files, the method's callbacks, budget and seed) and is never redone; a finished run whose inputs
  changed is an error (use another ``--runs`` directory, or delete that run). Code changes alone do not
  redo a run. Runs keep no checkpoints: one interrupted midway starts again.

``--quick`` runs the same grid at the grid's ``quick`` size (an overlay on every setting, fewer seeds).
Figures: ``pareto_<setting>.png`` (bwt_gem against the measured replay share), ``cost_<setting>.png``
(acc against FLOPs ÷ No replay) and ``curves_<setting>.png`` (per-task scores at the main budget, from
:func:`lightning_cit.report.write_curves`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_cit.errors import ConfigError
from lightning_cit.results import atomic_write_json, atomic_write_text

GRID_OWNED = ("lightning_cit.callbacks.ForgettingEvaluator", "lightning_cit.callbacks.TaskCheckpoint",
                 "lightning_cit.callbacks.CostMeter", "lightning_cit.callbacks.AdapterOnlyCheckpoint")
"""Callbacks the grid owns (kept from the setting, or added): a method's overlay never brings its own."""
EVALUATOR = "lightning_cit.callbacks.ForgettingEvaluator"
COST_METER = {"class_path": "lightning_cit.callbacks.CostMeter"}
METRICS = ("acc", "bwt_gem", "nta", "fwt", "forgetting_chaudhry")
BudgetMode = Literal["set", "none"]


class RunFailed(RuntimeError):
    """A run of the grid exited non-zero or left no complete scores (the other runs go on; finished runs stay)."""


# ============================================================================================ the grid file
@dataclass
class Setting:
    name: str
    title: str
    config: list[str]
    """``--config`` files in order: the setting's base, then its overlays."""
    budgets: list[float] | None = None
    """Budgets run on this setting (None: all of the grid's and the methods' own)."""
    budget_seeds: list[int] | None = None
    """Seeds at the budgets other than the main one on this setting (None: the grid's ``budget_seeds``)."""


@dataclass
class Method:
    name: str
    callbacks: list[dict[str, Any]]
    """The method's callbacks; the first is the mixture controller. ``{budget}`` in an init arg is replaced."""
    budget: BudgetMode = "set"
    """``set``: one run per budget; ``none``: the method decides its own share (one run per seed)."""
    settings: list[str] | None = None
    """Settings it runs on (None: all)."""
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    reference: str | None = None
    """The method its paired differences are taken to (None: the grid's reference)."""
    budgets: list[float] | None = None
    """Its own budgets (None: the grid's)."""
    seeds: list[int] | None = None
    """Its own seeds at the main budget, or for ``budget: none`` (None: the grid's)."""


@dataclass
class Grid:
    title: str
    settings: list[Setting]
    methods: list[Method]
    budgets: list[float]
    main_budget: float
    seeds: list[int]
    budget_seeds: list[int]
    reference: str
    baseline: str
    quick: dict[str, Any]
    path: str
    notes: str = ""

    def runs(self) -> list[RunSpec]:
        """Every run, in the order they are started: the main budget's first seed of every method and setting first,
        then its other seeds, then the other budgets, so an interrupted grid has the broadest picture so far."""
        def priority(run: RunSpec) -> tuple:
            main = run.budget is None or run.budget == self.main_budget
            return (0 if main else 1, run.seed if main else 0, self.settings.index(run.setting))
        return sorted(self._runs(), key=priority)

    def _runs(self) -> list[RunSpec]:
        out: list[RunSpec] = []
        for setting in self.settings:
            for method in self.methods:
                if method.settings is not None and setting.name not in method.settings:
                    continue
                main_seeds = method.seeds if method.seeds is not None else self.seeds
                if method.budget == "none":
                    out.extend(RunSpec(setting, method, None, seed) for seed in main_seeds)
                    continue
                for budget in method.budgets or self.budgets:
                    if setting.budgets is not None and budget not in setting.budgets:
                        continue
                    other_seeds = setting.budget_seeds if setting.budget_seeds is not None else self.budget_seeds
                    seeds = main_seeds if budget == self.main_budget else other_seeds
                    out.extend(RunSpec(setting, method, budget, seed) for seed in seeds)
        return out


@dataclass
class RunSpec:
    setting: Setting
    method: Method
    budget: float | None
    seed: int

    @property
    def key(self) -> str:
        budget = "own" if self.budget is None else f"b{self.budget:g}"
        return f"{self.setting.name}/{slug(self.method.name)}/{budget}-s{self.seed}"

    def label(self) -> str:
        budget = "own share" if self.budget is None else f"{self.budget:.0%}"
        return f"{self.setting.name} · {self.method.name} · {budget} · seed {self.seed}"


def slug(name: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "_" for c in name.replace("+", "plus").replace("%", "pct"))
    return "_".join(part for part in keep.split("_") if part)


def _require(mapping: dict, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in mapping:
        raise ConfigError(f"{where}: missing {key!r}")
    value = mapping[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: {key!r} must be {names}, got {type(value).__name__}")
    return value


METHOD_KEYS = {"from", "callbacks", "controller", "args", "add", "budget", "budgets", "seeds", "reference", "settings", "model", "data", "note"}


def method_callbacks(spec: dict, where: str, root: Path) -> dict:
    """A method's callbacks: ``callbacks``, or those of the overlay ``from`` (its evaluator and checkpoints dropped,
    its ``data`` section kept), then ``controller`` replaces the first, ``args`` merges init args by class name, ``add`` appends."""
    import yaml

    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a method is a mapping (from / callbacks, controller, args, add, budget, settings, model, data)")
    unknown = sorted(set(spec) - METHOD_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid: {sorted(METHOD_KEYS)}")
    spec = copy.deepcopy(spec)
    if "from" in spec:
        overlay_path = root / str(spec["from"])
        try:
            overlay = yaml.safe_load(overlay_path.read_text(encoding="utf-8")) or {}
        except OSError as err:
            raise ConfigError(f"{where}.from: cannot read {str(spec['from'])!r}: {err.strerror}") from None
        callbacks = [c for c in (overlay.get("trainer") or {}).get("callbacks") or [] if c.get("class_path") not in GRID_OWNED]
        spec.setdefault("callbacks", callbacks)
        spec["data"] = merge(overlay.get("data") or {}, spec.get("data") or {})
    if "callbacks" not in spec:
        raise ConfigError(f"{where}: give 'callbacks' (a list of class_path/init_args) or 'from' (a method overlay)")
    callbacks = spec["callbacks"]
    if "controller" in spec:
        callbacks = [spec["controller"], *callbacks[1:]] if callbacks else [spec["controller"]]
    for cls, init_args in (spec.get("args") or {}).items():
        hits = [c for c in callbacks if c.get("class_path") == cls or c.get("class_path", "").rsplit(".", 1)[-1] == cls]
        if not hits:
            raise ConfigError(f"{where}.args: no callback {cls!r}; the method has {[c.get('class_path') for c in callbacks]}")
        for c in hits:
            c["init_args"] = {**(c.get("init_args") or {}), **init_args}
    spec["callbacks"] = [*callbacks, *(spec.get("add") or [])]
    return spec


def load_grid(path: str | os.PathLike, repo: Path | None = None) -> Grid:
    """Read and check a grid file; config paths are relative to ``repo`` (default: the current directory)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read grid {str(path)!r}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"grid {str(path)!r} is not valid YAML: {err}") from None
    where = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a grid is a mapping with settings, methods, budgets, seeds")
    known = {"title", "settings", "methods", "budgets", "main_budget", "seeds", "budget_seeds", "reference", "baseline", "quick", "notes"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid: {sorted(known)}")
    root = repo or Path.cwd()
    settings = []
    for name, spec in _require(raw, "settings", where, dict).items():
        w = f"{where}: settings.{name}"
        config = _require(spec, "config", w, list)
        for item in config:
            if not (root / item).is_file():
                raise ConfigError(f"{w}.config: {item!r} is not a file (paths are relative to {root})")
        unknown = sorted(set(spec) - {"title", "config", "budgets", "budget_seeds"})
        if unknown:
            raise ConfigError(f"{w}: unknown keys {unknown}; valid: ['budget_seeds', 'budgets', 'config', 'title']")
        own = spec.get("budgets")
        own_seeds = spec.get("budget_seeds")
        settings.append(Setting(name, str(spec.get("title", name)), [str(c) for c in config], [float(b) for b in own] if own else None,
                                [int(x) for x in own_seeds] if own_seeds is not None else None))
    methods = []
    for name, spec in _require(raw, "methods", where, dict).items():
        w = f"{where}: methods.{name!r}"
        spec = method_callbacks(spec, w, root)
        callbacks = spec["callbacks"]
        if not callbacks or not all(isinstance(c, dict) and "class_path" in c for c in callbacks):
            raise ConfigError(f"{w}.callbacks: a non-empty list of {{class_path, init_args}}; the first is the mixture controller")
        for c in callbacks:
            if c["class_path"] in GRID_OWNED:
                raise ConfigError(f"{w}.callbacks: {c['class_path']} is the grid's own (the setting's evaluator and checkpoints are kept, a CostMeter is added)")
        budget = spec.get("budget", "set")
        if budget not in ("set", "none"):
            raise ConfigError(f"{w}.budget={budget!r}; valid: set, none")
        if budget == "set" and "{budget}" not in json.dumps(callbacks):
            raise ConfigError(f"{w}: budget 'set' but no init arg is '{{budget}}'; put '{{budget}}' where the replay share goes, or budget: none")
        only = spec.get("settings")
        if only is not None:
            bad = [s for s in only if s not in {x.name for x in settings}]
            if bad:
                raise ConfigError(f"{w}.settings: unknown {bad}; valid: {[s.name for s in settings]}")
        own_budgets = spec.get("budgets")
        if own_budgets is not None and not all(isinstance(b, (int, float)) and 0.0 < b < 1.0 for b in own_budgets):
            raise ConfigError(f"{w}.budgets must be replay shares in (0, 1), got {own_budgets}")
        methods.append(Method(name, callbacks, budget, only, dict(spec.get("model") or {}), dict(spec.get("data") or {}), str(spec.get("note", "")),
                              spec.get("reference"), [float(b) for b in own_budgets] if own_budgets else None,
                              [int(x) for x in spec["seeds"]] if spec.get("seeds") is not None else None))
    names = [m.name for m in methods]
    for m in methods:
        if m.reference is not None and m.reference not in names:
            raise ConfigError(f"{where}: methods.{m.name!r}.reference {m.reference!r} is not a method; methods: {names}")
    budgets = [float(b) for b in _require(raw, "budgets", where, list)]
    if not budgets or not all(0.0 < b < 1.0 for b in budgets):
        raise ConfigError(f"{where}: budgets must be replay shares in (0, 1), got {budgets}")
    main_budget = float(raw.get("main_budget", budgets[0]))
    if main_budget not in budgets:
        raise ConfigError(f"{where}: main_budget {main_budget} is not one of budgets {budgets}")
    reference = str(raw.get("reference", "Fixed ratio"))
    baseline = str(raw.get("baseline", "No replay"))
    for role, value in (("reference", reference), ("baseline", baseline)):
        if value not in names:
            raise ConfigError(f"{where}: {role} {value!r} is not a method; methods: {names}")
    seeds = [int(s) for s in _require(raw, "seeds", where, list)]
    quick = dict(raw.get("quick") or {})
    for item in quick.get("config", []):
        if not (root / item).is_file():
            raise ConfigError(f"{where}: quick.config: {item!r} is not a file")
    return Grid(
        title=str(raw.get("title", "lightning-cit compare")), settings=settings, methods=methods, budgets=budgets,
        main_budget=main_budget, seeds=seeds, budget_seeds=[int(s) for s in raw.get("budget_seeds", seeds[:1])],
        reference=reference, baseline=baseline, quick=quick, path=str(path), notes=str(raw.get("notes", "")),
    )


def quick_grid(grid: Grid) -> Grid:
    """The grid at its ``quick`` size: ``quick.config`` appended to every setting, ``quick.seeds``/``budget_seeds``."""
    out = copy.deepcopy(grid)
    for setting in out.settings:
        setting.config = setting.config + list(grid.quick.get("config", []))
        setting.budget_seeds = None  # the quick size uses quick.budget_seeds everywhere
    out.seeds = [int(s) for s in grid.quick.get("seeds", grid.seeds)]
    out.budget_seeds = [int(s) for s in grid.quick.get("budget_seeds", grid.budget_seeds)]
    if "budgets" in grid.quick:
        out.budgets = [float(b) for b in grid.quick["budgets"]]
        out.main_budget = float(grid.quick.get("main_budget", out.main_budget))
    return out


# ============================================================================================ one run
def merge(base: dict, update: dict) -> dict:
    """``update`` merged into ``base`` recursively (dicts merge, anything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _with_budget(value: Any, budget: float | None) -> Any:
    if isinstance(value, dict):
        return {k: _with_budget(v, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_budget(v, budget) for v in value]
    if value == "{budget}":
        if budget is None:
            raise ConfigError("a method with budget: none has a '{budget}' init arg")
        return budget
    return value


def run_config(resolved: dict, run: RunSpec) -> dict:
    """The setting's resolved config with the method's callbacks in place of the setting's method callbacks.

    Kept from the setting: the evaluator and the checkpoint callbacks' absence (runs keep no checkpoints).
    Added: a CostMeter. Order: the method's callbacks, the evaluator, the cost meter.
    """
    data = copy.deepcopy(resolved)
    callbacks = data["trainer"].get("callbacks") or []
    evaluators = [c for c in callbacks if c.get("class_path") == EVALUATOR]
    if len(evaluators) != 1:
        raise ConfigError(f"setting {run.setting.name!r}: its config must have exactly one {EVALUATOR}, found {len(evaluators)}")
    method_callbacks = _with_budget(copy.deepcopy(run.method.callbacks), run.budget)
    data["trainer"]["callbacks"] = [*method_callbacks, evaluators[0], dict(COST_METER)]
    data["trainer"]["enable_checkpointing"] = False
    data["seed_everything"] = run.seed
    data["data"]["seed"] = run.seed
    if run.method.model:
        data["model"] = merge(data.get("model") or {}, run.method.model)
    if run.method.data:
        data["data"] = merge(data["data"], run.method.data)
    return data


_RESOLVE_LOCK = threading.Lock()
_RESOLVED: dict[tuple[str, ...], dict] = {}


def resolved(config: list[str], repo: Path) -> dict:
    """The config a composition resolves to (``--print_config``), cached; a fresh copy every call."""
    from lightning_cit.cli import resolve_config

    key = tuple(config)
    with _RESOLVE_LOCK:  # resolve_config captures sys.stdout; runs go in threads
        if key not in _RESOLVED:
            _RESOLVED[key] = resolve_config([repo / path for path in key])
        return copy.deepcopy(_RESOLVED[key])


def run_identity(run: RunSpec, repo: Path) -> str:
    """What identifies a run: the text of the setting's config files, the method's callbacks/model/data with the budget
    filled in, the budget and the seed. Code changes (e.g. a new default argument) do not make a finished run stale:
    delete its directory to redo it."""
    files = [(path, (repo / path).read_text(encoding="utf-8")) for path in run.setting.config]
    method = {"callbacks": _with_budget(run.method.callbacks, run.budget), "model": run.method.model, "data": run.method.data}
    payload = json.dumps({"files": files, "method": method, "budget": run.budget, "seed": run.seed}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_one(run: RunSpec, runs_dir: Path, repo: Path, threads: int) -> tuple[dict, bool]:
    """Run (or reuse) one grid cell; returns ``(record, reused)``. The record is ``run.json``'s content."""
    import yaml

    root = runs_dir / run.key
    digest = run_identity(run, repo)
    record_path = root / "run.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("config_hash") != digest:
            raise ConfigError(f"{record_path}: a finished run of {run.label()} used another config (hash {record.get('config_hash')}, "
                              f"now {digest}); its results would mix with the new grid's. Use another --runs directory")
        return record, True
    data = run_config(resolved(run.setting.config, repo), run)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("lightning_logs/version_*/scores.json"):  # an interrupted attempt: start a fresh version dir
        old.rename(old.with_suffix(".interrupted.json"))
    config_path = root / "run_config.yaml"
    atomic_write_text(config_path, yaml.safe_dump(data, sort_keys=False))
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config_path),
           "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with open(root / "run.log", "w") as handle:
        proc = subprocess.run(cmd, check=False, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=repo)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RunFailed(f"{run.label()} failed (exit {proc.returncode}); see {root / 'run.log'}")
    versions = sorted(root.glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[-1]))
    scores = json.loads((versions[-1] / "scores.json").read_text())
    cost = json.loads((versions[-1] / "cost.json").read_text())
    if not scores.get("complete"):
        raise RunFailed(f"{run.label()}: scores.json is not complete; see {root / 'run.log'}")
    record = {
        "setting": run.setting.name, "method": run.method.name, "budget": run.budget, "seed": run.seed,
        "config_hash": digest, "wall_s": seconds, "tasks": scores["tasks"], "matrix": scores["matrix"],
        "rows": scores.get("rows"), "summary": scores["summary"], "safety": scores.get("safety"),
        "methods": scores.get("methods", {}), "cost": cost, "scores_file": str(versions[-1] / "scores.json"),
    }
    atomic_write_json(record_path, record)
    return record, False


def run_grid(grid: Grid, runs_dir: Path, repo: Path, parallel: int, threads: int, log: Any = sys.stderr,
             only: Any = None) -> list[dict]:
    """Every run of the grid (those ``only(run)`` accepts), finished ones reused; one progress line per run."""
    specs = [run for run in grid.runs() if only is None or only(run)]
    total = len(specs)
    done = [0]
    lock = threading.Lock()
    start = time.perf_counter()

    failures: list[str] = []

    def one(run: RunSpec) -> dict | None:
        try:
            record, reused = run_one(run, runs_dir, repo, threads)
        except RunFailed as err:  # the other runs go on; the grid exits 1 at the end, naming it
            with lock:
                done[0] += 1
                failures.append(str(err))
                print(f"[{done[0]}/{total}] {run.label()}: FAILED ({err})", file=log, flush=True)
            return None
        with lock:
            done[0] += 1
            s = record["summary"]
            what = "reused" if reused else f"{record['wall_s']:.0f} s"
            print(f"[{done[0]}/{total}] {run.label()}: {what}; acc {s['acc']:.1f} bwt_gem {s['bwt_gem']:.1f} "
                  f"replay share {record['cost']['replay_share']:.3f} (elapsed {time.perf_counter() - start:.0f} s)", file=log, flush=True)
        return record

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        records = [r for r in pool.map(one, specs) if r is not None]
    if failures:
        raise RunFailed(f"{len(failures)} of {total} runs failed (finished runs are kept; rerun to retry only these):\n  " + "\n  ".join(failures))
    return records


# ============================================================================================ statistics
def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN for an empty list; SE NaN for one value)."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def bootstrap_interval(differences: list[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (scipy); NaNs for fewer than 2 pairs."""
    import numpy as np
    from scipy.stats import bootstrap

    values = np.asarray([d for d in differences if not math.isnan(d)], dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    if np.all(values == values[0]):  # a degenerate sample: every resample has the same mean
        return float(values[0]), float(values[0])
    result = bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
                       random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    if math.isnan(low):
        return "n/a"
    if low > 0:
        return "wins" if higher_is_better else "loses"
    if high < 0:
        return "loses" if higher_is_better else "wins"
    return "tie"


def cost_of(record: dict) -> dict[str, float]:
    """Training-side cost of a run, evaluation left out (the same work for every method).

    ``flops`` is in units of N (the model's parameters without embeddings and adapters): 2 per forward position
    plus 4 per back-propagated one, so ratios between runs of one setting do not depend on how N was counted.
    """
    cost = record["cost"]
    forward = sum(v for k, v in cost["forward_positions"].items() if k != "evaluation")
    backward = sum(v for k, v in cost["backward_positions"].items() if k != "evaluation")
    flops = 2.0 * forward + 4.0 * backward
    cpu = cost["cpu_s"]["total"] - cost["cpu_s"].get("evaluation", 0.0)
    extra = {k: v for k, v in cost["forward_positions"].items() if k not in ("train", "evaluation")}
    return {"flops": flops, "cpu_s": cpu, "extra_forward_positions": float(sum(extra.values())),
            "optimizer_steps": float(cost["optimizer_steps"]), "tokens": float(cost["tokens"])}


def summarize(grid: Grid, records: list[dict]) -> dict[str, Any]:
    """Cells (setting, method, budget) with means, SEs, measured shares, costs and paired differences."""
    by_key: dict[tuple[str, str, float | None], list[dict]] = {}
    for r in records:
        by_key.setdefault((r["setting"], r["method"], r["budget"]), []).append(r)
    baseline_cost = {(r["setting"], r["seed"]): cost_of(r) for r in records if r["method"] == grid.baseline}
    cells = []
    for (setting, method, budget), runs in by_key.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        cell: dict[str, Any] = {"setting": setting, "method": method, "budget": budget, "seeds": [r["seed"] for r in runs]}
        for metric in METRICS:
            cell[metric], cell[f"{metric}_se"] = mean_se([r["summary"].get(metric) for r in runs])
        safety = [r["safety"]["score"][-1] for r in runs if r.get("safety")]
        if safety:
            cell["safety"], cell["safety_se"] = mean_se(safety)
        cell["replay_share"], cell["replay_share_se"] = mean_se([r["cost"]["replay_share"] for r in runs])
        costs = [cost_of(r) for r in runs]
        for key in ("flops", "cpu_s", "extra_forward_positions", "optimizer_steps", "tokens"):
            cell[key] = mean_se([c[key] for c in costs])[0]
        ratios = {"flops_ratio": [], "cpu_ratio": []}
        for r, c in zip(runs, costs):
            base = baseline_cost.get((setting, r["seed"]))
            if base:
                ratios["flops_ratio"].append(c["flops"] / base["flops"] if base["flops"] else float("nan"))
                ratios["cpu_ratio"].append(c["cpu_s"] / base["cpu_s"] if base["cpu_s"] else float("nan"))
        for key, values in ratios.items():
            cell[key] = mean_se(values)[0] if values else float("nan")
        cell["wall_s"] = mean_se([r["wall_s"] for r in runs])[0]
        cell["diagonal"] = [mean_se([r["matrix"][i + 1][i] for r in runs])[0] for i in range(len(runs[0]["tasks"]))]
        cells.append(cell)
    # paired differences to the reference at the same setting, budget and seed
    references = {m.name: (m.reference or grid.reference) for m in grid.methods}
    for cell in cells:
        reference = references.get(cell["method"], grid.reference)
        if cell["method"] == reference or cell["budget"] is None:
            continue
        ref = {(r["setting"], r["budget"], r["seed"]): r for r in records if r["method"] == reference}
        pairs = [(r, ref[(cell["setting"], cell["budget"], r["seed"])]) for r in records
                 if r["setting"] == cell["setting"] and r["method"] == cell["method"] and r["budget"] == cell["budget"]
                 and (cell["setting"], cell["budget"], r["seed"]) in ref]
        if not pairs:
            continue
        diffs = {}
        for metric in ("acc", "bwt_gem"):
            d = [a["summary"][metric] - b["summary"][metric] for a, b in pairs]
            low, high = bootstrap_interval(d)
            diffs[metric] = {"mean": mean_se(d)[0], "low": low, "high": high, "pairs": len(d), "verdict": verdict(low, high)}
        cell["vs_reference"] = diffs
        cell["reference"] = reference
    return {"cells": cells}


def method_facts(records: list[dict]) -> list[dict[str, Any]]:
    """What the methods recorded about themselves (``scores.json``'s ``methods`` sections), per setting, method and budget.

    Top-level numbers are averaged over seeds, strings and booleans kept when every seed agrees; nested values are
    left to ``compare.json``'s runs. E.g. DynamicEMA's fallback rate, InstructionGrouping's reused groups.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        for section, values in (r.get("methods") or {}).items():
            if isinstance(values, dict):
                groups.setdefault((r["setting"], r["method"], r["budget"], section), []).append(values)
    facts = []
    for (setting, method, budget, section), per_seed in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        out: dict[str, Any] = {}
        for key in per_seed[0]:
            values = [v.get(key) for v in per_seed]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                out[key] = sum(values) / len(values)
            elif all(isinstance(v, (str, bool)) or v is None for v in values) and len({json.dumps(v) for v in values}) == 1:
                out[key] = values[0]
        if out:
            facts.append({"setting": setting, "method": method, "budget": budget, "section": section, "seeds": len(per_seed), "values": out})
    return facts


# ============================================================================================ report
def _fmt(mean: float, se: float | None = None, digits: int = 1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if se is None or math.isnan(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _budget_name(budget: float | None) -> str:
    return "own" if budget is None else f"{budget:.0%}"


def write_figures(grid: Grid, summary: dict, records: list[dict], out: Path) -> list[str]:
    """Pareto (bwt_gem vs measured share), acc vs cost, and per-task curves at the main budget, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_cit.report import write_curves

    written = []
    for setting in grid.settings:
        cells = [c for c in summary["cells"] if c["setting"] == setting.name]
        if not cells:
            continue
        for name, xkey, ykey, xlabel, ylabel in (
            (f"pareto_{setting.name}.png", "replay_share", "bwt_gem", "measured replay share", "bwt_gem (higher: less forgetting)"),
            (f"cost_{setting.name}.png", "flops_ratio", "acc", "training FLOPs ÷ No replay (evaluation excluded)", "acc"),
        ):
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            for method in grid.methods:
                mine = sorted((c for c in cells if c["method"] == method.name), key=lambda c: c[xkey] if not math.isnan(c[xkey]) else 0)
                if not mine:
                    continue
                xs = [c[xkey] for c in mine]
                ys = [c[ykey] for c in mine]
                yerr = [0.0 if math.isnan(c[f"{ykey}_se"]) else c[f"{ykey}_se"] for c in mine]
                ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=method.name, linestyle="-" if len(mine) > 1 else "none")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if xkey == "replay_share":
                ax.set_xscale("symlog", linthresh=0.01)
            ax.set_title(f"{setting.title}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            tmp = out / f".{name}.tmp.png"
            fig.savefig(tmp, dpi=100)
            plt.close(fig)
            os.replace(tmp, out / name)
            written.append(name)
        main = [r for r in records if r["setting"] == setting.name and r["seed"] == grid.seeds[0]
                and (r["budget"] == grid.main_budget or r["budget"] is None)]
        if main:
            runs = [{"label": f"{r['method']}" + ("" if r["budget"] is None else f" {r['budget']:.0%}"),
                     "scores": {"tasks": r["tasks"], "rows": r["rows"] or [str(i) for i in range(len(r["matrix"]))], "matrix": r["matrix"],
                                "safety": r.get("safety")}} for r in main]
            write_curves(out / f"curves_{setting.name}.png", runs)
            written.append(f"curves_{setting.name}.png")
    return written


def write_report(grid: Grid, records: list[dict], out: Path, command: str, seconds: float | None) -> tuple[str, dict[str, Any]]:
    summary = summarize(grid, records)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(grid, summary, records, out)
    lines = [f"# {grid.title}", "", f"Regenerate: `{command}` (grid `{grid.path}`)."]
    cpu_total = sum(r["cost"]["cpu_s"]["total"] for r in records)
    lines.append(f"The {len(records)} runs here took {cpu_total / 3600:.2f} CPU-hours in all (each run's process CPU time, one torch "
                 f"thread; process start-up and imports not included): about {cpu_total / 7200:.1f} h of wall time on 2 idle cores "
                 "with `--parallel 2`.")
    if seconds is not None:
        lines.append(f"The last invocation took {seconds / 60:.1f} min wall; the report holds {len(records)} finished runs "
                     f"(per-run wall time, single-threaded, is in compare.json).")
    lines += [
        "",
        (f"Budgets: {', '.join(_budget_name(b) for b in grid.budgets)} of every batch from replay (main budget {_budget_name(grid.main_budget)}: "
        f"seeds {', '.join(map(str, grid.seeds))}; other budgets: seeds {', '.join(map(str, grid.budget_seeds))}). "
        "`share` is the *measured* replay share (CostMeter: replayed ÷ all samples over tasks 2..T). "
        f"Paired differences are to **{grid.reference}** at the same setting, budget and seed, with a 95% percentile "
        "bootstrap interval of the mean difference; a method wins or loses only when the interval excludes 0. "
        f"Cost: training FLOPs (evaluation excluded; 2N per forward position + 4N per back-propagated one) and CPU seconds, "
        f"each ÷ **{grid.baseline}** at the same seed. Scores 0..100; `bwt_gem` divides by T−1."),
        "",
    ]
    for setting in grid.settings:
        cells = [c for c in summary["cells"] if c["setting"] == setting.name]
        if not cells:
            continue
        own = []
        if setting.budgets is not None:
            own.append("budgets " + ", ".join(_budget_name(b) for b in setting.budgets))
        if setting.budget_seeds is not None:
            own.append("seeds at the budgets other than the main one: " + ", ".join(map(str, setting.budget_seeds)))
        lines += [f"## {setting.title}", "", f"Config: `{' + '.join(setting.config)}`." + (f" On this setting: {'; '.join(own)}." if own else ""), ""]
        diag = cells[0]["diagonal"]
        tasks = next(r["tasks"] for r in records if r["setting"] == setting.name)
        lines.append("Learned right after training (diagonal, mean over this setting's runs): "
                     + ", ".join(f"{t} {_fmt(mean_se([c['diagonal'][i] for c in cells])[0])}" for i, t in enumerate(tasks)) + ".")
        del diag
        steps = sorted({int(c["optimizer_steps"]) for c in cells})
        tokens = [c["tokens"] for c in cells]
        lines.append(f"Every run: {' / '.join(map(str, steps))} optimizer steps, {min(tokens):,.0f}–{max(tokens):,.0f} training tokens "
                     "(non-padding positions of the training batches).")
        lines += ["", "| method | budget | share | seeds | acc | bwt_gem | nta | ref | Δacc vs ref [95%] | Δbwt vs ref [95%] | FLOPs ÷ base | CPU ÷ base | extra fwd pos. |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        order = {m.name: i for i, m in enumerate(grid.methods)}
        for c in sorted(cells, key=lambda c: (order.get(c["method"], 99), -1 if c["budget"] is None else c["budget"])):
            vs = c.get("vs_reference")
            dacc = dbwt = "–"
            if vs:
                a, b = vs["acc"], vs["bwt_gem"]
                dacc = f"{a['mean']:+.1f} [{a['low']:+.1f}, {a['high']:+.1f}] {a['verdict']}" if not math.isnan(a["low"]) else f"{a['mean']:+.1f}"
                dbwt = f"{b['mean']:+.1f} [{b['low']:+.1f}, {b['high']:+.1f}] {b['verdict']}" if not math.isnan(b["low"]) else f"{b['mean']:+.1f}"
            lines.append(f"| {c['method']} | {_budget_name(c['budget'])} | {c['replay_share']:.3f} | {len(c['seeds'])} | "
                         f"{_fmt(c['acc'], c['acc_se'])} | {_fmt(c['bwt_gem'], c['bwt_gem_se'])} | {_fmt(c['nta'], c['nta_se'])} | "
                         f"{c.get('reference', '–')} | {dacc} | {dbwt} | {_fmt(c['flops_ratio'], digits=2)} | {_fmt(c['cpu_ratio'], digits=2)} | {c['extra_forward_positions']:.0f} |")
        lines += ["", *(f"![{f}]({out.name}/{f})" for f in figures if f.endswith(f"_{setting.name}.png")), ""]
    facts = method_facts(records)
    if facts:
        lines += ["## What the methods recorded about themselves", "",
                  "From each run's `scores.json` (`methods.<callback>`); numbers are means over the seeds shown.", "",
                  "| setting | method | budget | callback | seeds | values |", "|---|---|---|---|---|---|"]
        for f in facts:
            values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in f["values"].items())
            lines.append(f"| {f['setting']} | {f['method']} | {_budget_name(f['budget'])} | {f['section']} | {f['seeds']} | {values} |")
        lines.append("")
    if grid.notes:
        lines += [grid.notes.strip(), ""]
    text = "\n".join(lines) + "\n"
    return text, summary


def main(argv: list[str] | None = None) -> int:
    """``lightning-cit compare``: exit 2 with one ``error:`` line for a bad grid, 1 when a run failed."""
    try:
        return _main(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-cit compare", description=__doc__.split("\n\n")[0].split(": ", 1)[-1])
    parser.add_argument("grid", nargs="?", default="configs/compare/grid.yaml", help="the grid file (default: configs/compare/grid.yaml)")
    parser.add_argument("--quick", action="store_true", help="the grid at its quick size (its `quick` section)")
    parser.add_argument("--runs", default=None, help="where runs go (default: runs/compare, or runs/compare-quick)")
    parser.add_argument("--out", default=None, help="report path stem (default: docs/results/compare, or runs/compare-quick/compare)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs; run nothing")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods (the report still shows every finished run)")
    parser.add_argument("--settings", nargs="+", default=None, help="run only these settings")
    args = parser.parse_args(argv)
    repo = Path.cwd()
    grid = load_grid(args.grid, repo)
    if args.quick:
        grid = quick_grid(grid)
    runs_dir = Path(args.runs or ("runs/compare-quick" if args.quick else "runs/compare")).resolve()
    stem = Path(args.out or ("runs/compare-quick/compare" if args.quick else "docs/results/compare"))
    command = f"lightning-cit compare {args.grid}" + (" --quick" if args.quick else "")  # what regenerates the whole report
    for flag, chosen, valid in (("--methods", args.methods, [m.name for m in grid.methods]), ("--settings", args.settings, [s.name for s in grid.settings])):
        unknown = [c for c in chosen or [] if c not in valid]
        if unknown:
            raise ConfigError(f"{flag}: unknown {unknown}; valid: {valid}")
    start = time.perf_counter()
    seconds = None
    failed: RunFailed | None = None
    if not args.report_only:
        def only(run: RunSpec) -> bool:
            return (args.methods is None or run.method.name in args.methods) and (args.settings is None or run.setting.name in args.settings)

        try:
            run_grid(grid, runs_dir, repo, args.parallel, args.threads, only=only)
        except RunFailed as err:
            failed = err
        seconds = time.perf_counter() - start
    records = [json.loads((runs_dir / spec.key / "run.json").read_text()) for spec in grid.runs() if (runs_dir / spec.key / "run.json").exists()]
    if not records:
        raise ConfigError(f"no finished run under {runs_dir}")
    figures_dir = stem.parent / stem.name
    text, summary = write_report(grid, records, figures_dir, command.strip(), seconds)
    atomic_write_text(stem.with_suffix(".md"), text)
    atomic_write_json(stem.with_suffix(".json"), {"command": command.strip(), "grid": grid.path, "runs": records, **summary,
                                                  "method_facts": method_facts(records)})
    print(text)
    if failed is not None:  # the report holds the runs that finished
        raise failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
