"""Reproduce the cit-synth comparisons in ``docs/results``: each suite's methods over several seeds.

    python benchmarks/cit_synth.py --suite baselines --seeds 0 1 2   # docs/results/cit-synth.{md,json}
    python benchmarks/cit_synth.py --suite mssr --seeds 0 1 2        # docs/results/mssr.{md,json}
    python benchmarks/cit_synth.py --suite jfa --seeds 0 1 2 --parallel 1 --threads 1   # docs/results/jfa.{md,json}

Each (method, seed) is one ``lightning-cit fit`` of the suite's composition (a base config plus a method
overlay, e.g. ``configs/quickstart.yaml`` + ``configs/methods/mssr.yaml``, resolved to one config) with the
controller swapped; the table gives the mean and the standard error over seeds of every named
summary metric. Finished runs are reused (their scores.json is read back), so an interrupted
sweep continues where it stopped. ``--threads`` sets torch threads per run and ``--parallel`` how
many runs go at once.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_cit.compare import mean_se, merge
from lightning_cit.metrics import SUMMARY_KEYS
from lightning_cit.results import atomic_write_json, atomic_write_text

MSSR_BUDGET = 0.0273  # mean λ(t) of configs/methods/mssr.yaml over tasks 2-5 (steps 300..1499), rounded

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
OPR_CALLBACK = "lightning_cit.callbacks.OnPolicyReplay"
OPR = {"Sequential": {"controller": {"class_path": "lightning_cit.callbacks.NoReplay"}, "callbacks": {OPR_CALLBACK: None}}}
for _budget in (0.01, 0.1):
    _pct = f"{round(_budget * 100)}%"
    OPR[f"Vanilla replay {_pct}"] = {"callbacks": {OPR_CALLBACK: {"budget": _budget, "answers": "gold"}}}
    OPR[f"OPR-RU {_pct}"] = {"callbacks": {OPR_CALLBACK: {"budget": _budget, "reward": "ru"}}}
    OPR[f"OPR-SC {_pct}"] = {"callbacks": {OPR_CALLBACK: {"budget": _budget, "reward": "sc"}}}
OPR["OPR-RU low-score 1%"] = {"callbacks": {OPR_CALLBACK: {"budget": 0.01, "reward": "ru", "keep": "bottom"}}}
JFA_CALLBACK = "lightning_cit.callbacks.JointFlashbackAdaptation"
JFA = {
    "No replay": {"controller": {"class_path": "lightning_cit.callbacks.NoReplay"}, "callbacks": {JFA_CALLBACK: None}},
    "Flashback divergence only": {"callbacks": {JFA_CALLBACK: {"latent_tasks": False, "projection": False}}},
    "+ latent tasks": {"callbacks": {JFA_CALLBACK: {"latent_tasks": True, "projection": False}}},
    "JFA": {"callbacks": {JFA_CALLBACK: {}}},
    # not part of JFA: the same share of every batch replays 32 stored samples per task *with* their gold answers
    "Replay, 32 answers per task": {"callbacks": {JFA_CALLBACK: None}, "data": {"buffer_size": 32}},
}
EMA_CALLBACK, GROUPING_CALLBACK = "lightning_cit.callbacks.DynamicEMA", "lightning_cit.callbacks.InstructionGrouping"
LCIA = {
    "No replay": {"callbacks": {GROUPING_CALLBACK: None, EMA_CALLBACK: None}},
    "AdapterEMA": {"callbacks": {GROUPING_CALLBACK: None, EMA_CALLBACK: None},
                   "add": [{"class_path": "lightning_cit.callbacks.AdapterEMA", "init_args": {"decay": 0.99, "when": "after_first_task"}}]},
    "DynamicEMA": {"callbacks": {GROUPING_CALLBACK: None, EMA_CALLBACK: {"when": "after_first_task"}}},
    "DynamicEMA + grouping": {},
    # not the official rule: prompts that match no group are answered by the base model (adapters disabled)
    "DynamicEMA + grouping, base for unmatched": {"callbacks": {GROUPING_CALLBACK: {"unmatched": "base"}}},
}
LORA_BASE = "configs/base/cit_synth_lora.yaml"
SUITES = {
    "baselines": {"config": ["configs/quickstart.yaml"], "name": "cit-synth", "methods": BASELINES, "title": "cit-synth: replay baselines"},
    "mssr": {"config": ["configs/quickstart.yaml", "configs/methods/mssr.yaml"], "name": "mssr", "methods": MSSR, "title": "MSSR on cit-synth: memory-strength replay vs fixed ratio at the same budget"},
    "opr": {"config": [LORA_BASE, "configs/methods/opr.yaml"], "name": "opr", "methods": OPR, "title": "OPR on cit-synth: on-policy replay vs vanilla replay at the same budget",
            "setup": "aligned tiny Llama base + LoRA r=16, 300 steps of 32 per task, safety evaluation-only; replay buffers "
                     "rebuilt at every task end and concatenated with the task's data (SizeProportional)"},
    "lcia": {"config": [LORA_BASE, "configs/methods/lcia.yaml"], "name": "lcia", "methods": LCIA, "title": "LCIA on cit-synth: adapter EMA, dynamic EMA and instruction grouping",
             "setup": "aligned tiny Llama base + LoRA r=16, 300 steps of 32 per task, no replay, safety evaluation-only"},
    "jfa": {"config": [LORA_BASE, "configs/methods/jfa.yaml"], "name": "jfa", "methods": JFA, "title": "JFA on cit-synth: joint flashback adaptation, part by part",
            "setup": "aligned tiny Llama base + LoRA r=16, 300 steps of 32 per task, safety evaluation-only; no replayed answers: "
                     "32 flashback prompts per finished task at 20% of every batch (FixedRatio)"},
}
METHODS = {**BASELINES, **MSSR, **OPR}  # by name, for callers outside a suite; a suite reads its own methods
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
  with re-scoring and 35.7 (bwt_gem -73.1) before re-scoring was added. `configs/methods/mssr.yaml` therefore
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
NOTES["lcia"] = """## Reading the table

