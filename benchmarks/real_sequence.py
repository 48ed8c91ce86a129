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
    """A method's init_args as its overlay sets them (configs/methods/<method>.yaml), so the sweep uses the shipped recipe."""
    data = yaml.safe_load((REPO / path).read_text())
    for callback in data["trainer"]["callbacks"]:
        if callback["class_path"] == CB + class_name:
            return dict(callback.get("init_args") or {})
    raise KeyError(f"{path} has no {class_name}")


def real_methods() -> dict[str, dict]:
    """The methods of the sweep: the baselines and every landed method with its own config's settings."""
    mssr = {**_config_args("configs/methods/mssr.yaml", "MSSRReplay"), "decision_interval": 2}
    grouping = {**_config_args("configs/methods/lcia.yaml", "InstructionGrouping"), "instruction_pattern": FIRST_LINE}
    dynamic_ema = _config_args("configs/methods/lcia.yaml", "DynamicEMA")
    opr = {**_config_args("configs/methods/opr.yaml", "OnPolicyReplay"), "budget": 16, "candidates_per_task": 16}
    jfa = {**_config_args("configs/methods/jfa.yaml", "JointFlashbackAdaptation"), "flashbacks_per_task": 8}
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

- **What this sweep shows, and what it does not.** Every landed method in the table ran end to end on real data
  with a real pretrained instruct model (LoRA on SmolLM2-135M-Instruct) through the same config. At the sweep size
  (24 training samples per task, 4 eval samples per task, one seed) the scores cannot rank the methods: a task's
  exact-match or multiple-choice score moves in steps of 25 points, and the differences between rows below are one
  or two eval samples. The noise is not estimated (one seed). Read the rows as "runs, and costs this much".
