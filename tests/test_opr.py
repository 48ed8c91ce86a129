"""OPR (on-policy replay): budget split, selection, generated buffers, rewards, DDP gather, resume, memory."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO
from lightning.pytorch.callbacks import Callback
from lightning_cit.callbacks import OnPolicyReplay, SizeProportional
from lightning_cit.callbacks.mixture import MixtureSignals
from lightning_cit.callbacks.opr import per_task_quota, ru_scores, select_by_score
from lightning_cit.datamodules import ContinualInstructionDataModule
from test_e2e import run

from lightning_cit.errors import ConfigError
from lightning_cit.metrics import edit_similarity
from lightning_cit.module import ContinualLM

STEPS = 12
TASKS = [
    {"name": "cipher_a", "source": "synth:cipher_a", "train_size": 64, "eval_size": 8, "probe_size": 4, "max_new_tokens": 8},
    {"name": "compare", "source": "synth:compare", "train_size": 64, "eval_size": 8, "probe_size": 4},
    {"name": "shift", "source": "synth:shift", "train_size": 64, "eval_size": 8, "probe_size": 4, "max_new_tokens": 8},
]


def length_reward(sample, answer, task):
    """A user reward given by import path (``test_opr:length_reward``): longer answers score higher."""
    return float(len(answer))


class DumpBuffers(Callback):
    """Writes, per rank, the replay buffers and OPR's history at the end of training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        opr = next(cb for cb in trainer.callbacks if isinstance(cb, OnPolicyReplay))
        buffers = {str(j): b.entries for j, b in trainer.datamodule.buffers.items()}
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"buffers": buffers, "history": opr.history}, handle)


def opr_config(tmp_path: Path, opr_args: dict, extra_callbacks=()) -> Path:
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["log_every_n_steps"] = 5
    callbacks = config["trainer"]["callbacks"]
    callbacks[0] = {"class_path": "lightning_cit.callbacks.SizeProportional"}
    callbacks[1]["init_args"]["probe_every_n_steps"] = None
    callbacks[2]["init_args"] = {"save_last": True, "save_top_k": -1, "every_n_epochs": 1}  # end-of-task checkpoints
    callbacks.insert(1, {"class_path": "lightning_cit.callbacks.OnPolicyReplay", "init_args": opr_args})
    callbacks.extend(extra_callbacks)
    config["data"].update(steps_per_task=STEPS, global_batch_size=8, tasks=TASKS)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def small_setup(**opr_args):
    """A tiny model, its DataModule and a stand-in trainer for calling the callback directly."""
    dm = ContinualInstructionDataModule(tasks=TASKS, global_batch_size=8, steps_per_task=STEPS, buffer_size=0.5)
    dm.load_tasks()
    module = ContinualLM(model="tiny", eval_batch_size=16)
    module.configure_model()
    trainer = SimpleNamespace(datamodule=dm, global_rank=0, world_size=1)
    return OnPolicyReplay(**opr_args), module, dm, trainer


# ------------------------------------------------------------------------------------ the rule


def test_budget_is_split_equally_over_the_seen_tasks_current_one_included():
    # paper: budget = 50 (1% of 5000), n_per = floor(50 / k) at the end of stage k
    assert [per_task_quota(50, k) for k in range(1, 9)] == [50, 25, 16, 12, 10, 8, 7, 6]
    opr, module, dm, trainer = small_setup(budget=0.25, temperature=0.0, candidates_per_task=20)
    record = opr.rebuild_buffers(trainer, module, finished=1)  # 25% of 64 = 16 samples over 2 seen tasks
    assert record["budget"] == 16 and record["per_task"] == 8
    assert [len(dm.buffers[j]) for j in (0, 1)] == [8, 8] == record["kept"]
    assert record["candidates"] == [20, 20]
    record = OnPolicyReplay(budget=7, answers="gold").rebuild_buffers(trainer, module, finished=2)
    assert record["per_task"] == 2 and [len(dm.buffers[j]) for j in range(3)] == [2, 2, 2]


def test_selection_keeps_the_top_or_the_bottom_scores_ties_in_candidate_order():
    scored = [(0, 50.0), (1, 100.0), (2, 0.0), (3, 100.0), (4, float("nan")), (5, 0.0)]
    assert select_by_score(scored, 3, "top") == [1, 3, 0]
    assert select_by_score(scored, 3, "bottom") == [2, 5, 0]
    assert select_by_score(scored, 6, "top")[-1] == 4  # an unscorable answer is picked last either way
    assert select_by_score(scored, 0, "top") == []


