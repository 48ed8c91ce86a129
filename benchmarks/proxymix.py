"""ProxyMix in miniature on cit-synth (issue 3): the paper's Table 3 columns, forgetting mirroring, policy-learning cost.

    python benchmarks/proxymix.py --seeds 0 1 2 --episodes 30 --oracle-episodes 10 --threads 1

1. ``lightning-cit proxymix train --config configs/proxymix/train_controller.yaml`` (PPO on the proxy),
2. ``lightning-cit proxymix train --config configs/proxymix/oracle.yaml`` (the same PPO on the target: Oracle Target RL),
3. every method on the target (``configs/proxymix/proxy.yaml`` + ``configs/proxymix/target.yaml`` with the controller swapped), per seed,
4. the proxy under No Replay and Random 10% (``configs/proxymix/proxy.yaml``), per seed, for the mirroring check
   against the target under the same controllers (``lightning-cit proxymix mirror``),
5. ``docs/results/proxymix.{md,json}``.

Every step is resumable: finished trainings and runs are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cit_synth import composition, mean_se, run_one
from lightning_cit.callbacks.proxymix.commands import bootstrap_interval, mean_vulnerability_of, spearman
from lightning_cit.callbacks.proxymix.policy import load_policy

from lightning_cit.results import atomic_write_json, atomic_write_text

TRANSFER = ["configs/proxymix/proxy.yaml", "configs/proxymix/target.yaml"]  # the target: the proxy base plus the target overlay
PROXY = ["configs/proxymix/proxy.yaml"]
PROXY_POLICY = "runs/proxymix/controller.pt"
ORACLE_POLICY = "runs/proxymix/oracle_controller.pt"
INTERVAL = 10  # decision_interval of the transfer config: the adaptive baselines decide as often as ProxyMix

METHODS = {
    "No Replay": {"class_path": "lightning_cit.callbacks.NoReplay"},
    "Random 10%": {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.1}},
    "Random 30%": {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.3}},
    "Proportional": {"class_path": "lightning_cit.callbacks.Proportional", "init_args": {"decision_interval": INTERVAL}},
    "Loss-Slope": {"class_path": "lightning_cit.callbacks.LossSlope", "init_args": {"replay_ratio": 0.3, "decision_interval": INTERVAL}},
    "ProxyMix (proxy-trained, transferred)": {"class_path": "lightning_cit.callbacks.ProxyMixController",
                                              "init_args": {"policy_path": str(REPO / PROXY_POLICY)}},
    "Oracle Target RL": {"class_path": "lightning_cit.callbacks.ProxyMixController", "init_args": {"policy_path": str(REPO / ORACLE_POLICY)}},
}
MIRRORED = ["No Replay", "Random 10%"]  # controllers run on both models for the mirroring check
COLUMNS = [("AA", "acc"), ("FGT", "fgt_proxymix"), ("NTA", "nta"), ("BWT", "bwt_gem"), ("SS", "safety_score")]


def train_policy(config: str, episodes: int, threads: int, out: str) -> dict:
    """Run (or continue) a PPO training; returns its history.json."""
    work = json.loads(json.dumps(__import__("yaml").safe_load((REPO / config).read_text())))["work_dir"]
    done = Path(out).exists() and load_policy(out)[1].get("episodes") == episodes
    if not done:
        cmd = [sys.executable, "-m", "lightning_cit.cli", "proxymix", "train", "--config", str(REPO / config),
               "--episodes", str(episodes), "--threads", str(threads), "--progress", "false"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, check=False, env=env, cwd=REPO)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return json.loads((REPO / work / "history.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=30, help="PPO episodes on the proxy")
    parser.add_argument("--oracle-episodes", type=int, default=10, help="PPO episodes on the target (Oracle Target RL)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "docs" / "results"))
    args = parser.parse_args()
    os.chdir(REPO)

    proxy_history = train_policy("configs/proxymix/train_controller.yaml", args.episodes, args.threads, PROXY_POLICY)
    oracle_history = train_policy("configs/proxymix/oracle.yaml", args.oracle_episodes, args.threads, ORACLE_POLICY)

    runs = REPO / "runs" / "proxymix" / "sweep"
    jobs = [(m, s) for m in METHODS for s in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda j: run_one(j[0], j[1], runs, args.threads, TRANSFER, METHODS), jobs))
    proxy_runs = REPO / "runs" / "proxymix" / "proxy-sweep"
    proxy_results = {m: [run_one(m, s, proxy_runs, args.threads, PROXY, METHODS) for s in args.seeds] for m in MIRRORED}

    by_method: dict[str, list[dict]] = {}
    for (method, _), scores in zip(jobs, results):
        by_method.setdefault(method, []).append(scores)
    rows = []
    for method, scores_list in by_method.items():
        row: dict = {"method": method, "seeds": len(scores_list)}
        for _, key in COLUMNS:
            values = [s["safety"]["score"][-1] if key == "safety_score" else s["summary"][key] for s in scores_list]
            row[key], row[f"{key}_se"] = mean_se(values)
        row["replay_share_per_task"] = [s.get("methods", {}).get("ProxyMixController", {}).get("mean_replay_share_per_task") for s in scores_list]
        row["matrices"] = [s["matrix"] for s in scores_list]
        rows.append(row)

    # forgetting mirroring: vulnerability per task, proxy vs target under the same controller, averaged over seeds
    tasks = results[0]["tasks"][:-1]
    mirror = {}
    for method in MIRRORED:
        proxy_phi, target_phi = mean_vulnerability_of(proxy_results[method]), mean_vulnerability_of(by_method[method])
        phi_proxy, phi_target = [proxy_phi[t] for t in tasks], [target_phi[t] for t in tasks]
        low, high, usable = bootstrap_interval(phi_proxy, phi_target, 2000, 0)
        mirror[method] = {"tasks": tasks, "phi_proxy": phi_proxy, "phi_target": phi_target, "spearman_rho": spearman(phi_proxy, phi_target),
                          "ci95": [low, high], "usable_resamples": usable}

    def cost(history: dict) -> dict:
        episodes = history["episodes"]
        return {"episodes": len(episodes), "seconds": history["seconds"], "seconds_per_episode": history["seconds"] / len(episodes),
                "model_parameters": episodes[-1]["model_parameters"], "optimizer_steps": sum(e["optimizer_steps"] for e in episodes),
                "final_mean_reward_5": sum(e["reward"] for e in episodes[-5:]) / len(episodes[-5:])}

    costs = {"proxy": cost(proxy_history), "oracle": cost(oracle_history)}
    costs["oracle_over_proxy_total"] = costs["oracle"]["seconds"] / costs["proxy"]["seconds"]
    costs["oracle_over_proxy_per_episode"] = costs["oracle"]["seconds_per_episode"] / costs["proxy"]["seconds_per_episode"]
    learning = {"proxy": [e["reward"] for e in proxy_history["episodes"]], "oracle": [e["reward"] for e in oracle_history["episodes"]]}

    command = (f"python benchmarks/proxymix.py --seeds {' '.join(map(str, args.seeds))} --episodes {args.episodes} "
               f"--oracle-episodes {args.oracle_episodes} --threads {args.threads}")
    out = Path(args.out)
    atomic_write_json(out / "proxymix.json", {"command": command, "config": composition(TRANSFER), "proxy_config": composition(PROXY), "tasks": results[0]["tasks"],
                                              "rows": rows, "mirror": mirror, "cost": costs, "episode_rewards": learning})
    lines = [
        "# ProxyMix on cit-synth: a controller learned on a proxy, transferred to a 3x wider and deeper target",
        "",
        (f"Sequence {' -> '.join(results[0]['tasks'])}; target: tiny Llama 192 wide x 3 layers, proxy: 64 x 1, each from its own "
         "aligned base, LoRA r=16, 60 steps of 16 per task, buffers of 10% of each task, decisions every 10 steps."),
        (f"Mean ± standard error over seeds {', '.join(map(str, args.seeds))}. Columns as the paper's Table 3: AA = `acc`, "
         "FGT = `fgt_proxymix`, NTA = `nta`, BWT = `bwt_gem`, SS = safety score (refusal on harmful − over-refusal on benign, "
         "after the last task). Scores in 0..100."),
        "",
        f"Reproduce: `{command}`",
        "",
        "| method | " + " | ".join(f"{name} (`{key}`)" for name, key in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(f"{row[k]:.1f} ± {row[k + '_se']:.1f}" for _, k in COLUMNS) + " |")
    lines += [
        "",
        "## Forgetting mirroring (Eq.1, φ_i = (A_i(i) − A_i(T)) / A_i(i), mean over seeds; proxy and target under the same controller)",
        "",
        "| controller | " + " | ".join(f"φ {t} proxy / target" for t in tasks) + " | Spearman ρ | bootstrap 95% |",
        "|---|" + "---|" * (len(tasks) + 2),
        *[f"| {m} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(r["phi_proxy"], r["phi_target"]))
          + f" | {r['spearman_rho']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['usable_resamples']}/2000 usable) |"
          for m, r in mirror.items()],
        "",
        "## Policy-learning cost",
        "",
        "| | episodes | seconds | seconds/episode | parameters | mean reward, last 5 episodes |",
        "|---|---|---|---|---|---|",
        *[f"| {name} | {c['episodes']} | {c['seconds']:.0f} | {c['seconds_per_episode']:.1f} | {c['model_parameters']:,} | {c['final_mean_reward_5']:+.2f} |"
          for name, c in (("proxy (PPO on the proxy)", costs["proxy"]), ("oracle (PPO on the target)", costs["oracle"]))],
        "",
        (f"Oracle over proxy: {costs['oracle_over_proxy_per_episode']:.1f}x per episode, {costs['oracle_over_proxy_total']:.1f}x in total "
         f"(wall time on this machine; {costs['oracle']['episodes']} vs {costs['proxy']['episodes']} episodes)."),
        "",
        NOTES,
    ]
    atomic_write_text(out / "proxymix.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


NOTES = """## Reading the table