- **One adapter, with or without an EMA, forgets almost everything.** AdapterEMA (β = 0.99) is within noise of
  no replay (bwt_gem -72.9 vs -75.5); DynamicEMA (the official code's rule, scale 2, fallback 0.01) is a little
  better (-67.4 ± 3.3). With 300 steps per task a 0.99 average (a horizon of about 100 steps) catches up with
  the live weights long before the task ends, and the task-end copy hands the next task nearly the same
  weights. Averaging slows the drift inside a task; it does not stop a later task from rewriting an adapter.
- **The dynamic weight is mostly its fallback.** Read from the checkpointed statistics: in 84-89% of the
  per-tensor updates the formula `2(1+b)/(a·c)` left (0, 1) (or there was no previous gradient) and w = 0.01
  was used. The remaining updates had large weights (mean w over all updates 0.055-0.081, so about 0.4
  where the formula applied): in effect a 0.99 EMA with occasional large jumps to the live weights. The
  rule's scale is unitless in the code but depends on tensor sizes through the L1 norms; 2 was tuned for
  LLaVA's rank-128 adapters, not for these rank-16 ones. Other scales and the `paper` rule were not swept.
- **Grouping does the work.** TF-IDF with English stop words turns "Encode with key A: ..." and "Encode with
  key B: ..." into the same instruction (the one-letter key is below the tokenizer's two-character minimum
  and "with" is a stop word), so the two ciphers share an adapter and `cipher_a` is forgotten exactly as
  without grouping (about 14 after `cipher_b`); all of the remaining bwt_gem (-28.7) is `cipher_a`. `shift`
  and `compare` open their own adapters, so nothing later can overwrite them: `shift` reaches 100 in its
  fresh adapter (9-55 when it continues the cipher adapter in the other rows) and keeps it.