def test_buffers_hold_the_models_answers_not_the_references():
    opr, module, dm, trainer = small_setup(budget=12, temperature=0.0, candidates_per_task=16)
    module.train()
    record = opr.rebuild_buffers(trainer, module, finished=1)
    assert module.training  # eval mode during the rollout only
    cipher, compare = dm.train_tasks[0], dm.train_tasks[1]
    pool = opr.candidates(dm, 0)
    greedy = dict(zip(pool, module.generate_answers([cipher.train[i] for i in pool], 8)))
    entries = dm.buffers[0].entries
    assert len(entries) == record["per_task"] == 6
    for entry in entries:
        sample = cipher.train[entry["prompt_index"]]
        assert entry["messages"] == sample["messages"]
        assert entry["response"] == greedy[entry["prompt_index"]]  # the model's own answer...
        assert entry["opr_score"] == pytest.approx(edit_similarity(entry["response"], sample["response"]))
    assert any(e["response"] != cipher.train[e["prompt_index"]]["response"] for e in entries)  # ...not the reference
    # the kept ones are the best scored of the pool
    all_scores = sorted((edit_similarity(greedy[i], cipher.train[i]["response"]) for i in pool), reverse=True)
    assert sorted((e["opr_score"] for e in entries), reverse=True) == pytest.approx(all_scores[:6])
    # multiple choice: the answer is the option the model picks by log-likelihood
    chosen = module.choose_options([compare.train[e["prompt_index"]] for e in dm.buffers[1].entries])
    for entry, c in zip(dm.buffers[1].entries, chosen):
        assert entry["response"] == compare.train[entry["prompt_index"]]["options"][c]
    # the DataModule serves them as replay samples with the prompt's id
    served = dm.buffer_samples(0)
    assert [s["response"] for s in served] == [e["response"] for e in entries]
    assert all(s["is_replay"] and s["sample_id"] == e["prompt_index"] for s, e in zip(served, entries))
    # Vanilla replay (answers: gold): the same count per task, references into the data
    OnPolicyReplay(budget=12, answers="gold", candidates_per_task=16).rebuild_buffers(trainer, module, finished=1)
    assert all(isinstance(e, int) and e in pool for e in dm.buffers[0].entries) and len(dm.buffers[0]) == 6


def test_ru_reward_scores_crafted_answers_with_the_task_metric():
    samples = [{"response": "abcdef"}, {"response": "abcdef"}, {"response": "abcdef"}]
    assert ru_scores("exact_match", samples, [" abcdef ", "abcdeg", ""]) == [100.0, 0.0, 0.0]
    assert ru_scores("edit_similarity", samples, ["abcdef", "abcdeg", "zzzzzz"]) == pytest.approx([100.0, 100 * 5 / 6, 0.0])
    mc = [{"options": ["A", "B"], "answer_index": 1}] * 2
    assert ru_scores("mc_accuracy", mc, ["B", "A"]) == [100.0, 0.0]


