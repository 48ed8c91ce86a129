"""The ProxyMix controller's learning curve on the proxy (issue 19 item 7): does PPO reach a plateau?

    nice -n 5 python benchmarks/proxymix_curve.py --episodes 200 --deadline 20:55   # train (resumable), then write the doc
    python benchmarks/proxymix_curve.py --report-only                               # the doc from what has run so far

Runs ``lightning-cit proxymix train --config configs/proxymix/train_controller.yaml`` (fit config
``configs/proxymix/proxy.yaml``) with its own ``--work_dir`` and ``--out`` (so the policy of
``benchmarks/proxymix.py`` is not touched), one process, one torch thread. The training writes
``train_state.pt`` after every episode, so running this again continues where it stopped; at
``--deadline`` (UTC, HH:MM) the training process is stopped (the episode in progress is lost and
re-run next time) and the doc is written from ``history.json``:
``docs/results/proxymix-curve.{md,json,png}`` with the reward of every episode, its moving average,
the policy's mean log-std after every episode, PPO's clip fraction, seconds per episode, and the
plateau verdict (:func:`plateau`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_cit.results import atomic_write_json, atomic_write_text

CONFIG = "configs/proxymix/train_controller.yaml"
WORK = "runs/proxymix/curve"
OUT = "runs/proxymix/curve/controller.pt"
WINDOW = 10  # moving-average window (episodes)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def plateau(rewards: list[float], window: int) -> dict:
    """Plateau test: the mean reward of the last ``window`` episodes against the ``window`` before them.

    Welch's t on the two windows; the curve has plateaued when the difference of the means is not
    significant (|t| < 2) AND smaller than half the standard deviation of the rewards in the last
    window (so a real but small drift does not count as progress, and a noisy window cannot claim
    one). Needs ``2 * window`` episodes; with fewer the verdict is "too short".
    """
    if len(rewards) < 2 * window:
        return {"verdict": "too short", "episodes": len(rewards), "needed": 2 * window}
    last, before = rewards[-window:], rewards[-2 * window:-window]

    def mean_var(xs: list[float]) -> tuple[float, float]:
        m = sum(xs) / len(xs)
        return m, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    m1, v1 = mean_var(before)
    m2, v2 = mean_var(last)
    se = ((v1 + v2) / window) ** 0.5
    t = (m2 - m1) / se if se > 0 else 0.0
    flat = abs(t) < 2 and abs(m2 - m1) < 0.5 * v2 ** 0.5
    return {"verdict": "plateau" if flat else ("rising" if m2 > m1 else "falling"), "window": window,
            "mean_before": m1, "mean_last": m2, "difference": m2 - m1, "welch_t": t, "sd_last": v2 ** 0.5}


def progress(rewards: list[float], window: int) -> dict | None:
    """Did the reward rise at all? Welch's t between the first and the last ``window`` episodes (None with too few)."""
    if len(rewards) < 2 * window:
        return None
    first, last = rewards[:window], rewards[-window:]
    m1, m2 = sum(first) / window, sum(last) / window
    v1 = sum((x - m1) ** 2 for x in first) / (window - 1)
    v2 = sum((x - m2) ** 2 for x in last) / (window - 1)
    se = ((v1 + v2) / window) ** 0.5
    t = (m2 - m1) / se if se > 0 else 0.0
    return {"mean_first": m1, "mean_last": m2, "difference": m2 - m1, "welch_t": t, "significant": abs(t) >= 2}


def train(episodes: int, deadline: dt.datetime | None) -> int | None:
    """Run the training until it finishes or the deadline passes; the exit code, or None when stopped at the deadline."""
    cmd = [sys.executable, "-m", "lightning_cit.cli", "proxymix", "train", "--config", str(REPO / CONFIG), "--episodes", str(episodes),
           "--threads", "1", "--progress", "false", "--work_dir", WORK, "--out", OUT]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    while proc.poll() is None:
        if deadline is not None and dt.datetime.now(dt.timezone.utc) >= deadline:
            proc.terminate()  # only our own child; train_state.pt has every finished episode
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return None
        time.sleep(5)
    return proc.returncode


