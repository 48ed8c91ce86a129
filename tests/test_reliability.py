"""Reliability of every shipped config: SIGKILL and resume, an exception in a callback, 2-process DDP.

Every config in :data:`CASES` (the quickstart and each method's config) is run shrunk: a tiny model, three
short tasks, the config's own callbacks with their kill points (``helpers_kill.Killable<Name>``, which
behave exactly like ``<Name>`` unless ``CIT_KILL_AT`` is set). Per config the default suite checks:

- a real ``python -m lightning_cit.cli fit`` subprocess killed with SIGKILL at the config's kill point and
  resumed with ``--ckpt_path last`` ends with the uninterrupted run's ``scores.json``, bit for bit;
- an exception raised inside a callback mid-task leaves ``scores.json`` (the rows so far) and a
  ``last.ckpt`` that loads with ``weights_only=True``, and the resumed run again ends bit-identical;
- ``--trainer.devices 2 --trainer.strategy ddp`` on CPU: ranks agree at every task end on the mixture
  schedule, buffers, every callback's state and the trainable weights; they train on disjoint samples;
  exactly one ``scores.json`` is written.

Signals and disks (quickstart in the default suite, every config in the full tier):

- SIGTERM (what a scheduler sends before a kill) mid-task and during the task-end evaluation: the process
  exits 143 with one ``error:`` line, leaves a ``last.ckpt`` at the step it stopped (mid-task) or at the task
  end, and ``--ckpt_path last`` ends bit-identical; on 2 DDP ranks, SIGTERM to every rank at once (SLURM's ``srun``)
  exits 143 without hanging, with ``last.ckpt`` at the step the ranks agreed on (the full tier also resumes it, and
  SIGTERM to either rank alone, bit-identically);
- SIGKILL half-way through writing ``last.ckpt`` with ``default_root_dir`` on a tmpfs and ``$TMPDIR`` on
  another filesystem: the previous ``last.ckpt`` is whole, nothing was written to ``$TMPDIR``, the resumed run
  removes the dead temporary and ends bit-identical; a full disk is a clean error that leaves no partial file.

The full matrix (every config x every kill point, ``KILL_POINTS``) runs with
``CIT_RELIABILITY_FULL=1 python -m pytest -m reliability_full tests/test_reliability.py``.

Adding a config: one entry in :data:`CASES` (its composition: the ``--config`` files under ``configs/``, a base
and a method overlay; the shrinking overrides of its callbacks, and the kill point the default suite uses for it).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import helpers_kill
import pytest
import torch
import yaml
from conftest import REPO, TESTS_DIR

from lightning_cit.cli import main, resolve_config

STEPS = 6  # optimizer steps per task
TASKS = 3  # trained tasks kept from each config
CHECKPOINT_EVERY = 4  # periodic checkpoints: steps 4, 8, 16 (12 is a task's last step: saved at the task end)
TOTAL_STEPS = STEPS * TASKS
DDP_TASKS = 2  # enough for a boundary (buffers, OPR rollout, JFA flashbacks, LCIA group reuse) and replay after it
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 128}
FULL = os.environ.get("CIT_RELIABILITY_FULL") == "1"

# One entry per config. "init_args": shrinking overrides per callback class; "kill": the kill point(s) of the
# default suite (step:random draws a step from a generator seeded by the config's name); "points": the extra
# kill points of the full matrix; "ddp_strategy": the strategy for the DDP test; "full_only": only in the full tier.
CASES: dict[str, dict[str, Any]] = {
    "quickstart": {
        "config": ["quickstart.yaml"],
        # two kills in a row: at the start of task 2 (after task 1's checkpoint), then, in the resumed process, in the
        # middle of the evaluation at the end of task 2 (its 2nd scored task)
        "kill": ["task_start:1", "eval:2"],
        "points": ["step:random", "eval:5", "task_end:2", "decide:2"],
    },
    "mssr": {
        "config": ["quickstart.yaml", "methods/mssr.yaml"],
        "init_args": {"MSSRReplay": {"lambda_0": 0.3, "decision_interval": 2, "rescore_interval": 3, "first_interval": 4}},
        "kill": "decide:5",  # a mid-task decision of task 2 (one per task start, then every 2 steps)
        "points": ["step:random", "eval:6", "task_start:2"],
    },
    "lcia": {
        "config": ["base/cit_synth_lora.yaml", "methods/lcia.yaml"],
        "init_args": {"DynamicEMA": {"scale": 1e-4}},
        "kill": "step:random",
        "points": ["step:9", "eval:7", "task_start:1", "task_end:1"],  # step 9: cipher_b reuses cipher_a's adapter, EMA on
        "ddp_strategy": "ddp_find_unused_parameters_true",  # one adapter slot per task, one trains at a time
    },
    "opr": {
        "config": ["base/cit_synth_lora.yaml", "methods/opr.yaml"],
        "init_args": {"OnPolicyReplay": {"budget": 8, "candidates_per_task": 8}},
        "kill": "opr:2",  # the rollout at the end of task 2 (answer batches: 1 after task 1, 2 and 3 after task 2)
        "points": ["step:random", "opr:1", "eval:5", "task_start:1"],
    },
    "jfa": {
        "config": ["base/cit_synth_lora.yaml", "methods/jfa.yaml"],
        "init_args": {"JointFlashbackAdaptation": {"flashbacks_per_task": 4, "encoder_dim": 64, "key_chunks": 2, "pool_size": 8,
                                                   "latent_rank": 2}},
        "kill": "jfa:2",  # the flashback generation at the end of task 2
        "points": ["step:random", "jfa:1", "eval:6", "task_start:2"],
    },
    "quickstart_no_replay": {"config": ["quickstart.yaml", "methods/no_replay.yaml"], "kill": "task_start:1", "points": ["step:random"], "full_only": True},
    "cit_synth_lora": {"config": ["base/cit_synth_lora.yaml"], "kill": "eval:6", "points": ["step:random"], "full_only": True},
}
DEFAULT = [pytest.param(name, marks=pytest.mark.skipif(not FULL, reason="full tier: CIT_RELIABILITY_FULL=1"))
           if case.get("full_only") else name for name, case in CASES.items()]
KILL_POINTS = [(name, point) for name, case in CASES.items() for point in case["points"]]
KILLABLE = ("MixtureController", "ForgettingEvaluator", "OnPolicyReplay", "JointFlashbackAdaptation")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # every run of a comparison uses the same intra-op thread count (subprocesses: OMP_NUM_THREADS=1), and on
    # a shared 2-core machine one thread is also the fastest (no spinning OpenMP workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (helpers_kill.KILL_ENV, "CIT_KILL_HOW")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p), OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when sys.argv (here pytest's) and an explicit argv are both present
    monkeypatch.setattr("sys.argv", ["lightning-cit"])
    monkeypatch.delenv(helpers_kill.KILL_ENV, raising=False)


def _killable(class_path: str) -> str:
    from lightning_cit import callbacks

    module, _, name = class_path.rpartition(".")
    cls = getattr(callbacks, name, None) if module == "lightning_cit.callbacks" else None
    bases = {base.__name__ for base in cls.__mro__} if isinstance(cls, type) else set()
    return f"helpers_kill.Killable{name}" if bases & set(KILLABLE) else class_path


def shrunk_config(name: str, directory: Path, extra_callbacks: list[dict] = (), tasks: int = TASKS) -> Path:
    """The config of ``CASES[name]`` with a tiny model, ``tasks`` short tasks and kill points; written to ``directory``."""
    case = CASES[name]
    config = resolve_config([REPO / "configs" / path for path in case["config"]])
    trainer, model, data = config["trainer"], config["model"], config["data"]
    trainer.update(enable_progress_bar=False, log_every_n_steps=2)
    callbacks = trainer["callbacks"]
    periodic = [c for c in callbacks if c["class_path"].endswith("TaskCheckpoint") and c["init_args"].get("every_n_train_steps")]
    assert periodic, f"{case['config']}: TaskCheckpoint without every_n_train_steps (periodic checkpoints off)"
    for callback in callbacks:
        short = callback["class_path"].rpartition(".")[2]
        args = callback.setdefault("init_args", {}) or {}
        callback["init_args"] = args
        if short == "ForgettingEvaluator":
            args.update(probe_every_n_steps=3, heatmap=False)
        if short == "TaskCheckpoint":
            args["every_n_train_steps"] = CHECKPOINT_EVERY
        args.update(case.get("init_args", {}).get(short, {}))
        callback["class_path"] = _killable(callback["class_path"])
        if not callback["init_args"]:
            del callback["init_args"]
    callbacks.insert(0, {"class_path": "helpers_kill.KillSwitch"})
    callbacks.extend(extra_callbacks)
    model.update(model="tiny", tiny=dict(TINY), warmup_steps=2, eval_batch_size=16)
    if model.get("lora"):
        model["lora"] = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": model["lora"]["target_modules"]}
    trained = [t for t in data["tasks"] if t.get("train", True)][:tasks]
    eval_only = [t for t in data["tasks"] if not t.get("train", True)]
    shrunk = []
    for task in trained + eval_only:
        task = dict(task, eval_size=4, probe_size=4, max_new_tokens=min(task.get("max_new_tokens", 48), 6))
        if task.get("train", True):
            task["train_size"] = 48  # >= the 6 x 8 draws of a task: no sample is drawn twice within a task
        shrunk.append(task)
    data.update(steps_per_task=STEPS, global_batch_size=8, max_length=64, tasks=shrunk)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit(config: Path, root: Path, *extra: str) -> int:
    return main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root), *extra])


def final_scores(root: Path) -> dict:
    files = sorted(root.glob("lightning_logs/version_*/scores.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    assert files, f"no scores.json under {root}"
    return json.loads(files[-1].read_text())


def assert_same_scores(got: dict, want: dict) -> None:
    assert got["rows"] == want["rows"]
    assert got["matrix"] == want["matrix"], "score matrix differs from the uninterrupted run"
    assert got["loss_matrix"] == want["loss_matrix"], "loss matrix differs from the uninterrupted run"
    assert got == want  # summary, eval-only rows, safety, method sections too
    assert got["complete"]


_references: dict[str, tuple[Path, dict]] = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted in-process run of a config, run once per module and shared by the tests."""

    def get(name: str) -> tuple[Path, dict]:
        if name not in _references:
            directory = tmp_path_factory.mktemp(f"reference_{name}")
            config = shrunk_config(name, directory)
            assert fit(config, directory / "run") == 0
            _references[name] = (config, final_scores(directory / "run"))
        return _references[name]

    yield get
    _references.clear()