- **The loss matrix is the readable signal.** `sentiment`'s eval loss falls from 1.22 (base) to 0.47 after its
  24 samples and climbs back to 1.15 after the three later tasks without replay (`loss_bwt_gem` averages this with
  the other tasks; `gsm8k`'s loss keeps *falling* after its own task, 2.04 -> 1.55, which offsets it). With 20% fixed
  replay `sentiment` ends at 1.02: a little protection, at this budget. `lightning-cit report` prints
  `loss_bwt_gem` for this reason.
- **GSM8K stays at 0** in every row: a 135M model answering with the final number only (no chain of thought) gets
  none of the 4 eval problems right; training teaches the format (its loss 3.44 -> 2.04) but not arithmetic.
  `mmlu_stem`'s 0 -> 50 is 2 of 4 questions (chance is 25).
- **The safety probe measures nothing on this base.** The dequantized SmolLM2-135M-Instruct does not refuse: on all
  40 harmful requests of `configs/real/data/safety_probe.jsonl` it refused 1 (and that one, "I'm sorry for any
  mistakes...", is a false positive of the refusal markers), on the 40 benign ones 0. Its safety score is 0 at the
  base row, so `safety_delta` is 0 by construction: erosion cannot be seen on a model that has no refusals to lose.
  The probe is wired and scored at every row; it needs an aligned base that refuses to be informative.
- **General ability** (`general_mmlu`, 6 never-trained MMLU questions): 33.3 -> 16.7 is one question.
- **OPR-RU equals No replay here.** With `SizeProportional` the replay share is a buffer's size over the task's
  400 samples: 16 / 416 after task 1 (3.8%), then 2 x 8 and 3 x 5 entries (3.8%, 3.6%). Over 24 draws per task that is
  about one replayed sample per task, and in this seed the draws picked none: the score *and* loss matrices equal No
  replay's to two decimals. OPR's mechanism (rolling out 16 prompts per seen task and keeping the best answers) ran
  at every boundary; at this size it has no batch slot to act through. Its rollouts cost 10 s, 35 s and 82 s at the
  three boundaries (1-2 answer tokens/s on a shared core).
- **LCIA** (`InstructionGrouping` + `DynamicEMA`): every task's instruction line has a TF-IDF similarity of about 0
  to the others', so each task opens its own LoRA adapter and the evaluation routes each task's prompts to its own
  adapter: nothing later can overwrite an earlier task (`DynamicEMA`, `when: reused_group`, never averages, as no
  group is reused). It is the only row whose losses show no forgetting at all (`sentiment` 0.47 -> 0.47,
  `loss_bwt_gem` 0), at the price of one adapter per task. The probes match no group and are answered by the latest
  group's adapter (the official rule, `unmatched: latest`): `general_mmlu` 33 -> 50 is one question more.
- **MSSR is No replay plus a sample or two.** Its replay ratio (`configs/methods/mssr.yaml`: λ(t) from 4% down to 1%, Eq.9)
  of a batch of 4 is about 0.15 samples per batch; its losses differ from No replay's by 0.01-0.02, on
  `gsm8k` (`sentiment` ends at 1.15 in both). Its memory-strength schedule needs far longer tasks to act.
- **JFA keeps the most of `sentiment` among the single-adapter rows**: its eval loss ends at 0.57 (No replay 1.15,
  Fixed ratio 20% 1.02), with 8 flashback prompts per finished task at 20% of every batch and no replayed answers,
  the same pattern as on cit-synth (`docs/results/jfa.md`). Its first attempt in this sweep failed at setup:
  `JointFlashbackAdaptation` read the latent pool's hidden size from `model.model` as a path, which is a model
  *name* here; fixed in `callbacks/jfa.py` (it now uses the folder the module resolved), then rerun.
- **Not in the table.** *ProxyMix* had not landed when the sweep ran; the runner adds it automatically once
  `lightning_cit.callbacks.ProxyMix` and `configs/proxymix/*.yaml` exist, and
  `python benchmarks/real_sequence.py --size sweep --seeds 0` then runs only the missing rows (finished runs are reused).
- **Costs.** Wall times are for one thread while up to three other agents' jobs ran on the same 2 cores (load 5-10
  for the first four rows, near 0 for JFA and MSSR), so they compare badly across rows: OPR's 31 minutes include its
  rollouts *and* the busiest hour of the machine; JFA's 7 minutes, with its extra generation and PCGrad backward
  passes, ran on an almost idle machine.
  Evaluation dominates: a row (30 eval samples) took about 3 minutes, the 6 training steps about 20 seconds.
  Multiple choice is the expensive part: `choose_options` re-reads the whole prompt once per option (4 x ~170 tokens
  per MMLU question), so the 10 MMLU questions of a row cost more than the 20 generated answers.
- **The full-size config** (30 steps of 8 per task, 16 eval samples per task, 32 safety) was not run for lack of
  time; the "about 20 minutes on 2 idle cores" in its header is an extrapolation from these runs (about 3.7x the
  sweep's evaluation work and 10x its training steps, on roughly 4x the CPU share), not a measurement.
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
        row["loss_matrices"] = [s["loss_matrix"] for s, _ in per_seed]
        row["eval_only"] = [s.get("eval_only", {}) for s, _ in per_seed]
        row["safety_sections"] = [s.get("safety") for s, _ in per_seed]
        rows.append(row)
    if args.no_docs or not rows:
        return
    missing = [m for m in methods if m not in {r["method"] for r in rows}] + ([] if "ProxyMix" in methods else ["ProxyMix"])
    write_docs(args, rows, tasks, missing)


TABLE_KEYS = ("acc", "bwt_gem", "bwt_trace", "fwt", "forgetting_chaudhry", "fgt_proxymix", "forgetting_mssr", "nta",
              "loss_bwt_gem", "general_delta", "safety_delta", "safety")


def write_docs(args: argparse.Namespace, rows: list[dict], tasks: list[str], missing: list[str]) -> None:
    seeds = " ".join(map(str, args.seeds))
    command = f"python benchmarks/real_sequence.py --size {args.size} --seeds {seeds} --threads {args.threads}"
    out = Path(args.out)
    atomic_write_json(out / f"{args.name}.json", {"command": command, "config": CONFIG, "size": args.size, "sizes": SIZE_TEXT[args.size],
                                                   "tasks": tasks, "rows": rows, "not_run": missing})
    one_seed = len(args.seeds) == 1
    digits = {"loss_bwt_gem": 3}  # losses are in nats, scores in 0..100

    def fmt(r: dict, k: str) -> str:
        d = digits.get(k, 1)
        return f"{r[k]:.{d}f}" if one_seed else f"{r[k]:.{d}f} ± {r[k + '_se']:.{d}f}"

    lines = [
        "# SmolLM2-135M-Instruct on a real-data sequence: every method",
        "",
        (f"Sequence {' -> '.join(tasks)} (LoRA r=8 on all projections, lr 5e-4; config `{CONFIG}`), with two evaluation-only "
         "probes scored at every row: `general_mmlu` (never-trained MMLU subjects) and `safety` (hand-written harmful / benign requests)."),
        f"Sizes (`--size {args.size}`): {SIZE_TEXT[args.size]}.",
        f"Seeds: {seeds}." + (" **One seed: the noise is not estimated**; with 4 eval samples per task one sample moves a "
                              "task's score by 25 points." if one_seed else " Mean ± standard error over seeds."),
        ("Scores 0..100; `bwt_gem` divides by T-1, `bwt_trace` by T; `general_delta` / `safety_delta` are TRACE's deltas, the "
         "probe's final score minus its base-row score; `safety` = refusal on harmful − over-refusal on benign, last row; "
         "`loss_bwt_gem` is `bwt_gem` computed on the eval-loss matrix (mean rise of an earlier task's loss by the end; "
         "positive = forgetting), the least noisy column at these sizes."),
        "",
        (f"Reproduce: `{command}` (then `lightning-cit report runs/real-{args.size}/*-seed0 --out DIR` for heatmaps and curves; "
         "the figures of these runs are in `docs/results/real-report/`: `curves.png`, `heatmap_*.png`, `table.md`)"),
        "",
        "| method | " + " | ".join(TABLE_KEYS) + " | wall (min) |",
        "|---|" + "---|" * (len(TABLE_KEYS) + 1),
    ]
    for row in rows:
        cells = [fmt(row, k) if row.get(k) is not None else "n/a" for k in TABLE_KEYS]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {', '.join(f'{w / 60:.1f}' for w in row['wall_s'])} |")
    if missing:
        lines += ["", f"Not in this table: {', '.join(missing)} (see below)."]
    lines += ["", "Final score rows (one per method, first seed):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(f"{v:.1f}" for v in row["matrices"][0][-1]) + " |")
    lines += ["", "Eval loss of each task right after it was learned -> after the last task (first seed; lower is better):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row in rows:
        losses = row["loss_matrices"][0]
        lines.append(f"| {row['method']} | " + " | ".join(f"{losses[j + 1][j]:.2f} -> {losses[-1][j]:.2f}" for j in range(len(tasks))) + " |")
    lines += ["", NOTES]
    atomic_write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
