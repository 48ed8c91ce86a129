"""``lightning-cit proxymix``: train a ProxyMix controller with PPO on a proxy, and check forgetting mirroring.

``lightning-cit proxymix train --config configs/proxymix/train_controller.yaml [--episodes N]``
  Algorithm 1, phase 1 (methods.md §3a). Every episode is one full ``fit`` of the proxy's task
  sequence, from the same initial weights, through the same DataModule and callbacks as any run
  (``fit_config``), with a :class:`~lightning_cit.callbacks.ProxyMixController` in explore mode that
  records (state, action, log-prob, value, reward) at every decision. After every
  ``episodes_per_update`` episodes the policy is updated with PPO (:func:`lightning_cit.callbacks.proxymix.policy.ppo_update`).
  After every episode the training state (policy, optimizer, rollouts, history, RNG) is written
  atomically to ``work_dir/train_state.pt``; running the same command again continues from there
  (an interrupted episode is run again, from its start). The frozen policy goes to ``out``
  (default ``runs/proxymix/controller.pt``); ``work_dir/history.json`` has the reward and the wall
  time of every episode (the policy-learning cost).

``lightning-cit proxymix mirror PROXY_SCORES TARGET_SCORES``
  The forgetting-mirroring check (Eq.1, Table 2): the vulnerability φ_i = (A_i(i) − A_i(T)) / max(A_i(i), ε_A)
  of every trained task in both runs and Spearman's ρ between them, with a bootstrap 95% interval
  over tasks. Arguments are scores.json files or directories (every scores.json below a directory is
  averaged, e.g. several seeds). Prints a table and, as its last line, a JSON object.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning_cit.callbacks.proxymix.policy import ActorCritic, PolicySpec, PPOConfig, load_policy, ppo_update, save_policy

from lightning_cit.errors import ConfigError

STATE_FILE = "train_state.pt"


# ------------------------------------------------------------------------------------------ train
def train_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lightning-cit proxymix train", description="Train a ProxyMix controller with PPO on a proxy model.")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with the options below")
    parser.add_argument("--fit_config", type=str, required=True, help="the fit config of one episode (it must contain a ProxyMixController)")
    parser.add_argument("--fit_args", type=list[str], default=[], help="extra `lightning-cit fit` arguments for every episode")
    parser.add_argument("--episodes", type=int, default=40, help="episodes (full runs of the task sequence) in total")
    parser.add_argument("--episodes_per_update", type=int, default=1, help="episodes whose transitions make one PPO update")
    parser.add_argument("--seed", type=int, default=0, help="seed of the policy init, PPO minibatches and the episodes")
    parser.add_argument("--vary_data_seed", type=bool, default=True, help="episode e uses data.seed = seed + e (model init stays the same)")
    parser.add_argument("--out", type=str, default="runs/proxymix/controller.pt", help="where the frozen policy is written")
    parser.add_argument("--work_dir", type=str, default="runs/proxymix/train", help="episode runs, train_state.pt and history.json")
    parser.add_argument("--init_policy", type=str | None, default=None, help="start from this policy file instead of a fresh policy")
    parser.add_argument("--threads", type=int | None, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar over episodes")
    parser.add_class_arguments(PolicySpec, "policy", help="the policy (saved with it)")
    parser.add_class_arguments(PPOConfig, "ppo", help="PPO")
    return parser


def train(argv: list[str]) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.episodes_per_update < 1:
        raise ConfigError("proxymix train: episodes and episodes_per_update must be >= 1")
    if not os.path.isfile(args.fit_config):
        raise ConfigError(f"proxymix train: fit_config {args.fit_config!r} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = PolicySpec(**{k: v for k, v in vars(args.policy).items() if not k.startswith("__")})
    ppo = PPOConfig(**{k: v for k, v in vars(args.ppo).items() if not k.startswith("__")})
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    settings = {"fit_config": args.fit_config, "fit_args": list(args.fit_args), "seed": args.seed, "vary_data_seed": args.vary_data_seed,
                "episodes_per_update": args.episodes_per_update, "policy": asdict(spec), "ppo": asdict(ppo), "init_policy": args.init_policy}
    state = _load_train_state(work / STATE_FILE, settings)
    if state is None:
        torch.manual_seed(args.seed)
        policy = load_policy(args.init_policy)[0] if args.init_policy else ActorCritic(spec)
        if args.init_policy and asdict(policy.spec) != asdict(spec):
            raise ConfigError(f"proxymix train: init_policy {args.init_policy!r} has spec {asdict(policy.spec)}, the config asks for {asdict(spec)}")
        optimizer = torch.optim.Adam(policy.parameters(), lr=ppo.learning_rate)
        generator = torch.Generator().manual_seed(args.seed)
        state = {"episode": 0, "rollouts": [], "history": [], "updates": []}
    else:
        policy = ActorCritic(spec)
        policy.load_state_dict(state["policy"])
        optimizer = torch.optim.Adam(policy.parameters(), lr=ppo.learning_rate)
        optimizer.load_state_dict(state["optimizer"])
        generator = torch.Generator()
        generator.set_state(state["generator"])
        print(f"proxymix train: resuming {work / STATE_FILE} after episode {state['episode']}", file=sys.stderr)

    bar = _progress(args.progress, args.episodes, state["episode"])
    for episode in range(state["episode"], args.episodes):
        started = time.perf_counter()
        rollout, info = run_episode(args, policy, episode, work)
        seconds = time.perf_counter() - started
        state["rollouts"].append(rollout)
        record = {"episode": episode, "reward": sum(t["reward"] for t in rollout), "decisions": len(rollout), "seconds": seconds, **info}
        if len(state["rollouts"]) >= args.episodes_per_update or episode == args.episodes - 1:
            policy.train()
            stats = ppo_update(policy, optimizer, [t for r in state["rollouts"] for t in r], ppo, generator)
            policy.eval()
            state["rollouts"] = []
            record["update"] = stats
        record["log_std"] = [float(v) for v in policy.log_std.detach()]  # exploration after this episode's update (the learning curve reads it)
        state["history"].append(record)
        state["episode"] = episode + 1
        _save_train_state(work / STATE_FILE, settings, state, policy, optimizer, generator)
        _write_history(work, state["history"], settings)
        if bar is not None:
            recent = [h["reward"] for h in state["history"][-5:]]
            bar.set_postfix(reward=f"{recent[-1]:+.2f}", mean5=f"{sum(recent) / len(recent):+.2f}", s_per_ep=f"{seconds:.0f}")
            bar.update(1)
        else:
            print(f"episode {episode + 1}/{args.episodes}: reward {record['reward']:+.3f}  {seconds:.1f} s", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    history = state["history"]
    meta = {
        "trained_with": "lightning-cit proxymix train",
        "episodes": len(history),
        "fit_config": args.fit_config,
        "fit_args": list(args.fit_args),
        "seconds": sum(h["seconds"] for h in history),
        "optimizer_steps": sum(h.get("optimizer_steps", 0) for h in history),
        "model_parameters": history[-1].get("model_parameters") if history else None,
        "final_mean_reward": sum(h["reward"] for h in history[-5:]) / max(len(history[-5:]), 1),
        "ppo": asdict(ppo),
        "reward": history[-1].get("reward_weights") if history else None,
    }
    save_policy(args.out, policy, meta)
    print(json.dumps({"policy": args.out, **{k: meta[k] for k in ("episodes", "seconds", "optimizer_steps", "model_parameters", "final_mean_reward")}}))
    return 0


def run_episode(args: Any, policy: ActorCritic, episode: int, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One full fit of the episode's task sequence with the current policy exploring; its transitions."""
    from lightning_cit.callbacks.proxymix import ProxyMixController

    from lightning_cit.cli import CITCLI

    data_seed = args.seed + episode if args.vary_data_seed else args.seed
    root = work / "episodes" / f"{episode:04d}"
    argv = [
        "--config", args.fit_config, *args.fit_args,
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--seed_everything", str(args.seed), "--data.seed", str(data_seed), "--trainer.limit_val_batches", "0",
    ]
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "episode.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
        try:
            cli = CITCLI(args=argv, run=False)
            controllers = [cb for cb in cli.trainer.callbacks if isinstance(cb, ProxyMixController)]
            if len(controllers) != 1:
                raise ConfigError(f"proxymix train: fit_config {args.fit_config!r} must have exactly one ProxyMixController callback, found {len(controllers)}")
            controller = controllers[0]
            controller.use_policy(policy, explore=True, seed=args.seed * 1_000_003 + episode)
            cli.datamodule.load_tasks()
            cli.trainer.fit(cli.model, cli.datamodule)
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
    shutil.rmtree(root / "checkpoints", ignore_errors=True)  # an episode is re-run whole after an interruption
    info = {
        "optimizer_steps": int(cli.trainer.global_step),
        "model_parameters": sum(p.numel() for p in cli.model.parameters()),
        "data_seed": data_seed,
        "reward_weights": {"forgetting": controller.forgetting_weight, "safety": controller.safety_weight, "over_refusal": controller.over_refusal_weight},
        "mean_replay_share": controller.scores_section()["mean_replay_share_per_task"],
    }
    return list(controller.rollout), info