def resolve(name: str, point: str) -> str:
    kind, _, value = point.partition(":")
    if value == "random":
        # a seeded random step that no periodic checkpoint lands on and that is no task's last step
        candidates = [s for s in range(2, TOTAL_STEPS) if s % CHECKPOINT_EVERY and s % STEPS]
        return f"{kind}:{random.Random(f'kill/{name}').choice(candidates)}"
    return point


def kill_at(config: Path, root: Path, point: str, tmp_path: Path) -> None:
    """Run ``fit`` in a subprocess that SIGKILLs itself at ``point``; check that it died there."""
    mark = tmp_path / f"killed_{point.replace(':', '_')}"
    env = subprocess_env(**{helpers_kill.KILL_ENV: point, helpers_kill.MARK_ENV: str(mark)})
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--ckpt_path", "last"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"expected a SIGKILL at {point}, got rc={proc.returncode}:\n{proc.stderr[-3000:]}"
    assert mark.read_text() == point
    for scores in root.rglob("scores.json"):  # whatever was written before the kill is whole
        assert json.loads(scores.read_text())["rows"][0] == "base"


def kill_and_resume(name: str, points: str | list[str], tmp_path: Path, reference) -> None:
    """Kill at each point in turn (each kill in a process resumed from the previous one), then finish in-process."""
    config, want = reference(name)
    root = tmp_path / "run"
    for point in [points] if isinstance(points, str) else points:
        kill_at(config, root, resolve(name, point), tmp_path)
    assert fit(config, root, "--ckpt_path", "last") == 0
    assert_same_scores(final_scores(root), want)


