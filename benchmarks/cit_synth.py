"""Reproduce the cit-synth comparisons in ``docs/results``: each suite's methods over several seeds.

    python benchmarks/cit_synth.py --suite baselines --seeds 0 1 2   # docs/results/cit-synth.{md,json}
    python benchmarks/cit_synth.py --suite mssr --seeds 0 1 2        # docs/results/mssr.{md,json}

Each (method, seed) is one ``lightning-cit fit --config configs/quickstart.yaml`` with the
controller swapped; the table gives the mean and the standard error over seeds of every named
summary metric. Finished runs are reused (their scores.json is read back), so an interrupted
sweep continues where it stopped. ``--threads`` sets torch threads per run and ``--parallel`` how
many runs go at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_cit.metrics import SUMMARY_KEYS  # noqa: E402
from lightning_cit.results import atomic_write_json, atomic_write_text  # noqa: E402

MSSR_BUDGET = 0.0273  # mean λ(t) of configs/mssr.yaml over tasks 2-5 (steps 300..1499), rounded

BASELINES = {
    "No replay": {"class_path": "lightning_cit.callbacks.NoReplay"},
    "Fixed ratio 1%": {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.01}},
    "Fixed ratio 5%": {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.05}},
    "Fixed ratio 20%": {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.2}},
    "Proportional": {"class_path": "lightning_cit.callbacks.Proportional", "init_args": {"decision_interval": 50}},
}
MSSR = {
    "MSSR": {"class_path": "lightning_cit.callbacks.MSSRReplay", "init_args": {}},
    "Fixed ratio": {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": MSSR_BUDGET}},
    "MSSR sampler only": {"class_path": "lightning_cit.callbacks.MSSRReplay", "init_args": {"schedule": "fixed", "fixed_ratio": MSSR_BUDGET}},
    "MSSR scheduler only": {"class_path": "lightning_cit.callbacks.MSSRReplay", "init_args": {"sampler": "uniform"}},
}
SUITES = {
    "baselines": {"config": "configs/quickstart.yaml", "name": "cit-synth", "methods": BASELINES, "title": "cit-synth: replay baselines"},
    "mssr": {"config": "configs/mssr.yaml", "name": "mssr", "methods": MSSR, "title": "MSSR on cit-synth: memory-strength replay vs fixed ratio at the same budget"},
}
METHODS = {**BASELINES, **MSSR}
FULL_FT_SETUP = "tiny Llama, full fine-tuning, 300 steps of 32 per task, buffers of 10% of each task"


NOTES = {"mssr": """## Reading the table

- **Same budget.** Every row replays 2.73% of the batches of tasks 2-5 on average; this was checked on the
  checkpointed decisions: MSSR's λ(t) falls from 4.0% to 1.9% (Eq.9, `λ0=0.04, λ_min=0.01, β_r=1e-3`),
  and Fixed ratio and the sampler-only ablation use the constant 2.73%.
- **On cit-synth MSSR loses to a fixed ratio at the same budget**, and so does each half of it. The paper
  reports +1 to +2.5 points for MSSR over fixed replay on 3-task LLM sequences; this benchmark does not
  reproduce that. What the runs show:
  - *Scheduler:* a decaying ratio moves replay to the early tasks, when few tasks need protecting, and away
    from the late ones, when four do. Here every new task overwrites the same input associations, so late
    replay matters most.
  - *Sampler:* `p ∝ m^-ζ` favours long-unreviewed, high-loss entries. These are the oldest buffers' entries,
    so the newest buffer (`shift`) is starved: it ends at 17-63 under MSSR against 92-99 under Fixed ratio.
- **Hazard scale.** The hazards are per optimizer step, and the paper's defaults assume each entry is
  reviewed about every 13 steps (1024 entries, batch 256 at λ≈0.3). At cit-synth's rate (an entry about
  every 400 steps), the defaults drive `m` to e^-40 between reviews, and `m^-ζ` then sends all replay to one
  buffer. Earlier runs of this sweep with the unscaled α = 0.01 and γ_d = 0.2 gave acc 28.7 (bwt_gem -81.8)
  with re-scoring and 35.7 (bwt_gem -73.1) before re-scoring was added. `configs/mssr.yaml` therefore
  scales α and γ_d by 1/30. Other scalings and ζ < 1 were not searched.
- **Cost.** `python benchmarks/mssr_overhead.py` on one thread: the memory updates and decisions take
  0.37 ms per step, 0.8% of the tiny model's 44 ms step. The re-scoring forward pass over the buffer, every
  50 steps, adds 5.3 ms per step for 400 entries (13%) and 12.5 ms for 1024 entries (29%). That cost scales
  with buffer size / (global batch × interval); at the paper's batch of 256 it would be about 8× smaller.
  `rescore_interval` sets it.
- Three seeds on a 2-core CPU; standard errors are of the mean over seeds.
""", "baselines": """## Reading the table

- The budget is the share of every batch drawn from replay (`FixedRatio.ratio`); every finished task keeps a
  buffer of 10% of its 1000 training samples. Without replay every earlier task collapses (`bwt_gem` about -83;
  `compare`, the last task, is multiple choice, so its floor is chance, about 50). 20% replay removes nearly all
  forgetting; 1% leaves most of it and 5% part of it, mostly on the first tasks (`safety`, `cipher_a`):
  the range where a smarter allocation of the same budget can win.