def report(out: Path, episodes_asked: int, stopped: bool) -> dict:
    history = json.loads((REPO / WORK / "history.json").read_text())
    eps = history["episodes"]
    rewards = [e["reward"] for e in eps]
    log_std = [sum(e["log_std"]) / len(e["log_std"]) if "log_std" in e else None for e in eps]
    clip = [e.get("update", {}).get("clip_fraction") for e in eps]
    seconds = [e["seconds"] for e in eps]
    avg = moving_average(rewards, WINDOW)
    verdict = plateau(rewards, WINDOW)
    rise = progress(rewards, WINDOW)
    command = f"nice -n 5 python benchmarks/proxymix_curve.py --episodes {episodes_asked}"
    data = {"command": command, "config": CONFIG, "settings": history["settings"], "episodes_run": len(eps), "episodes_asked": episodes_asked,
            "stopped_at_deadline": stopped, "moving_average_window": WINDOW, "reward": rewards, "reward_moving_average": avg,
            "mean_log_std": log_std, "clip_fraction": clip, "seconds": seconds, "decisions": [e["decisions"] for e in eps],
            "mean_replay_share": [e.get("mean_replay_share") for e in eps], "plateau": verdict, "progress": rise,
            "seconds_per_episode_median": sorted(seconds)[len(seconds) // 2] if seconds else None,
            "load_average": os.getloadavg()}
    atomic_write_json(str(out / "proxymix-curve.json"), data)
    _plot(out / "proxymix-curve.png", rewards, avg, log_std, clip)
    atomic_write_text(str(out / "proxymix-curve.md"), _markdown(data))
    return data


def _plot(path: Path, rewards: list[float], avg: list[float], log_std: list, clip: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(1, len(rewards) + 1))
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    axes[0].plot(x, rewards, ".", alpha=0.5, label="episode reward")
    axes[0].plot(x, avg, "-", label=f"moving average ({WINDOW})")
    axes[0].set_ylabel("reward (sum over decisions)")
    axes[0].legend(fontsize=8)
    axes[1].plot([i for i, v in zip(x, log_std) if v is not None], [v for v in log_std if v is not None], "-")
    axes[1].set_ylabel("mean log-std")
    axes[2].plot([i for i, v in zip(x, clip) if v is not None], [v for v in clip if v is not None], "-")
    axes[2].set_ylabel("PPO clip fraction")
    axes[2].set_xlabel("episode")
    fig.suptitle("ProxyMix controller, PPO on the proxy (configs/proxymix/train_controller.yaml)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _markdown(d: dict) -> str:
    r, ls, p = d["reward"], d["mean_log_std"], d["plateau"]
    n = len(r)
    first = [v for v in ls if v is not None]
    lines = [
        "# ProxyMix: learning curve of the proxy controller (PPO)",
        "",
        f"Reproduce (resumable; stops at `--deadline` and continues on the next call): `{d['command']} --deadline HH:MM`; "
        "the doc alone: `python benchmarks/proxymix_curve.py --report-only`.",
        "",
        f"Config `{d['config']}` (fit config `configs/proxymix/proxy.yaml`: tiny Llama 64 x 1 from its aligned base, LoRA r=16, "
        "4 tasks x 60 steps of 16, decisions every 10 steps), one process, one torch thread.",
        "",
        f"Episodes run: **{n}** of {d['episodes_asked']} asked" + (" (stopped at the deadline; the run resumes)." if d["stopped_at_deadline"] else "."),
        "",
        "![learning curve](proxymix-curve.png)",
        "",
        "| | value |",
        "|---|---|",
    ]
    if n:
        lines += [
            f"| reward, first {WINDOW} episodes (mean) | {sum(r[:WINDOW]) / len(r[:WINDOW]):+.3f} |",
            f"| reward, last {WINDOW} episodes (mean) | {sum(r[-WINDOW:]) / len(r[-WINDOW:]):+.3f} |",
            f"| best moving average ({WINDOW}) | {max(d['reward_moving_average']):+.3f} |",
            f"| mean log-std after episode 1 / last | {first[0]:+.4f} / {first[-1]:+.4f} |" if first else "| mean log-std | not recorded |",
            f"| median seconds per episode | {d['seconds_per_episode_median']:.1f} |",
            f"| total seconds | {sum(d['seconds']):.0f} |",
            f"| load average (1, 5, 15 min) when written | {', '.join(f'{v:.1f}' for v in d['load_average'])} |",
        ]
    lines += ["", "## Plateau", "",
              (f"Test: Welch's t between the mean reward of the last {WINDOW} episodes and the {WINDOW} before them; "
               "a plateau when |t| < 2 and the difference is under half the standard deviation of the last window."), ""]
    if p["verdict"] == "too short":
        lines.append(f"Verdict: **too short** ({p['episodes']} episodes; the test needs {p['needed']}).")
    else:
        lines.append(f"Verdict: **{p['verdict']}** (mean {p['mean_before']:+.3f} -> {p['mean_last']:+.3f}, difference {p['difference']:+.3f}, "
                     f"t = {p['welch_t']:+.2f}, sd of the last window {p['sd_last']:.3f}).")
    rise = d["progress"]
    lines += ["", "## Did it learn?", ""]
    if rise is None:
        lines.append("Too few episodes to compare the first and the last window.")
    else:
        moved = (first[-1] - first[0]) if first else float("nan")
        lines.append(f"First {WINDOW} episodes against the last {WINDOW}: mean {rise['mean_first']:+.3f} -> {rise['mean_last']:+.3f} "
                     f"(t = {rise['welch_t']:+.2f}, {'significant' if rise['significant'] else 'not significant'} at |t| >= 2); "
                     f"the mean log-std moved by {moved:+.4f} (exploration std x{math.exp(moved):.3f}).")
        if p["verdict"] == "plateau" and not rise["significant"]:
            lines += ["", ("**The curve is flat from the start**: the reward of the last window is not distinguishable from the "
                           "first, so the plateau is the level of the (nearly) untrained policy, not a learned optimum. Possible "
                           "reasons, not separated by this run: the data order changes every episode (`vary_data_seed: true`), "
                           "so the reward's spread between episodes is large against any trend; with the exploration std "
                           "still about 1 the sampled logits dominate the mean action; one PPO update per episode at "
                           "learning rate 3e-4 moves the policy little in this many episodes.")]
    if n >= 20:
        blocks = [r[i:i + 20] for i in range(0, n, 20)]
        lines += ["", "Mean reward per block of 20 episodes: " + ", ".join(f"{sum(b) / len(b):+.2f}" for b in blocks) + "."]
    shares = [x for x in d["mean_replay_share"] if x]
    if len(shares) >= 2 * WINDOW:
        def mean_share(part: list[dict]) -> str:
            return ", ".join(f"task {int(k) + 1}: {sum(x[k] for x in part) / len(part):.2f}" for k in sorted(part[0]) if k != "0")
        lines += ["", f"Mean replay share chosen (exploring), first {WINDOW} episodes: {mean_share(shares[:WINDOW])}; "
                      f"last {WINDOW}: {mean_share(shares[-WINDOW:])}."]
    lines += ["", "The per-episode numbers (reward, log-std, clip fraction, seconds, replay share) are in `proxymix-curve.json`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=200, help="episodes in total (the paper trains 200)")
    parser.add_argument("--deadline", default=None, help="UTC HH:MM at which the training is stopped and the doc written")
    parser.add_argument("--report-only", action="store_true", help="write the doc from history.json without training")
    parser.add_argument("--out", default=str(REPO / "docs" / "results"))
    args = parser.parse_args()
    os.chdir(REPO)
    stopped = False
    if not args.report_only:
        deadline = None
        if args.deadline:
            now = dt.datetime.now(dt.timezone.utc)
            hh, mm = map(int, args.deadline.split(":"))
            deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
            if deadline <= now:
                deadline += dt.timedelta(days=1)
        rc = train(args.episodes, deadline)
        stopped = rc is None
        if rc:
            raise SystemExit(f"proxymix train failed with exit code {rc}")
    else:
        history = json.loads((REPO / WORK / "history.json").read_text())
        stopped = len(history["episodes"]) < args.episodes
    data = report(Path(args.out), args.episodes, stopped)
    print(json.dumps({k: data[k] for k in ("episodes_run", "plateau", "seconds_per_episode_median")}))


if __name__ == "__main__":
    main()