# ---------------------------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("name", DEFAULT)
def test_sigkill_then_resume_from_last_gives_the_same_scores(name, tmp_path, reference):
    kill_and_resume(name, CASES[name]["kill"], tmp_path, reference)


@pytest.mark.reliability_full
@pytest.mark.skipif(not FULL, reason="full tier: CIT_RELIABILITY_FULL=1")
@pytest.mark.parametrize("name, point", KILL_POINTS)
def test_sigkill_matrix(name, point, tmp_path, reference):
    kill_and_resume(name, point, tmp_path, reference)


# ------------------------------------------------------------------------------------ failure injection


@pytest.mark.parametrize("name", DEFAULT)
def test_an_exception_in_a_callback_mid_task_leaves_scores_and_checkpoint_resumable(name, tmp_path, reference, monkeypatch):
    config, want = reference(name)
    step = STEPS + STEPS // 2 + 1  # mid task 2, one step after its periodic checkpoint at step 8
    root = tmp_path / "run"
    monkeypatch.setenv(helpers_kill.KILL_ENV, f"step:{step}")
    monkeypatch.setenv("CIT_KILL_HOW", "raise")
    with pytest.raises(RuntimeError, match=f"injected failure at step:{step}"):
        fit(config, root)
    monkeypatch.delenv(helpers_kill.KILL_ENV)
    scores = final_scores(root)
    assert scores["rows"] == want["rows"][:2] and not scores["complete"]  # base + task 1, as written before the crash
    assert scores["matrix"] == want["matrix"][:2]
    assert not list(root.rglob(".scores.json.*"))  # no half-written temporary left behind
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == CHECKPOINT_EVERY * (step // CHECKPOINT_EVERY)
    assert fit(config, root, "--ckpt_path", "last") == 0
    assert_same_scores(final_scores(root), want)


# ---------------------------------------------------------------------------------------------- DDP


@pytest.mark.parametrize("name", DEFAULT)
def test_two_process_ddp_ranks_agree_and_read_disjoint_samples(name, tmp_path):
    record = {"class_path": "helpers_kill.RecordRankState", "init_args": {"out_dir": str(tmp_path / "rec")}}
    config = shrunk_config(name, tmp_path, [record], tasks=DDP_TASKS)
    env = subprocess_env()
    strategy = CASES[name].get("ddp_strategy", "ddp")
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"),
           "--trainer.devices", "2", "--trainer.strategy", strategy]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "run").rglob("scores.json"))) == 1
    assert final_scores(tmp_path / "run")["complete"]
    ranks = [json.loads((tmp_path / "rec" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # the same state on both ranks at every task end: schedule, buffers, callbacks, trainable weights
    assert len(ranks[0]["digests"]) == DDP_TASKS
    for task, (a, b) in enumerate(zip(ranks[0]["digests"], ranks[1]["digests"])):
        differing = sorted(key for key in a if a[key] != b.get(key))
        assert not differing, f"ranks disagree at the end of task {task + 1} on {differing}"
    # each rank trains on its own half of every global batch, in lockstep
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == STEPS * DDP_TASKS
    for (task_a, step_a, _, ids_a), (task_b, step_b, _, ids_b) in zip(ranks[0]["seen"], ranks[1]["seen"]):
        assert (task_a, step_a) == (task_b, step_b) and len(ids_a) == len(ids_b) == 4
    # a task's own samples: a task draws at most train_size of them, so none may appear twice on any rank
    for task in range(DDP_TASKS):
        current = [sid for rank in ranks for t, _, sources, ids in rank["seen"] if t == task
                   for source, sid in zip(sources, ids) if source == task]
        assert current and len(current) == len(set(current)), f"task {task + 1}: a sample was read twice across ranks"


# ---------------------------------------------------------------------------------------------- SIGTERM

TERM_POINTS = ["step:random", "eval:2"]  # mid-task (SignalCheckpoint saves there), then during a task-end evaluation


def term_at(config: Path, root: Path, point: str, tmp_path: Path) -> int:
    """Run ``fit --ckpt_path last`` in a subprocess that sends itself SIGTERM at ``point``; returns last.ckpt's step."""
    mark = tmp_path / f"termed_{point.replace(':', '_')}"
    env = subprocess_env(**{helpers_kill.KILL_ENV: point, helpers_kill.MARK_ENV: str(mark), "CIT_KILL_HOW": "term"})
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--ckpt_path", "last"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 143, f"expected exit 143 after SIGTERM at {point}, got rc={proc.returncode}:\n{proc.stderr[-3000:]}"
    assert mark.read_text() == point
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "SIGTERM" in errors[0] and "--ckpt_path last" in errors[0], proc.stderr[-2000:]
    scores = final_scores(root)
    assert scores["complete"] is (len(scores["rows"]) == TASKS + 1)  # complete only if the last task's row was written
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def sigterm_and_resume(name: str, tmp_path: Path, reference) -> None:
    config, want = reference(name)
    root = tmp_path / "run"
    step_point = resolve(name, TERM_POINTS[0])
    stopped = int(step_point.split(":")[1])
    assert term_at(config, root, step_point, tmp_path) == stopped  # saved at the very step it stopped, mid-task
    # the resumed process's 2nd scored task is in the row at the end of the task it resumed in
    assert term_at(config, root, TERM_POINTS[1], tmp_path) == STEPS * math.ceil(stopped / STEPS)  # the task-end checkpoint
    assert fit(config, root, "--ckpt_path", "last") == 0
    assert_same_scores(final_scores(root), want)


def test_sigterm_saves_exits_143_and_resumes_bit_identical(tmp_path, reference):
    sigterm_and_resume("quickstart", tmp_path, reference)


@pytest.mark.reliability_full
@pytest.mark.skipif(not FULL, reason="full tier: CIT_RELIABILITY_FULL=1")
@pytest.mark.parametrize("name", [n for n in CASES if n != "quickstart"])
def test_sigterm_matrix(name, tmp_path, reference):
    sigterm_and_resume(name, tmp_path, reference)


SIGNAL_POLL = 10  # SignalCheckpoint's default check_every_n_steps: under DDP the ranks agree on a stop at steps 10, 20, ...
DDP_TIMEOUT = 240  # seconds; a hang (mismatched collectives) is reported as a failure, not waited out


def ddp_run(config: Path, root: Path, **env: str) -> subprocess.CompletedProcess:
    """``fit --ckpt_path last`` on 2 CPU ranks (gloo) in its own process group, killed whole if it outlives DDP_TIMEOUT."""
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config), "--trainer.default_root_dir", str(root),
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--ckpt_path", "last"]
    proc = subprocess.Popen(cmd, env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=DDP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it started
        out, err = proc.communicate()
        pytest.fail(f"the DDP run did not exit within {DDP_TIMEOUT} s ({env}): a hang\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ddp_term(config: Path, root: Path, step: int, rank: int | None = None) -> int:
    """A DDP run in which every rank (or only ``rank``) sends itself SIGTERM after step ``step``; returns last.ckpt's step."""
    env = {helpers_kill.KILL_ENV: f"step:{step}", "CIT_KILL_HOW": "term"}
    if rank is not None:
        env["CIT_KILL_RANK"] = str(rank)
    proc = ddp_run(config, root, **env)
    assert proc.returncode == 143, f"expected exit 143 after SIGTERM at step {step}, got rc={proc.returncode}:\n{proc.stderr[-3000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--ckpt_path last" in errors[0], proc.stderr[-2000:]
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def test_sigterm_to_every_ddp_rank_exits_143_without_hanging(tmp_path):
    """SIGTERM to both ranks at once (SLURM's srun): no hang, exit 143, last.ckpt at the first agreed stop step.

    Signalled after step 7 (mid task 2), the ranks agree at step 10 (SignalCheckpoint's poll) and save there together.
    """
    config = shrunk_config("quickstart", tmp_path, tasks=DDP_TASKS)
    assert ddp_term(config, tmp_path / "run", 7) == SIGNAL_POLL


@pytest.mark.reliability_full
@pytest.mark.skipif(not FULL, reason="full tier: CIT_RELIABILITY_FULL=1")
def test_sigterm_to_every_ddp_rank_resumes_bit_identical(tmp_path):
    """SIGTERM to both ranks, twice: before a poll that falls on a task's last step, then mid-task; resume matches.

    After step 2 (the next poll is the start of task 2, before step 10): the ranks agree there, after task 1's
    checkpoint (step 6). Resumed, signalled after step 7: they stop and save at step 10. The final resume ends with
    the uninterrupted DDP run's scores.json, bit for bit.
    """
    config = shrunk_config("quickstart", tmp_path, tasks=DDP_TASKS)
    assert ddp_run(config, tmp_path / "reference").returncode == 0
    root = tmp_path / "run"
    assert ddp_term(config, root, 2) == STEPS  # the task-end checkpoint of task 1
    assert ddp_term(config, root, 7) == SIGNAL_POLL
    proc = ddp_run(config, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_scores(final_scores(root), final_scores(tmp_path / "reference"))


@pytest.mark.reliability_full
@pytest.mark.skipif(not FULL, reason="full tier: CIT_RELIABILITY_FULL=1")
@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_to_the_ddp_launcher_exits_143_and_resumes_bit_identical(rank, tmp_path):
    """SIGTERM to one rank only (0: the launcher; 1: a rank it started): exit 143, the resume matches an unbroken DDP run."""
    config = shrunk_config("quickstart", tmp_path, tasks=DDP_TASKS)
    assert ddp_run(config, tmp_path / "reference").returncode == 0
    stop = CHECKPOINT_EVERY + 1  # one step after the periodic checkpoint of task 1
    # the next poll is the start of task 2 (before step 10): the ranks stop there; task 1's end checkpoint (step 6) stays
    assert ddp_term(config, tmp_path / "run", stop, rank=rank) == STEPS
    proc = ddp_run(config, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_scores(final_scores(tmp_path / "run"), final_scores(tmp_path / "reference"))


# ---------------------------------------------------------------------------------------------- disks


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh tmpfs (another filesystem than tmp_path's) mounted for the test; skipped where mounting is not allowed."""

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (the cross-filesystem checkpoint test)")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
        mounted.append(point)
        return point

    mounted: list[Path] = []
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def with_plugin(config: Path, directory: Path, plugin: str) -> Path:
    data = yaml.safe_load(config.read_text())
    data["trainer"]["plugins"] = [{"class_path": plugin}]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config_plugin.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_kill_while_writing_last_ckpt_across_filesystems_keeps_the_previous_one(tmp_path, reference, tmpfs):
    config, want = reference("quickstart")
    config = with_plugin(config, tmp_path, "helpers_kill.KillingCheckpointIO")
    disk = tmpfs("mnt", "256m")
    scratch = tmp_path / "tmpdir"  # $TMPDIR: the disk tmp_path is on, not the tmpfs
    scratch.mkdir()
    assert os.stat(disk).st_dev != os.stat(scratch).st_dev
    root = disk / "run"
    point = "last_write:2"  # the 2nd last.ckpt: at the end of task 1, after the periodic one at step 4
    mark = tmp_path / "killed"
    env = subprocess_env(**{helpers_kill.KILL_ENV: point, helpers_kill.MARK_ENV: str(mark), "TMPDIR": str(scratch)})
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--ckpt_path", "last"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL and mark.read_text() == point, proc.stderr[-3000:]
    checkpoints = root / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == CHECKPOINT_EVERY  # the previous one, whole
    dead = list(checkpoints.glob(".last.ckpt.*.lightning-cit-tmp"))
    assert len(dead) == 1 and dead[0].stat().st_size > 0  # the half-written temporary sits next to it, not in $TMPDIR
    assert not [p for p in scratch.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]
    assert fit(config, root, "--ckpt_path", "last") == 0
    assert not list(checkpoints.glob("*.lightning-cit-tmp"))  # the resumed run removed the dead temporary
    assert_same_scores(final_scores(root), want)


def test_full_disk_is_one_error_and_leaves_no_partial_checkpoint(tmp_path, reference, tmpfs, capsys):
    config, _ = reference("quickstart")
    disk = tmpfs("small", "160k")  # room for the logs and scores (~32 kB), not for a checkpoint (~196 kB)
    root = disk / "run"
    assert fit(config, root) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot write checkpoint" in errors[0] and "No space left on device" in errors[0], err[-2000:]
    assert not [p.name for p in root.rglob("*") if p.suffix == ".ckpt" or p.name.endswith(".lightning-cit-tmp")]
    assert final_scores(root)["complete"] is False
