"""Every method on the real-data SmolLM2 sequence (``configs/real/smollm2_sequence.yaml``): docs/results/real.{md,json}.

    python benchmarks/real_sequence.py --size sweep --seeds 0 --threads 1     # what docs/results/real.md reports
    python benchmarks/real_sequence.py --size full --methods "No replay"      # the config's own sizes, one method

It reuses the cit-synth sweep machinery (:mod:`benchmarks.cit_synth`: ``apply_method`` swaps the
controller / adds a method's callbacks, ``run_one`` runs one ``lightning-cit fit`` and reuses a finished
run) on a copy of the config whose sizes are set by ``--size``:

- ``full``: the config as it is (30 steps of 8 per task, 16 eval samples per task; about 20 minutes on
  2 idle cores);
- ``sweep``: 6 steps of 4 per task, 4 eval samples per trained task, 6 general-ability and 8 safety
  samples: small enough that a run takes about 10-15 minutes on one thread of a 2-core CPU shared by four jobs.
  At this size a task's score moves in steps of 25 points: it checks that every method runs end to end on
  real data and what it costs, not which method is better.

Each run's wall time is stored beside it (``wall_s.json``). The summary of every run, with the TRACE
deltas of the probes, comes from :mod:`lightning_cit.report`; ProxyMix joins the table when its callback exists.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import yaml
from cit_synth import mean_se, run_one, slug

from lightning_cit.report import load_run, run_summary
from lightning_cit.results import atomic_write_json, atomic_write_text

CONFIG = "configs/real/smollm2_sequence.yaml"
CB = "lightning_cit.callbacks."
FIRST_LINE = "^[^\n]*"  # every realdata prompt starts with its instruction line (tech-support: the question)


def _config_args(path: str, class_name: str) -> dict:
    """A method's init_args as its own config sets them (configs/<method>.yaml), so the sweep uses the shipped recipe."""
    data = yaml.safe_load((REPO / path).read_text())
    for callback in data["trainer"]["callbacks"]:
        if callback["class_path"] == CB + class_name:
            return dict(callback.get("init_args") or {})
    raise KeyError(f"{path} has no {class_name}")


def real_methods() -> dict[str, dict]:
    """The methods of the sweep: the baselines and every landed method with its own config's settings."""
    mssr = {**_config_args("configs/mssr.yaml", "MSSRReplay"), "decision_interval": 2}
    grouping = {**_config_args("configs/lcia.yaml", "InstructionGrouping"), "instruction_pattern": FIRST_LINE}
    dynamic_ema = _config_args("configs/lcia.yaml", "DynamicEMA")
    opr = {**_config_args("configs/opr.yaml", "OnPolicyReplay"), "budget": 16, "candidates_per_task": 16}
    jfa = {**_config_args("configs/jfa.yaml", "JointFlashbackAdaptation"), "flashbacks_per_task": 8}
    methods = {
        "No replay": {"controller": {"class_path": CB + "NoReplay"}},
        "Fixed ratio 20%": {"controller": {"class_path": CB + "FixedRatio", "init_args": {"ratio": 0.2}}},
        "MSSR": {"controller": {"class_path": CB + "MSSRReplay", "init_args": mssr}},
        "LCIA (DynamicEMA + grouping)": {
            "controller": {"class_path": CB + "NoReplay"},
            "add": [{"class_path": CB + "InstructionGrouping", "init_args": grouping},
                    {"class_path": CB + "DynamicEMA", "init_args": dynamic_ema}],
        },
        "OPR-RU": {"controller": {"class_path": CB + "SizeProportional"},
                   "add": [{"class_path": CB + "OnPolicyReplay", "init_args": opr}]},
        "JFA": {"controller": {"class_path": CB + "FixedRatio", "init_args": {"ratio": 0.2}},
                "add": [{"class_path": CB + "JointFlashbackAdaptation", "init_args": jfa}],
                "data": {"buffer_size": 0}},
    }
    callbacks = importlib.import_module("lightning_cit.callbacks")
    if hasattr(callbacks, "ProxyMix") and (REPO / "configs" / "proxymix").is_dir():
        # the lead's ProxyMix controller, with its frozen policy, when it has landed (see configs/proxymix/)
        proxymix = sorted((REPO / "configs" / "proxymix").glob("*.yaml"))
        if proxymix:
            try:
                methods["ProxyMix"] = {"controller": {"class_path": CB + "ProxyMix",
                                                      "init_args": _config_args(str(proxymix[0].relative_to(REPO)), "ProxyMix")}}
            except KeyError:
                pass
    return methods


