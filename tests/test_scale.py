"""Scale (issue 18): one-pass multiple choice, affordable evaluation and checkpoints, tasks as memory-mapped data."""

from __future__ import annotations

import pytest
import torch

from lightning_cit.module import ContinualLM, TinyLlama


@pytest.fixture(scope="module")
def tiny_module():
    torch.manual_seed(0)
    module = ContinualLM(tiny=TinyLlama(hidden_size=64, intermediate_size=128), eval_batch_size=5)
    module.configure_model()
    module.eval()
    return module


MC_SAMPLES = [
    {"messages": [{"role": "user", "content": "Pick the colour of the sky."}], "options": ["blue", "a much longer green answer", "red", "x"], "answer_index": 0},
    {"messages": [{"role": "user", "content": "2+2?"}], "options": ["4", "five"], "answer_index": 0},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A longer prompt: which word rhymes with cat?"}],
     "options": ["hat", "dog", "tree"], "answer_index": 0},
]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_one_pass_option_scores_equal_per_option_scores(tiny_module, padding_side):
    tiny_module.tokenizer.padding_side = padding_side
    one_pass = tiny_module.option_log_likelihoods(MC_SAMPLES * 3)  # 9 samples, chunks of 5 // 4 = 1 sample: and of several
    reference = tiny_module._option_log_likelihoods_per_option(MC_SAMPLES * 3)
    assert [len(s) for s in one_pass] == [len(s["options"]) for s in MC_SAMPLES * 3]
    for got, want in zip(one_pass, reference):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-3)
    tiny_module.eval_batch_size = 64  # all 9 samples in one chunk: other paddings, same scores
    try:
        for got, want in zip(tiny_module.option_log_likelihoods(MC_SAMPLES * 3), reference):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-3)
    finally:
        tiny_module.eval_batch_size = 5
    assert tiny_module.choose_options(MC_SAMPLES) == [max(range(len(r)), key=r.__getitem__) for r in reference[:3]]


def test_one_pass_reads_each_prompt_once(tiny_module):
    """Two forwards per chunk: the prompts (one row per sample), then all options against their cache."""
    seen: list[tuple[int, int]] = []
    hook = tiny_module.model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        tiny_module.eval_batch_size = 64
        tiny_module.option_log_likelihoods(MC_SAMPLES)
    finally:
        hook.remove()
        tiny_module.eval_batch_size = 5
    assert len(seen) == 2
    assert seen[0][0] == len(MC_SAMPLES)  # one row per prompt, not per option
    assert seen[1][0] == sum(len(s["options"]) for s in MC_SAMPLES)
    from lightning_cit.collate import encode

    longest = max(len(encode(tiny_module.tokenizer, s["messages"], o)[1]) for s in MC_SAMPLES for o in s["options"])
    assert seen[1][1] == longest  # option tokens only: the prompt is not read again


def test_long_prompts_are_cut_once_for_all_options(tiny_module):
    tiny_module.max_eval_length = 40
    try:
        sample = {"messages": [{"role": "user", "content": "z" * 200}], "options": ["short", "a rather long option"], "answer_index": 0}
        scores = tiny_module.option_log_likelihoods([sample])
    finally:
        tiny_module.max_eval_length = 1024
    assert len(scores[0]) == 2 and all(torch.isfinite(torch.tensor(scores[0])))


# ------------------------------------------------------------------------------------------ evaluation a user can afford
def test_row_plan_scores_what_the_metrics_need():
    from lightning_cit.callbacks.evaluation.evaluator import row_plan

    assert row_plan(0, 5) == ("scores", 5)  # the base row: FWT's reference for every task
    assert row_plan(0, 5, base_row="loss") == ("loss", 5)
    assert [row_plan(r, 5) for r in range(1, 6)] == [("scores", 2), ("scores", 3), ("scores", 4), ("scores", 5), ("scores", 5)]
    assert [row_plan(r, 5, score="all") for r in range(1, 6)] == [("scores", 5)] * 5
    # every 2 tasks, and always after the last one; loss-only rows (or none) in between
    assert [row_plan(r, 5, every_n_tasks=2)[0] for r in range(1, 6)] == ["loss", "scores", "loss", "scores", "scores"]
    assert [row_plan(r, 5, every_n_tasks=2, between="skip")[0] for r in range(1, 6)] == ["skip", "scores", "skip", "scores", "scores"]


def test_bad_evaluator_options_are_refused():
    from lightning_cit.callbacks.evaluation.evaluator import ForgettingEvaluator
    from lightning_cit.errors import ConfigError

    for kwargs in ({"score": "some"}, {"every_n_tasks": 0}, {"between": "none"}, {"base_row": "off"}):
        with pytest.raises(ConfigError, match="ForgettingEvaluator"):
            ForgettingEvaluator(**kwargs)


def test_summary_of_a_partly_scored_matrix_uses_the_scored_terms():
    from lightning_cit.metrics import summarize, summary_coverage

    full = [[0, 1, 2], [50, 10, 3], [40, 60, 20], [30, 55, 70]]
    partial = [[0, 1, 2], [50, 10, None], [None, None, None], [30, 55, 70]]  # after task 1: seen + next; task 2's row skipped
    s_full, s_part = summarize(full), summarize(partial)
    assert s_part["acc"] == s_full["acc"]  # the final row is always full
    assert s_part["nta"] == pytest.approx((50 + 70) / 2)  # diagonal cells that were scored
    assert s_part["fwt"] == pytest.approx(10 - 1)  # R[1][1] - R[0][1]; R[2][2] unscored
    assert summary_coverage(partial)["fwt"] == [1, 2] and summary_coverage(full)["fwt"] == [2, 2]
    assert s_part["bwt_gem"] == pytest.approx(30 - 50)


def test_fit_with_an_evaluation_interval_writes_nulls_for_unscored_cells(tmp_path):
    import json

    import yaml
    from test_e2e import run, small_config

    config = yaml.safe_load(small_config(tmp_path).read_text())
    config["trainer"]["callbacks"][1]["init_args"].update({"score": "needed", "every_n_tasks": 2})
    config["trainer"]["callbacks"][2]["init_args"]["every_n_train_steps"] = None
    config["data"]["steps_per_task"] = 2
    tasks = config["data"]["tasks"]
    config["data"]["tasks"] = [tasks[1], {**tasks[1], "name": "cipher_b", "source": "synth:cipher_b"}, tasks[2], {**tasks[1], "name": "shift", "source": "synth:shift"}]
    path = tmp_path / "interval.yaml"
    path.write_text(yaml.safe_dump(config))
    scores = run(path, tmp_path / "run")
    assert scores["rows"] == ["base", "cipher_a", "cipher_b", "compare", "shift"]
    assert scores["row_kinds"] == ["scores", "loss", "scores", "loss", "scores"]
    m, losses = scores["matrix"], scores["loss_matrix"]
    assert all(v is not None for v in m[0])  # base row: every task
    assert m[1] == [None] * 4 and losses[1][:2] != [None, None] and losses[1][2:] == [None, None]  # loss-only: seen + next
    assert all(v is not None for v in m[2][:3]) and m[2][3] is None  # full row: seen + next only
    assert all(v is not None for v in m[4])
    assert scores["complete"] and scores["summary_coverage"]["fwt"] == [1, 3]
    assert json.loads((next((tmp_path / "run").rglob("scores.json"))).read_text())["matrix"][1] == [None] * 4  # null in the file