def test_sc_and_callable_rewards_and_the_low_score_ablation():
    opr, module, dm, trainer = small_setup(reward="sc", temperature=0.0)
    samples = dm.train_tasks[0].train[:4]
    answers = ["abc", "abcdef", "", "jj"]
    own = [{"messages": s["messages"], "response": a} for s, a in zip(samples, answers)]
    assert opr._score(module, dm.train_tasks[0], samples, answers) == pytest.approx([-x for x in module.sample_losses(own)])
    custom = OnPolicyReplay(reward="test_opr:length_reward")
    assert custom._score(module, dm.train_tasks[0], samples, answers) == [3.0, 6.0, 0.0, 2.0]
    top = OnPolicyReplay(budget=4, reward="sc", temperature=0.0, candidates_per_task=16)
    top.rebuild_buffers(trainer, module, finished=0)
    best = [e["opr_score"] for e in dm.buffers[0].entries]
    OnPolicyReplay(budget=4, reward="sc", temperature=0.0, candidates_per_task=16, keep="bottom").rebuild_buffers(trainer, module, finished=0)
    worst = [e["opr_score"] for e in dm.buffers[0].entries]
    assert min(best) >= max(worst) and len(best) == len(worst) == 4
    assert [e["prompt_index"] for e in dm.buffers[0].entries] == sorted(e["prompt_index"] for e in dm.buffers[0].entries)  # data order


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"answers": "teacher"}, "answers='teacher' is unknown; valid: generated, gold"),
        ({"keep": "middle"}, "keep='middle' is unknown; valid: top, bottom"),
        ({"reward": "rouge"}, "use one of ru, sc or 'module:function'"),
        ({"reward": "no_such_module:fn"}, "cannot be imported"),
        ({"budget": 1.5}, "OnPolicyReplay.budget"),
        ({"candidates_per_task": 0}, "candidates_per_task"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_options_name_the_field_and_the_choices(kwargs, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("[", r"\[")):
        OnPolicyReplay(**kwargs)


def test_size_proportional_weights_sources_by_their_entries():
    signals = MixtureSignals(task_index=2, num_tasks=4, batch_in_task=0, step=0, steps_in_task=10, progress=0.0,
                             probe_losses=[None] * 4, source_sizes=[5, 5, 1000])
    assert SizeProportional().decide(signals) == [5.0, 5.0, 1000.0, 0.0]


def test_rollout_leaks_no_tensors_and_restores_the_training_mode():
    opr, module, dm, trainer = small_setup(budget=8, temperature=0.1, candidates_per_task=16)
    module.train()

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    counts = []
    for finished in (0, 1, 1):
        opr.rebuild_buffers(trainer, module, finished=finished)
        counts.append(live_tensors())
    assert counts[1] == counts[2], counts  # a second identical boundary leaves nothing behind
    assert module.training and torch.is_grad_enabled()
    assert all(isinstance(e, dict) and not any(torch.is_tensor(v) for v in e.values()) for e in dm.buffers[0].entries)


# ------------------------------------------------------------------------------------ through the CLI


def test_fit_rebuilds_buffers_logs_throughput_and_resumes_right_after_a_boundary(tmp_path):
    dump = {"class_path": "test_opr.DumpBuffers", "init_args": {"out_dir": str(tmp_path / "dump_full")}}
    config = opr_config(tmp_path, {"budget": 12, "reward": "ru", "temperature": 0.1}, [dump, {"class_path": "lightning_cit.callbacks.CostMeter"}])
    full = run(config, tmp_path / "full")
    state = json.loads((tmp_path / "dump_full" / "rank0.json").read_text())
    history = state["history"]
    assert [r["task"] for r in history] == [0, 1] and [r["per_task"] for r in history] == [12, 6]
    cost = json.loads(next((tmp_path / "full").rglob("cost.json")).read_text())  # the rollouts are counted under their own name
    assert cost["forwards"]["rollout"] > 0 and cost["cpu_s"]["rollout"] > 0 and "rollout" not in cost["backward_positions"]
    assert all(len(b) == 6 and all(isinstance(e, dict) for e in b) for b in state["buffers"].values())
    assert history[0]["tokens"] > 0 and history[0]["tokens_per_s"] > 0
    metrics = next((tmp_path / "full").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "opr/tokens_per_s" in metrics
    # the end-of-task-1 checkpoint already holds the generated buffer (plain types: loads weights_only)
    boundary = next((tmp_path / "full").rglob("epoch=0-step=12.ckpt"))
    checkpoint = torch.load(boundary, weights_only=True)
    saved = checkpoint["ContinualInstructionDataModule"]["buffers"][0]["entries"]
    assert len(saved) == 12 and all(isinstance(e, dict) and "opr_score" in e for e in saved)
    cipher = {tuple(m["content"] for m in s["messages"]): s["response"] for s in ContinualInstructionDataModule(tasks=TASKS).evaluation_tasks()[0].train}
    assert any(e["response"] != cipher[tuple(m["content"] for m in e["messages"])] for e in saved)
    # resuming there trains task 2 on those buffers (no new rollout for boundary 1) and ends like the full run
    dump["init_args"]["out_dir"] = str(tmp_path / "dump_resumed")
    resumed = run(opr_config(tmp_path, {"budget": 12, "reward": "ru", "temperature": 0.1}, [dump]), tmp_path / "resumed", "--ckpt_path", str(boundary))
    again = json.loads((tmp_path / "dump_resumed" / "rank0.json").read_text())
    assert again["history"][0] == history[0]  # restored, not re-measured
    assert again["buffers"] == state["buffers"]
    assert resumed["matrix"] == full["matrix"]


def test_ddp_ranks_split_the_rollout_and_hold_identical_buffers(tmp_path):
    dump = {"class_path": "test_opr.DumpBuffers", "init_args": {"out_dir": str(tmp_path / "dump")}}
    config = opr_config(tmp_path, {"budget": 12, "reward": "ru", "temperature": 0.0, "candidates_per_task": 24}, [dump])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config), "--trainer.default_root_dir",
           str(tmp_path / "run"), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "dump" / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "dump" / "rank1.json").read_text())
    assert r0["buffers"] == r1["buffers"] and r0["history"] == r1["history"]
    assert [len(b) for b in r0["buffers"].values()] == [6, 6]
    # the kept answers come from both ranks' shares of the candidates (rank r rolls out positions r::2)
    opr = OnPolicyReplay(candidates_per_task=24)
    dm = ContinualInstructionDataModule(tasks=TASKS)
    dm.load_tasks()
    for j, entries in r0["buffers"].items():
        pool = opr.candidates(dm, int(j))
        assert {pool.index(e["prompt_index"]) % 2 for e in entries} == {0, 1}
    assert r0["history"][0]["candidates"] == [24]


def test_rebuilt_buffers_keep_another_methods_flashback_prompts():
    """OPR + JFA in one run: OPR rewrites every buffer at a task end, and JFA's answerless prompts stay in it."""
    opr, module, dm, trainer = small_setup(budget=4, answers="gold")
    dm.end_task(0)
    flashback = {"messages": [{"role": "user", "content": "Encode with key A: abcdef"}], "response": "x", "prompt_only": True}
    dm.memory.extend(0, [flashback])
    opr.rebuild_buffers(trainer, module, finished=0)
    entries = dm.memory.buffers[0].entries
    assert flashback in entries and len(entries) == 4 + 1  # 4 gold references + the flashback