- `Proportional` is not budget-matched: its weights follow the probe losses of all sources, current task
  included, re-decided every 50 steps. Its replay share averaged 0.50 over tasks 2-5 (read from the
  controllers' checkpointed decisions) but swung between 0.001 and 0.999: at a task start the new task's loss
  dominates, so almost nothing is replayed for the first 50 steps and the earlier tasks are damaged before the
  next decision; `forgetting_mssr` (the largest drop at any later row) shows it. A loss-proportional rule
  without normalization reacts to scale, not to forgetting: the motivation for ProxyMix's normalized state.
- Three seeds on a 2-core CPU; standard errors are of the mean over seeds (seed sets model init, data, buffers
  and sampler). Each run takes about 100 s with two threads (`--threads 1 --parallel 2` runs two at once).
- `safety` is the refusal rate on harmful prompts minus the over-refusal rate on benign ones, after the last task.
"""}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_method(data: dict, spec: dict) -> dict:
    """The suite config changed into one method's run.

    A method is either a callback (``class_path``/``init_args``) that replaces the config's first
    callback, the controller (its ``init_args`` are merged in when it is the same class), or a dict with
    ``controller`` (the same), ``callbacks`` (``{class_path: init_args to merge, or None to drop}``),
    ``add`` (callbacks inserted right after the controller, so before the evaluator), ``model`` and
    ``data`` (merged into those sections).
    """
    spec = json.loads(json.dumps(spec))
    if "class_path" in spec:
        spec = {"controller": spec}
    callbacks = data["trainer"]["callbacks"]
    if "controller" in spec:
        base, controller = callbacks[0], spec["controller"]
        if controller["class_path"] == base["class_path"]:  # a variant of the config's own controller
            controller["init_args"] = {**base.get("init_args", {}), **controller.get("init_args", {})}
        callbacks[0] = controller
    for class_path, init_args in spec.get("callbacks", {}).items():
        matches = [c for c in callbacks if c["class_path"] == class_path]
        if not matches:
            raise KeyError(f"the suite config has no callback {class_path}")
        for callback in matches:
            if init_args is None:
                callbacks.remove(callback)
            else:
                callback["init_args"] = {**callback.get("init_args", {}), **init_args}
    callbacks[1:1] = spec.get("add", [])
    for section in ("model", "data"):
        if section in spec:
            data[section] = _merge(data.get(section, {}), spec[section])
    return data


def slug(name: str) -> str:
    return name.lower().replace(" + ", "_plus_").replace(" ", "_").replace("%", "pct")


def run_one(method: str, seed: int, runs: Path, threads: int, config: str) -> dict:
    root = runs / f"{slug(method)}-seed{seed}"
    done = [p for p in root.rglob("scores.json") if json.loads(p.read_text()).get("complete")]
    if done:
        return json.loads(done[0].read_text())
    import yaml

    data = apply_method(yaml.safe_load(Path(config).read_text()), METHODS[method])
    root.mkdir(parents=True, exist_ok=True)
    sweep_config = root / "sweep_config.yaml"
    sweep_config.write_text(yaml.safe_dump(data, sort_keys=False))
    cmd = [
        sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(sweep_config),
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--seed_everything", str(seed), "--data.seed", str(seed),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    log = root.with_suffix(".log")
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{method} seed {seed} failed; see {log}")
    return json.loads(next(root.rglob("scores.json")).read_text())


def mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--suite", default="baselines", choices=list(SUITES))
    parser.add_argument("--runs", default=None, help="where the runs go (default: runs/<suite name>)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    suite = SUITES[args.suite]
    runs = Path(args.runs or f"runs/{suite['name']}").resolve()
    config = str(REPO / suite["config"])
    jobs = [(m, s) for m in suite["methods"] for s in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: run_one(job[0], job[1], runs, args.threads, config), jobs))
    by_method: dict[str, list[dict]] = {}
    for (method, _), scores in zip(jobs, results):
        by_method.setdefault(method, []).append(scores)
    command = f"python benchmarks/cit_synth.py --suite {args.suite} --seeds {' '.join(map(str, args.seeds))}"
    keys = [*SUMMARY_KEYS, "safety_score"]
    rows = []
    for method, scores_list in by_method.items():
        row: dict = {"method": method, "seeds": len(scores_list)}
        for key in keys:
            values = [s["safety"]["score"][-1] if key == "safety_score" else s["summary"][key] for s in scores_list]
            row[key], row[f"{key}_se"] = mean_se(values)
        row["final_rows"] = [s["matrix"][-1] for s in scores_list]
        rows.append(row)
    tasks = results[0]["tasks"]
    out = Path(args.out)
    atomic_write_json(out / f"{suite['name']}.json", {"command": command, "config": suite["config"], "tasks": tasks, "rows": rows})
    lines = [
        f"# {suite['title']}",
        "",
        f"Sequence {' -> '.join(tasks)} ({suite.get('setup', FULL_FT_SETUP)}; config `{suite['config']}`).",
        f"Mean ± standard error over seeds {', '.join(map(str, args.seeds))}. Scores in 0..100; `bwt_gem` divides by T-1, "
        "`bwt_trace` by T (see README, Metrics).",
        "",
        f"Reproduce: `{command}`",
        "",
        "| method | acc | bwt_gem | bwt_trace | fwt | forgetting_chaudhry | fgt_proxymix | forgetting_mssr | nta | safety |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row[k]:.1f} ± {row[k + '_se']:.1f}" for k in
                 ("acc", "bwt_gem", "bwt_trace", "fwt", "forgetting_chaudhry", "fgt_proxymix", "forgetting_mssr", "nta", "safety_score")]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    lines += ["", NOTES[args.suite]]
    atomic_write_text(out / f"{suite['name']}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