- **Safety depends on who answers unmatched prompts.** The safety probe matches no group. The official
  test-time rule gives such prompts to the most recent group's adapter, so safety is 0 after the first
  task, as in every single-adapter row (LoRA at lr 3e-3 erases the base's refusals within the first task).
  `unmatched: base` (an option of ours, not the paper's) answers them with the adapters disabled: the
  aligned base keeps refusing (safety 100 at every row) and nothing else changes, except `fwt`, which then
  scores each not-yet-trained task with the base instead of the latest adapter.
- `compare` (multiple choice) is not learned by LoRA at this budget in any row (42-58, chance); in the
  single-adapter rows training on it drives every other task to 0 (the model answers one letter to everything).
- Costs: grouping adds one adapter slot per task (LoRA r=16 on all seven projections: 70k parameters each here) and a decision per
  task start (milliseconds with one template per task). `python benchmarks/ema_overhead.py` measures the EMA
  update: see README, LCIA.
- Three seeds on a 2-core CPU; standard errors are of the mean over seeds.
"""
NOTES["jfa"] = """## Reading the table

- **Setting.** No replayed answers: after each task, 32 of its training prompts (3.2% of the task) become
  flashbacks, drawn at 20% of every batch (`FixedRatio`, `data.buffer_size: 0`). The reference is the model
  at the end of the previous task (`reference: previous_task`): the paper's "original model" cannot do the
  earlier *trained* tasks here, so pulling toward it would erase them. Divergence: symmetric KL, token mean
  over the reference's greedy continuation, `alpha = 1`.
- **The flashback divergence does almost all the work.** It takes `bwt_gem` from -75.5 (no replay) to -0.8:
  `cipher_a` and `cipher_b` stay at 98-100 through three later tasks in every seed. Replaying the same number
  of prompts *with their gold answers* at the same 20% share (last row, not part of JFA) protects far less
  and erratically (`bwt_gem` -62.7, -20.1, +0.2 over the seeds): 32 hard targets per task can be memorized
  without keeping the cipher, while the KL matches the previous model's whole next-token distribution at
  every position of the continuation, a much denser constraint on the same prompts.
- **Latent tasks** leave forgetting where it was (-1.2 ± 1.0 vs -0.8 ± 0.5) and raise the last task, the
  multiple-choice `compare`, from 42-50 to 70-75 in all three seeds (no replay: 42-58), which is most of the
  `acc`/`nta` gain. We have no verified explanation: the increments are applied only in the training forward
  (the evaluator scores without them), so the effect is on how the adapters train, not extra capacity at test.
- **Projection hurts here.** Adding PCGrad (the full method, "JFA") raises forgetting to -4.3 ± 1.6
  (`cipher_a` ends at 81-92 instead of 98-100). When the two gradients conflict PCGrad removes from the
  flashback gradient its component against the new-task gradient, which is exactly the part that protects the
  old task; with one new task and strong protection already, there is little conflict to resolve in the other
  direction. The paper's setting (one large new stage, a general-ability reference) may differ.
- **What none of the rows fixes.** `shift` is learned poorly in every row, no replay included (9-81 after its
  own task, seed-dependent): it is the hardest task for a rank-16 adapter in 300 steps, not an effect of JFA.
  `safety` (evaluation-only) is lost after the first task in every row: no flashback covers it, and the
  previous-task reference has already lost it (`reference: base` with safety prompts as flashbacks would be the
  paper's use; eval-only tasks cannot be flashback sources in this version).
- **Cost.** Median step time with batch 32 (26 new + 6 flashbacks), one thread, relative to a plain LoRA step:
  1.21x with the divergence (one no-grad reference forward on the flashback rows), 1.28x with latent tasks,
  1.88x with projection (two extra backward passes to get the per-objective gradients, plus one all-reduce
  of the trainable gradients under DDP). A full run took 140-150 s per JFA variant on a shared 2-core CPU.
- Three seeds; standard errors are of the mean over seeds (seed sets data, buffers, flashback choice and sampler).
"""
NOTES["opr"] = """## Reading the table

- **Budget-matched by construction.** Every replay row uses the same callback (`OnPolicyReplay`) and controller
  (`SizeProportional`: buffers concatenated with the task's 1000 samples, so 1% / 10% budgets replay about 1% / 9%
  of each batch); after task k the budget (10 or 100 samples) is split ⌊budget/k⌋ over the k seen tasks. Vanilla
  replay (`answers: gold`) keeps the first prompts of the same seeded candidate order with their reference answers;
  OPR keeps the best-scored of *all* 1000 prompts per seen task with the model's own answers (temperature 0.1).
- **On cit-synth OPR-RU is, most of the time, Vanilla replay.** Right after a task the model answers nearly every
  prompt of it exactly (edit similarity 100 on all 1000 cipher prompts), so the on-policy answer *is* the reference,
  every score ties, ties keep the same candidate order, and the OPR-RU buffer equals the Vanilla one entry for
  entry. The runs are then bit-identical: OPR-RU 1% and Vanilla 1% agree through the `cipher_b` row in all 3 seeds
  (seed 1 through `shift`), OPR-RU 10% and Vanilla 10% through the `shift` row. `cipher_a` after `cipher_b` (row 2,
  mean over seeds): Sequential 14.0, Vanilla 1% and OPR-RU 1% both 74.8 ± 16.6, Vanilla 10% and OPR-RU 10% both 100.
  The ±16.6 is replay-order noise (43.5 to 100 across seeds with 10 samples); an earlier version of the sweep that
  stored OPR's entries in score order instead of data order moved that number to 90.2 with *identical* buffer
  contents, so differences of that size between rows here mean nothing.
- **Where the rows do differ, OPR preserves the current policy, good or bad.** `shift` and `compare` are barely
  learned with LoRA in 300 steps (`shift` scores 7-19 right after training it in 22 of 24 runs, `compare` stays
  at chance) and training them wipes both ciphers to about 10 under every method, Vanilla 10% included. From then on the model answers old prompts with
  one or two letters; OPR-RU keeps the best of those (mean RU 17 of 100) and replays them during `compare`, which keeps
  the model writing one right letter (final cipher scores about 10 in two of three seeds at 10%), while Vanilla's 6-letter references no longer
  stop the collapse to the "A"/"B" answers of `compare` (final 0). That is the whole of OPR's better `bwt_gem` at 10%
  (-63 vs -70) and 1%: the paper's "KL shrinkage" (staying near the current model) measured on a model that had
  already forgotten, not knowledge kept. The paper's premise, a model that is still partly right on old prompts
  with answers that differ from the references in form, does not occur in this synthetic sequence.
- **OPR-SC picks a narrow buffer.** Self-confidence selects the most certain answers: after `cipher_a` its 10 picks
  use only 5-7 of the 10 cipher letters (e.g. `haiehh`, `aiaiia`), so they cover less of the substitution table than the
  random picks of Vanilla/OPR-RU, and `cipher_a` after `cipher_b` drops to 43.8 ± 9.1 (vs 74.8). At 10% the 33-100
  picks cover the table and SC matches RU up to the noise.
- **Low-score ablation.** At the first boundary every score ties at 100, so keeping the bottom scores keeps the same
  prompts as the top (and as Vanilla); the ablation only differs after the model has forgotten, and it ends where
  OPR-RU 1% does (`bwt_gem` -68.0 vs -68.3). The paper's "low-score < Vanilla" is not testable here.
- **Cost.** Rolling out all 1000 prompts of every seen task took 0.9-1.6 s, 1.9-3.5 s and 2.1-5.6 s at the three
  boundaries (1400-7000 answer tokens/s on one CPU thread, `opr/tokens_per_s` in metrics.csv), about 7 s in a run of
  1.5-2.3 minutes on an idle core, so `candidates_per_task` stays null (all prompts, as in the paper). `compare`
  (multiple choice) is never rolled out here because it is the last task.
- `safety` (evaluation-only) is lost at the first task under every method: no row replays it. Three seeds, 2-core
  CPU shared with other jobs; standard errors are of the mean over seeds.
"""


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
            data[section] = merge(data.get(section, {}), spec[section])
    return data


_RESOLVE_LOCK = threading.Lock()
_RESOLVED: dict[tuple[str, ...], dict] = {}


def resolved(config: str | list[str]) -> dict:
    """The config a composition (one path or a list of ``--config`` paths) resolves to; a fresh copy every call."""
    from lightning_cit.cli import resolve_config

    key = (config,) if isinstance(config, str) else tuple(config)
    with _RESOLVE_LOCK:  # resolve_config captures sys.stdout; runs go in threads
        if key not in _RESOLVED:
            _RESOLVED[key] = resolve_config([REPO / path for path in key])
        return copy.deepcopy(_RESOLVED[key])


def composition(config: str | list[str]) -> str:
    """A composition as the docs write it: its paths joined by `` + ``."""
    return config if isinstance(config, str) else " + ".join(config)


def slug(name: str) -> str:
    return name.lower().replace(" + ", "_plus_").replace(" ", "_").replace("%", "pct")


def run_one(method: str, seed: int, runs: Path, threads: int, config: str | list[str], methods: dict | None = None) -> dict:
    root = runs / f"{slug(method)}-seed{seed}"
    done = [p for p in root.rglob("scores.json") if json.loads(p.read_text()).get("complete")]
    if done:
        return json.loads(done[0].read_text())
    import yaml

    data = apply_method(resolved(config), (methods or METHODS)[method])
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
        proc = subprocess.run(cmd, check=False, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{method} seed {seed} failed; see {log}")
    return json.loads(next(root.rglob("scores.json")).read_text())


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
    config = suite["config"]
    jobs = [(m, s) for m in suite["methods"] for s in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: run_one(job[0], job[1], runs, args.threads, config, suite["methods"]), jobs))
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
        row["matrices"] = [s["matrix"] for s in scores_list]  # every row, for notes that read intermediate rows
        rows.append(row)
    tasks = results[0]["tasks"]
    out = Path(args.out)
    atomic_write_json(out / f"{suite['name']}.json", {"command": command, "config": composition(suite["config"]), "tasks": tasks, "rows": rows})
    lines = [
        f"# {suite['title']}",
        "",
        f"Sequence {' -> '.join(tasks)} ({suite.get('setup', FULL_FT_SETUP)}; config `{composition(suite['config'])}`).",
        (f"Mean ± standard error over seeds {', '.join(map(str, args.seeds))}. Scores in 0..100; `bwt_gem` divides by T-1, "
         "`bwt_trace` by T (see README, Metrics)."),
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
