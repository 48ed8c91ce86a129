"""ProxyMix with a policy learned on a proxy of comparison setting A's own sequence (issue 19), applied to setting A.

    OMP_NUM_THREADS=1 nice -n 10 lightning-cit proxymix train --config configs/compare/proxymix_train.yaml --threads 1
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/proxymix_compare_policy.py --proxy-check 1000 1001 1002
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/proxymix_compare_policy.py --target 0 1
    python benchmarks/proxymix_compare_policy.py --report-only

The first command learns the policy with PPO (resumable) on ``configs/compare/proxymix_proxy.yaml`` (setting A's five
tasks, a 64 x 1 model, 120 steps of 16 per task, 5% replay share) and writes ``runs/proxymix/compare-full/controller.pt``.

``--proxy-check SEEDS``: on the proxy itself, at data seeds the training never drew (it used 0..episodes-1), the frozen
policy (deterministic) against the uniform split of the same 5% (``FixedRatio(0.05)``): does the learned split beat
uniform where it was learned?

``--target SEEDS``: setting A's target runs exactly as the comparison grid makes them (``lightning_cit.compare.run_one``:
setting A's resolved config, the method's callbacks, the setting's evaluator, a CostMeter, no checkpoints), with the
method entry :data:`METHOD` added to ``configs/compare/grid.yaml`` in memory (the file is not changed).

The report (``docs/results/proxymix-compare-policy.{md,json,png}``) reads the training history, these runs and
``docs/results/compare.json`` (Fixed ratio and the old ProxyMix at 5%, same seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from proxymix_curve import moving_average, plateau, progress  # noqa: E402

from lightning_cit.results import atomic_write_json, atomic_write_text  # noqa: E402

TRAIN_CONFIG = "configs/compare/proxymix_train.yaml"
PROXY_CONFIGS = ["configs/quickstart.yaml", "configs/compare/full.yaml", "configs/compare/proxymix_proxy.yaml"]
WORK = Path("runs/proxymix/compare-full")
POLICY = str(WORK / "controller.pt")
OLD_POLICY = "runs/proxymix/curve/controller.pt"
METHOD_NAME = "ProxyMix (policy learned on this sequence's proxy)"
METHOD = {
    "note": "a policy learned with PPO on a 64x1 proxy of this sequence under the same 5% share "
            "(configs/compare/proxymix_train.yaml, docs/results/proxymix-compare-policy.md), frozen; it splits the share over earlier tasks",
    "settings": ["full"],
    "budgets": [0.05],
    "callbacks": [{"class_path": "lightning_cit.callbacks.ProxyMixController",
                   "init_args": {"policy_path": POLICY, "replay_share": "{budget}", "decision_interval": 50}}],
}
WINDOW = 10
OUT = Path("docs/results/proxymix-compare-policy")


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def grid_with_method(path: Path):
    """configs/compare/grid.yaml with :data:`METHOD` added, written to ``path`` and loaded (lightning_cit.compare.load_grid)."""
    import yaml

    from lightning_cit.compare import load_grid

    raw = yaml.safe_load((REPO / "configs/compare/grid.yaml").read_text(encoding="utf-8"))
    raw["methods"][METHOD_NAME] = copy.deepcopy(METHOD)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(path), yaml.safe_dump(raw, sort_keys=False))
    return load_grid(path, REPO)


def run_target(seeds: list[int]) -> None:
    from lightning_cit.compare import run_one

    grid = grid_with_method(WORK / "grid.yaml")
    specs = [r for r in grid.runs() if r.method.name == METHOD_NAME and r.seed in seeds]
    for spec in specs:
        before, start = _child_cpu(), time.perf_counter()
        record, reused = run_one(spec, REPO / WORK / "target", REPO, threads=1)
        if not reused:
            atomic_write_json(str(REPO / WORK / "target" / spec.key / "process.json"),
                              {"cpu_s": _child_cpu() - before, "wall_s": time.perf_counter() - start, "load_average": os.getloadavg()})
        s = record["summary"]
        print(f"{spec.label()}: acc {s['acc']:.1f} bwt_gem {s['bwt_gem']:.1f} share {record['cost']['replay_share']:.3f}"
              + (" (reused)" if reused else ""), flush=True)


def proxy_check(seeds: list[int]) -> None:
    """The frozen policy against the uniform split on the proxy, at unseen data seeds (module docstring)."""
    import yaml

    from lightning_cit.cli import resolve_config

    base = resolve_config([REPO / c for c in PROXY_CONFIGS])
    controllers = {
        "learned": {"class_path": "lightning_cit.callbacks.ProxyMixController",
                    "init_args": {"policy_path": POLICY, "replay_share": 0.05, "decision_interval": 20, "explore": False}},
        "uniform": {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.05}},
    }
    for seed in seeds:
        for name, controller in controllers.items():
            root = REPO / WORK / "proxy-check" / f"{name}-s{seed}"
            if (root / "result.json").exists():
                continue
            data = copy.deepcopy(base)
            callbacks = data["trainer"]["callbacks"]
            data["trainer"]["callbacks"] = [controller, *callbacks[1:]]
            data["data"]["seed"] = seed  # the model init stays seed 0, as in the training episodes
            root.mkdir(parents=True, exist_ok=True)
            config = root / "run_config.yaml"
            atomic_write_text(str(config), yaml.safe_dump(data, sort_keys=False))
            cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config), "--trainer.default_root_dir", str(root)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            before, start = _child_cpu(), time.perf_counter()
            with open(root / "run.log", "w") as log:
                subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            scores = json.loads(sorted(root.glob("lightning_logs/version_*/scores.json"))[-1].read_text())
            result = {"controller": name, "seed": seed, "summary": scores["summary"], "matrix": scores["matrix"],
                      "methods": scores.get("methods", {}), "cpu_s": _child_cpu() - before, "wall_s": time.perf_counter() - start}
            atomic_write_json(str(root / "result.json"), result)
            print(f"proxy {name} seed {seed}: acc {result['summary']['acc']:.1f} bwt_gem {result['summary']['bwt_gem']:.1f} "
                  f"({result['cpu_s']:.0f} CPU s)", flush=True)


# ------------------------------------------------------------------------------------------ report
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def collect() -> dict:
    history = json.loads((REPO / WORK / "history.json").read_text())
    eps = history["episodes"]
    rewards = [e["reward"] for e in eps]
    train_cpu = REPO / WORK / "train_cpu.json"  # written by hand from /usr/bin/time around each training invocation
    compare = json.loads((REPO / "docs/results/compare.json").read_text())
    grid_runs = {(r["method"], r["seed"]): r for r in compare["runs"] if r["setting"] == "full" and r["budget"] == 0.05}
    target = []
    for path in sorted((REPO / WORK / "target").rglob("run.json")):
        record = json.loads(path.read_text())
        process = path.with_name("process.json")
        target.append({"seed": record["seed"], "summary": record["summary"], "matrix": record["matrix"], "cost": record["cost"],
                       "wall_s": record["wall_s"], "process": json.loads(process.read_text()) if process.exists() else None,
                       "split": record["methods"]["ProxyMixController"].get("mean_split_per_task"),
                       "policy_sha256": record["methods"]["ProxyMixController"].get("policy_sha256")})
    target.sort(key=lambda r: r["seed"])
    rows = []
    for run in target:
        row = {"seed": run["seed"], "new": run["summary"]}
        for label, method in (("fixed", "Fixed ratio"), ("old", "ProxyMix")):
            old = grid_runs.get((method, run["seed"]))
            row[label] = old["summary"] if old else None
        rows.append(row)
    checks = [json.loads(p.read_text()) for p in sorted((REPO / WORK / "proxy-check").glob("*/result.json"))]
    return {
        "commands": {
            "train": f"OMP_NUM_THREADS=1 nice -n 10 lightning-cit proxymix train --config {TRAIN_CONFIG} --threads 1",
            "proxy_check": "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/proxymix_compare_policy.py --proxy-check " + " ".join(
                sorted({str(c["seed"]) for c in checks})),
            "target": "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/proxymix_compare_policy.py --target " + " ".join(str(r["seed"]) for r in target),
            "report": "python benchmarks/proxymix_compare_policy.py --report-only",
        },
        "configs": {"train": TRAIN_CONFIG, "proxy": PROXY_CONFIGS, "target": ["configs/quickstart.yaml", "configs/compare/full.yaml"]},
        "grid_method": {METHOD_NAME: METHOD},
        "training": {
            "settings": history["settings"], "episodes": len(eps), "wall_s": history["seconds"],
            "cpu": json.loads(train_cpu.read_text()) if train_cpu.exists() else None,
            "seconds_per_episode_median": sorted(e["seconds"] for e in eps)[len(eps) // 2] if eps else None,
            "optimizer_steps_per_episode": eps[0]["optimizer_steps"] if eps else None,
            "model_parameters": eps[0]["model_parameters"] if eps else None,
            "decisions_per_episode": eps[0]["decisions"] if eps else None,
            "reward": rewards, "reward_moving_average": moving_average(rewards, WINDOW),
            "reward_first_window": _mean(rewards[:WINDOW]), "reward_last_window": _mean(rewards[-WINDOW:]),
            "plateau": plateau(rewards, WINDOW), "progress": progress(rewards, WINDOW),
            "mean_log_std": [_mean(e["log_std"]) for e in eps],
            "clip_fraction": [e.get("update", {}).get("clip_fraction") for e in eps],
        },
        "proxy_check": checks,
        "target": target,
        "comparison": rows,
        "load_average": os.getloadavg(),
    }


def _plot(path: Path, d: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = d["training"]
    x = list(range(1, len(t["reward"]) + 1))
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    axes[0].plot(x, t["reward"], ".", alpha=0.5, label="episode reward")
    axes[0].plot(x, t["reward_moving_average"], "-", label=f"moving average ({WINDOW})")
    axes[0].set_ylabel("reward (sum over decisions)")
    axes[0].legend(fontsize=8)
    axes[1].plot(x, t["mean_log_std"], "-")
    axes[1].set_ylabel("mean log-std")
    axes[1].set_xlabel("episode")
    fig.suptitle(f"ProxyMix policy for setting A's sequence, PPO on its proxy ({TRAIN_CONFIG})", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt_split(split: dict | None, tasks: list[str]) -> str:
    if not split:
        return "not recorded"
    parts = []
    for k, shares in split.items():
        parts.append(f"{tasks[int(k)]}: " + ", ".join(f"{tasks[i]} {s:.2f}" for i, s in enumerate(shares)))
    return "; ".join(parts)


def markdown(d: dict, reading: str) -> str:
    t = d["training"]
    tasks = ["safety", "cipher_a", "cipher_b", "shift", "compare"]
    cpu = t["cpu"]
    p, rise = t["plateau"], t["progress"]
    lines = [
        "# ProxyMix with a policy learned for setting A's own sequence (issue 19)",
        "",
        "The comparison grid's ProxyMix row (docs/results/compare.md, setting A) reads a policy learned on another sequence "
        "(docs/results/proxymix-curve.md). Here the policy is learned with PPO on a small proxy **of setting A's own sequence** "
        "(safety → cipher_a → cipher_b → shift → compare) under the grid's fixed 5% replay share, so it learns only how to split "
        "that share over the earlier tasks; then it is frozen and applied to setting A's target at 5%.",
        "",
        "## Commands",
        "",
        "```",
        d["commands"]["train"] + "      # the policy (resumable)",
        d["commands"]["proxy_check"] + "   # learned vs uniform split on the proxy",
        d["commands"]["target"] + "          # setting A, as the grid runs it",
        d["commands"]["report"] + "          # this doc",
        "```",
        "",
        "Configs: `configs/compare/proxymix_proxy.yaml` (the proxy: an overlay on `configs/quickstart.yaml + configs/compare/full.yaml`: "
        "the same 5 tasks and data, full fine-tuning of a random-init tiny Llama **64 × 1** (target 128 × 2), **120 steps of 16** per "
        "task at lr 5e-3 (target 300 of 32 at 2e-3), warmup 4, a decision every 20 steps (6 per task, as the target's 50 in 300), "
        "`replay_share: 0.05`, probes of 32 held-out samples per task at every decision, the evaluator with `score: needed` for the "
        "safety term); `configs/compare/proxymix_train.yaml` (PPO as configs/proxymix/train_controller.yaml: 256-wide actor-critic, "
        "one update per episode, episode e on data seed e). The target runs are the grid's own "
        "(`lightning_cit.compare.run_one` with the method entry below added in memory).",
        "",
        "## Training the policy",
        "",
        f"![reward curve]({OUT.name}.png)",
        "",
        "| | value |",
        "|---|---|",
        f"| episodes | {t['episodes']} |",
        f"| optimizer steps per episode / proxy parameters | {t['optimizer_steps_per_episode']} / {t['model_parameters']} |",
        f"| recorded decisions per episode (tasks 3-5; task 2 has one earlier task, no choice) | {t['decisions_per_episode']} |",
        f"| median wall seconds per episode | {t['seconds_per_episode_median']:.1f} |",
        f"| wall seconds, all episodes | {t['wall_s']:.0f} |",
        (f"| CPU seconds of the training process (user + sys, /usr/bin/time) | {cpu['cpu_s']:.0f} |" if cpu else "| CPU seconds | not recorded |"),
        f"| reward, first {WINDOW} episodes (mean) | {t['reward_first_window']:+.3f} |",
        f"| reward, last {WINDOW} episodes (mean) | {t['reward_last_window']:+.3f} |",
        f"| mean log-std after episode 1 / last | {t['mean_log_std'][0]:+.4f} / {t['mean_log_std'][-1]:+.4f} |",
        "",
    ]
    if rise is not None:
        lines.append(f"First {WINDOW} against last {WINDOW} episodes: {rise['mean_first']:+.3f} → {rise['mean_last']:+.3f} "
                     f"(Welch t = {rise['welch_t']:+.2f}, {'significant' if rise['significant'] else 'not significant'} at |t| ≥ 2).")
    if p["verdict"] == "too short":
        lines.append(f"Plateau test (benchmarks/proxymix_curve.py `plateau`): too short ({p['episodes']} episodes).")
    else:
        lines.append(f"Plateau test (benchmarks/proxymix_curve.py `plateau`, last {WINDOW} vs the {WINDOW} before): **{p['verdict']}** "
                     f"({p['mean_before']:+.3f} → {p['mean_last']:+.3f}, t = {p['welch_t']:+.2f}, sd of the last window {p['sd_last']:.3f}).")
    blocks = [t["reward"][i:i + 20] for i in range(0, len(t["reward"]), 20)]
    lines += ["", "Mean reward per block of 20 episodes: " + ", ".join(f"{_mean(b):+.2f}" for b in blocks) + ".", ""]
    if d["proxy_check"]:
        lines += ["## On the proxy: learned split vs uniform split (same 5%), unseen data seeds", "",
                  "| data seed | split | acc | bwt_gem | learned split (fraction of the replay per earlier task, mean over the task's decisions) |",
                  "|---|---|---|---|---|"]
        for c in sorted(d["proxy_check"], key=lambda c: (c["seed"], c["controller"])):
            split = c["methods"].get("ProxyMixController", {}).get("mean_split_per_task") if c["controller"] == "learned" else None
            lines.append(f"| {c['seed']} | {c['controller']} | {c['summary']['acc']:.1f} | {c['summary']['bwt_gem']:.1f} | "
                         f"{_fmt_split(split, tasks) if split else ''} |")
        for name in ("learned", "uniform"):
            cs = [c for c in d["proxy_check"] if c["controller"] == name]
            lines.append(f"| mean | {name} | {_mean([c['summary']['acc'] for c in cs]):.1f} | {_mean([c['summary']['bwt_gem'] for c in cs]):.1f} | |")
        lines.append("")
    lines += ["## Setting A (target, 128 × 2, 300 steps of 32, 5% replay), per seed", "",
              "| seed | method | acc | bwt_gem | nta | measured share |", "|---|---|---|---|---|---|"]
    for row, run in zip(d["comparison"], d["target"]):
        lines.append(f"| {row['seed']} | **ProxyMix, policy learned on this sequence** | {row['new']['acc']:.1f} | {row['new']['bwt_gem']:.1f} | "
                     f"{row['new']['nta']:.1f} | {run['cost']['replay_share']:.3f} |")
        for label, name in (("fixed", "Fixed ratio (grid)"), ("old", "ProxyMix, old policy (grid)")):
            s = row[label]
            if s:
                lines.append(f"| {row['seed']} | {name} | {s['acc']:.1f} | {s['bwt_gem']:.1f} | {s['nta']:.1f} | |")
    if d["comparison"]:
        for label, name in (("new", "ProxyMix, policy learned on this sequence"), ("fixed", "Fixed ratio"), ("old", "ProxyMix, old policy")):
            vals = [r[label] for r in d["comparison"] if r[label]]
            lines.append(f"| mean ({len(vals)} seeds) | {name} | {_mean([v['acc'] for v in vals]):.1f} | "
                         f"{_mean([v['bwt_gem'] for v in vals]):.1f} | {_mean([v['nta'] for v in vals]):.1f} | |")
        lines += ["", "Learned split on the target (fraction of the 5% per earlier task, mean over each task's decisions): "]
        for run in d["target"]:
            lines.append(f"- seed {run['seed']}: {_fmt_split(run['split'], tasks)}")
        lines.append("")
        for run in d["target"]:
            pr = run["process"]
            if pr:
                lines.append(f"Seed {run['seed']}: {pr['cpu_s']:.0f} CPU s, {pr['wall_s']:.0f} s wall (load average "
                             f"{', '.join(f'{v:.1f}' for v in pr['load_average'])} at its end).")
    lines += ["", "## Reading", "", reading, "",
              "## The grid's method entry", "",
              "To add to `configs/compare/grid.yaml` under `methods:` (the runs above are exactly what it makes):", "", "```yaml",
              f"  {METHOD_NAME}:",
              f"    note: {METHOD['note']}",
              "    settings: [full]",
              "    budgets: [0.05]",
              "    callbacks:",
              "      - class_path: lightning_cit.callbacks.ProxyMixController",
              f"        init_args: {{policy_path: {POLICY}, replay_share: \"{{budget}}\", decision_interval: 50}}",
              "```", "",
              f"Machine: the shared 2-core machine, one torch thread, niced, other training runs beside it "
              f"(load average {', '.join(f'{v:.1f}' for v in d['load_average'])} when this was written); wall times vary with the load, "
              "CPU seconds do not. Per-episode numbers are in the `.json`."]
    return "\n".join(lines) + "\n"


def report() -> dict:
    d = collect()
    reading_path = REPO / WORK / "reading.md"  # the honest reading, written after looking at the numbers
    reading = reading_path.read_text().strip() if reading_path.exists() else "(not written yet)"
    d["reading"] = reading
    atomic_write_json(str(REPO / OUT.with_suffix(".json")), d)
    _plot(REPO / OUT.with_suffix(".png"), d)
    atomic_write_text(str(REPO / OUT.with_suffix(".md")), markdown(d, reading))
    return d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=int, nargs="+", default=None, help="run setting A's target at these seeds")
    parser.add_argument("--proxy-check", type=int, nargs="+", default=None, help="learned vs uniform split on the proxy at these data seeds")
    parser.add_argument("--report-only", action="store_true", help="only write the doc")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    if args.proxy_check:
        proxy_check(args.proxy_check)
    if args.target:
        run_target(args.target)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
