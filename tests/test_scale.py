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