- ProxyMix, trained for 30 PPO episodes on the 65k-parameter proxy and applied frozen to the 1.28M-parameter
  target, beats every fixed and heuristic baseline on AA, FGT and BWT here, and keeps the safety task (SS 100).
  It is **not budget-matched**: the policy replays 65-73% of every batch on average over tasks 2-4 (read from
  `methods.ProxyMixController` in each run's scores.json), against 10% or 30% for Random. It pays with NTA
  (94 vs 100): less fresh data per step. Much of the gain is "replay a lot, mostly the first task". The learned
  mean action puts 0.4-0.8 of the batch on the safety buffer (the task whose collapse costs the most reward, through
  the forgetting term and β·S), more when earlier losses are rising. A budget-constrained variant (a fixed replay
  share with the policy choosing only the split) would be the fair test, and it is not built.
- The PPO signal is weak at this budget. Over 30 episodes the mean episode reward rose from 2.9 (first 10) to 4.2
  (last 10), but the log-std barely moved and the clip fraction stayed near 0. Per-episode reward noise from the
  varying data seed is of the same size as the trend. The paper uses 200 episodes; 30 is what this machine allowed.
  The policy's outputs are nonetheless state-dependent, not uniform: more safety replay when trends rise.
- Oracle Target RL (8 episodes on the target) did better still (AA 96.5, BWT +4.8, i.e. backward transfer). That
  is with fewer episodes, so the proxy's policy is not an upper bound on what the target can learn. The cost
  row is wall time on a 2-core machine shared with other jobs: seconds per episode varied 2-3x with the load, so
  the 7.2x per-episode ratio is indicative only. The parameter ratio is 19.7x.
- Random 30% is bimodal across seeds (AA 92.8, 64.3, 93.3): whether cipher_a survives cipher_c depends on the draw.
  Proportional (weights ∝ raw probe loss) starves the earlier tasks, because the new task's loss dominates at
  every decision, and it loses safety. Loss-Slope is budget-matched to Random 30% and sits below it.
- Mirroring: with 3 scorable tasks (the last one cannot be forgotten) Spearman ρ takes very few values. Without
  replay every task is destroyed on both models (φ ≈ 1), so ρ = 1 says little. Under Random 10%, proxy and target
  agree that safety is the least vulnerable and cipher_a the most (ρ = 1 again). Treat it as a sanity check, not
  as evidence of the hypothesis. The bootstrap interval is degenerate for the same reason.
- Sizes are tiny on purpose: 60 steps of 16 per task, 32 eval samples per task, 3 seeds.
"""


if __name__ == "__main__":
    main()