def _progress(enabled: bool, total: int, initial: int):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="proxymix episodes", unit="ep")


def _save_train_state(path: Path, settings: dict, state: dict, policy: ActorCritic, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    payload = {
        "format": "lightning-cit/proxymix-train-state",
        "settings": json.dumps(settings, sort_keys=True),
        "episode": state["episode"],
        "rollouts": state["rollouts"],
        "history": json.dumps(state["history"]),
        "policy": policy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_train_state(path: Path, settings: dict) -> dict | None:
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch/pickle/zip raise many types for a bad file
        raise ConfigError(f"{path} is not a readable ProxyMix training state ({type(err).__name__}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != "lightning-cit/proxymix-train-state":
        raise ConfigError(f"{path} is not a ProxyMix training state; delete it to start over")
    if json.loads(payload["settings"]) != json.loads(json.dumps(settings, sort_keys=True)):
        raise ConfigError(f"{path} was written with other settings than this command's; use another --work_dir or delete it to start over")
    return {"episode": int(payload["episode"]), "rollouts": payload["rollouts"], "history": json.loads(payload["history"]),
            "policy": payload["policy"], "optimizer": payload["optimizer"], "generator": payload["generator"]}


def _write_history(work: Path, history: list[dict], settings: dict) -> None:
    from lightning_cit.results import atomic_write_json

    atomic_write_json(str(work / "history.json"), {"settings": settings, "episodes": history,
                                                   "seconds": sum(h["seconds"] for h in history)})


# ------------------------------------------------------------------------------------------ mirror
EPS_A = 1e-3


def vulnerability(scores: dict) -> dict[str, float]:
    """Eq.1 with j = T: φ_i = (A_i(i) − A_i(T)) / max(A_i(i), ε_A) for every trained task but the last."""
    matrix, tasks = scores["matrix"], scores["tasks"]
    if len(matrix) != len(tasks) + 1:
        raise ConfigError(f"a scores file with {len(tasks)} tasks needs {len(tasks) + 1} rows (base + one per task), it has {len(matrix)}")
    final = matrix[-1]
    if any(matrix[i + 1][i] is None or final[i] is None for i in range(len(tasks) - 1)):
        raise ConfigError("vulnerability needs every task's score right after it was learned: run the ForgettingEvaluator with every_n_tasks: 1")
    return {tasks[i]: (matrix[i + 1][i] - final[i]) / max(matrix[i + 1][i], EPS_A) for i in range(len(tasks) - 1)}


def _read_scores(arg: str) -> list[dict]:
    path = Path(arg)
    files = sorted(path.rglob("scores.json")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise ConfigError(f"{arg!r}: no scores.json found")
    out = []
    for file in files:
        try:
            scores = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{file}: not a readable scores.json ({err})") from None
        for key in ("tasks", "matrix"):
            if key not in scores:
                raise ConfigError(f"{file}: missing field {key!r} (is it a lightning-cit scores.json?)")
        if not scores.get("complete", True):
            raise ConfigError(f"{file}: the run is not complete (rows {scores.get('rows')}); φ needs the final row")
        out.append(scores)
    return out


def read_sequence(arg: str) -> tuple[list[str], list[dict]]:
    """The task sequence and the scores of every run under ``arg`` (all runs must share the sequence)."""
    runs = _read_scores(arg)
    tasks = runs[0]["tasks"]
    for scores in runs[1:]:
        if scores["tasks"] != tasks:
            raise ConfigError(f"{arg!r}: the scores files have different task sequences ({tasks} vs {scores['tasks']})")
    return list(tasks), runs


def mean_vulnerability(arg: str) -> tuple[dict[str, float], int]:
    _, runs = read_sequence(arg)
    return mean_vulnerability_of(runs), len(runs)


def mean_vulnerability_of(runs: list[dict]) -> dict[str, float]:
    """φ per task (:func:`vulnerability`) averaged over runs of the same sequence (e.g. seeds)."""
    phis = [vulnerability(s) for s in runs]
    return {t: sum(p[t] for p in phis) / len(phis) for t in phis[0]}


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def percentile_interval(draws: Iterable[float]) -> tuple[float, float, int]:
    """Percentile 95% interval of bootstrap draws of ρ, NaN draws (a constant side) skipped: (low, high, draws kept)."""
    values = sorted(v for v in draws if not math.isnan(v))
    if not values:
        return float("nan"), float("nan"), 0
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))], len(values)


def bootstrap_interval(x: list[float], y: list[float], samples: int, seed: int) -> tuple[float, float, int]:
    """Percentile 95% interval of ρ over tasks resampled with replacement; resamples with a constant side are skipped."""
    rng = random.Random(seed)

    def draw() -> float:
        idx = [rng.randrange(len(x)) for _ in x]
        return spearman([x[i] for i in idx], [y[i] for i in idx])

    return percentile_interval(draw() for _ in range(samples))


def mirror(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="lightning-cit proxymix mirror", description="Forgetting mirroring (Eq.1): do proxy and target rank task vulnerability alike?")
    parser.add_argument("proxy", help="the proxy's scores.json or run directory (all scores.json below it are averaged)")
    parser.add_argument("target", help="the target's scores.json or run directory")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% interval")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    proxy_tasks, proxy_runs = read_sequence(args.proxy)
    target_tasks, target_runs = read_sequence(args.target)
    # the whole sequence, the last task included: φ has no entry for the last task, yet it is what forgetting is measured after
    if proxy_tasks != target_tasks:
        raise ConfigError(f"proxy and target trained different task sequences: {proxy_tasks} vs {target_tasks}")
    proxy, n_proxy = mean_vulnerability_of(proxy_runs), len(proxy_runs)
    target, n_target = mean_vulnerability_of(target_runs), len(target_runs)
    tasks = list(proxy)
    x, y = [proxy[t] for t in tasks], [target[t] for t in tasks]
    rho = spearman(x, y)
    low, high, valid = bootstrap_interval(x, y, args.bootstrap, args.seed)
    print(f"{'task':<16}{'phi proxy':>12}{'phi target':>12}")
    for t in tasks:
        print(f"{t:<16}{proxy[t]:>12.3f}{target[t]:>12.3f}")
    print(f"Spearman rho = {rho:.3f}, bootstrap 95% interval [{low:.3f}, {high:.3f}] over {len(tasks)} tasks "
          f"({valid}/{args.bootstrap} resamples usable); proxy runs {n_proxy}, target runs {n_target}")
    if len(tasks) < 5:
        print(f"note: with {len(tasks)} tasks the rank correlation takes few values; treat it as a sanity check, not a test", file=sys.stderr)
    print(json.dumps({"tasks": tasks, "phi_proxy": x, "phi_target": y, "spearman_rho": rho, "ci95": [low, high],
                      "bootstrap": args.bootstrap, "proxy_runs": n_proxy, "target_runs": n_target}))
    return 0


def main(argv: list[str]) -> int:
    commands = {"train": train, "mirror": mirror}
    if not argv or argv[0] not in commands:
        print("usage: lightning-cit proxymix {train,mirror} ...\n"
              "  train   --config configs/proxymix/train_controller.yaml [--episodes N]   PPO on the proxy; writes the frozen policy\n"
              "  mirror  PROXY_SCORES TARGET_SCORES                                      Spearman rho of task vulnerability (Eq.1)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return commands[argv[0]](argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