SIZES = {
    "full": {},
    "sweep": {
        "data": {"steps_per_task": 6, "global_batch_size": 4, "buffer_size": 16},
        "model": {"warmup_steps": 1},
        "tasks": {"train": {"eval_size": 4, "probe_size": 2}, "general_mmlu": {"eval_size": 6}, "safety": {"eval_size": 8},
                  "tech_qa": {"eval_size": 4, "probe_size": 2, "max_new_tokens": 16}},
        "probe_every_n_steps": 3,
    },
}
SIZE_TEXT = {
    "full": "30 optimizer steps of 8 samples per task, 16 eval samples per trained task and per probe (safety: 32), buffers of 32",
    "sweep": "6 optimizer steps of 4 samples per task (24 samples of the 400-sample training pool), 4 eval samples per "
             "trained task (tech_qa answers cut at 16 tokens), 6 general-ability (MMLU) and 8 safety samples, buffers of 16 "
             "samples per task, warmup 1 step",
}


def sized_config(size: str, out: Path) -> Path:
    """The config with the sizes of ``size`` written to ``out`` (the methods are applied on top of it)."""
    data = yaml.safe_load((REPO / CONFIG).read_text())
    profile = copy.deepcopy(SIZES[size])
    data["data"].update(profile.get("data", {}))
    data["model"].update(profile.get("model", {}))
    for task in data["data"]["tasks"]:
        task.update(profile.get("tasks", {}).get(task["name"], profile.get("tasks", {}).get("train", {}) if task.get("train", True) else {}))
    if "probe_every_n_steps" in profile:
        for callback in data["trainer"]["callbacks"]:
            if callback["class_path"].endswith("ForgettingEvaluator"):
                callback["init_args"]["probe_every_n_steps"] = profile["probe_every_n_steps"]
    # relative sources (the safety probe file) resolve against the repository, wherever the sweep runs
    for task in data["data"]["tasks"]:
        if not task["source"].startswith(("callable:", "synth:")) and not Path(task["source"]).is_absolute():
            task["source"] = str(REPO / task["source"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def timed_run(method: str, seed: int, runs: Path, threads: int, config: Path, methods: dict) -> tuple[dict, float | None]:
    root = runs / f"{slug(method)}-seed{seed}"
    timing = root / "wall_s.json"
    start = time.time()
    scores = run_one(method, seed, runs, threads, str(config), methods)
    if not timing.exists():
        atomic_write_json(timing, {"wall_s": time.time() - start, "threads": threads})
    return scores, json.loads(timing.read_text())["wall_s"]


NOTES = """## Reading the table

(notes are written after the sweep; see below)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="sweep", choices=list(SIZES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=None, help="method names (default: all)")
    parser.add_argument("--runs", default=None, help="where the runs go (default: runs/real-<size>)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results"), help="where real.{md,json} go")
    parser.add_argument("--name", default="real", help="file name of the results (default: real)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no_docs", action="store_true", help="only run, write no results files")
    args = parser.parse_args()
    methods = real_methods()
    chosen = args.methods or list(methods)
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(methods)}")
    runs = Path(args.runs or REPO / "runs" / f"real-{args.size}").resolve()
    config = sized_config(args.size, runs / "config.yaml")
    rows, tasks = [], None
    for method in chosen:
        per_seed = []
        for seed in args.seeds:
            try:
                scores, wall = timed_run(method, seed, runs, args.threads, config, methods)
            except RuntimeError as err:
                print(f"{method} seed {seed}: {err}", flush=True)
                continue
            per_seed.append((scores, wall))
            print(f"{method} seed {seed}: done in {wall:.0f} s", flush=True)
        if not per_seed:
            continue
        summaries = [run_summary(load_run(s, f"{method}")) for s, _ in per_seed]
        tasks = per_seed[0][0]["tasks"]
        row: dict = {"method": method, "seeds": len(per_seed), "wall_s": [w for _, w in per_seed]}
        for key in summaries[0]:
            row[key], row[f"{key}_se"] = mean_se([s[key] for s in summaries])
        row["matrices"] = [s["matrix"] for s, _ in per_seed]
        row["eval_only"] = [s.get("eval_only", {}) for s, _ in per_seed]
        row["safety"] = [s.get("safety") for s, _ in per_seed]
        rows.append(row)
    if args.no_docs or not rows:
        return
    write_docs(args, rows, tasks)


TABLE_KEYS = ("acc", "bwt_gem", "bwt_trace", "fwt", "forgetting_chaudhry", "fgt_proxymix", "forgetting_mssr", "nta",
              "general_delta", "safety_delta", "safety")


def write_docs(args: argparse.Namespace, rows: list[dict], tasks: list[str]) -> None:
    seeds = " ".join(map(str, args.seeds))
    command = f"python benchmarks/real_sequence.py --size {args.size} --seeds {seeds} --threads {args.threads}"
    out = Path(args.out)
    atomic_write_json(out / f"{args.name}.json", {"command": command, "config": CONFIG, "size": args.size, "sizes": SIZE_TEXT[args.size],
                                                   "tasks": tasks, "rows": rows})
    one_seed = len(args.seeds) == 1
    fmt = (lambda r, k: f"{r[k]:.1f}") if one_seed else (lambda r, k: f"{r[k]:.1f} ± {r[k + '_se']:.1f}")
    lines = [
        "# SmolLM2-135M-Instruct on a real-data sequence: every method",
        "",
        (f"Sequence {' -> '.join(tasks)} (LoRA r=8 on all projections, lr 5e-4; config `{CONFIG}`), with two evaluation-only "
         "probes scored at every row: `general_mmlu` (never-trained MMLU subjects) and `safety` (hand-written harmful / benign requests)."),
        f"Sizes (`--size {args.size}`): {SIZE_TEXT[args.size]}.",
        f"Seeds: {seeds}." + (" **One seed: the noise is not estimated**; with 4 eval samples per task one sample moves a "
                              "task's score by 25 points." if one_seed else " Mean ± standard error over seeds."),
        ("Scores 0..100; `bwt_gem` divides by T-1, `bwt_trace` by T; `general_delta` / `safety_delta` are TRACE's deltas, the "
         "probe's final score minus its base-row score; `safety` = refusal on harmful − over-refusal on benign, last row."),
        "",
        f"Reproduce: `{command}` (then `lightning-cit report runs/real-{args.size}/* --out DIR` for heatmaps and curves)",
        "",
        "| method | " + " | ".join(TABLE_KEYS) + " | wall (min) |",
        "|---|" + "---|" * (len(TABLE_KEYS) + 1),
    ]
    for row in rows:
        cells = [fmt(row, k) if row.get(k) is not None else "n/a" for k in TABLE_KEYS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {', '.join(f'{w / 60:.1f}' for w in row['wall_s'])} |")
    lines += ["", "Final score rows (one per method, first seed):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(f"{v:.1f}" for v in row["matrices"][0][-1]) + " |")
    notes = REPO / "benchmarks" / "real_notes.md"
    lines += ["", notes.read_text() if notes.exists() else NOTES]
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
