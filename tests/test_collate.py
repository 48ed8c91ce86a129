import torch

from lightning_cit.collate import IGNORE_INDEX, Collator, encode, left_padded_prompts
from lightning_cit.module import per_sample_loss
from lightning_cit.synth import build_char_tokenizer

MSG = [{"role": "user", "content": "Repeat: abc"}]


def test_chat_template_prompt_is_masked_and_response_ends_with_eos():
    tok = build_char_tokenizer()
    prompt_ids, response_ids = encode(tok, MSG, "abc")
    assert tok.decode(prompt_ids) == "<|user|>Repeat: abc\n<|assistant|>"
    assert tok.decode(response_ids) == "abc</s>"
    batch = Collator(tok, 256, ["t"])([{"messages": MSG, "response": "abc", "sample_id": 7, "task_id": 0, "source_id": 0}])
    labels = batch["labels"][0]
    n_prompt = len(prompt_ids)
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert labels[n_prompt : n_prompt + len(response_ids)].tolist() == response_ids
    assert batch["sample_ids"].tolist() == [7] and batch["task_ids"].tolist() == [0]


def test_loss_ignores_prompt_and_padding_tokens():
    tok = build_char_tokenizer()
    collate = Collator(tok, 256, ["t"])
    short = {"messages": MSG, "response": "a"}
    long = {"messages": [{"role": "user", "content": "Repeat: abcdefghij"}], "response": "abcdefghij"}
    batch = collate([short, long])
    vocab = len(tok)
    logits = torch.randn(2, batch["input_ids"].size(1), vocab)
    losses, counts = per_sample_loss(logits, batch["labels"])
    # changing logits at prompt or padding positions must not change the loss
    perturbed = logits.clone()
    mask = batch["labels"][:, 1:] == IGNORE_INDEX
    perturbed[:, :-1][mask] += 100 * torch.randn_like(perturbed[:, :-1][mask])
    losses2, _ = per_sample_loss(perturbed, batch["labels"])
    assert torch.allclose(losses, losses2)
    assert counts.tolist() == [2, 11]  # "a</s>" and "abcdefghij</s>"


def test_truncation_is_counted_and_warned_once_per_task(recwarn):
    tok = build_char_tokenizer()
    collate = Collator(tok, 16, ["long_task"])
    sample = {"messages": [{"role": "user", "content": "x" * 40}], "response": "yyyy", "task_id": 0}
    batch = collate([sample, sample])
    assert batch["input_ids"].size(1) == 16
    assert collate.truncated[0] == 2
    assert sum("long_task" in str(w.message) for w in recwarn.list) == 1
    assert (batch["labels"][0] != IGNORE_INDEX).sum() == 5  # the whole response survives


def test_left_padding_for_generation():
    tok = build_char_tokenizer()
    out = left_padded_prompts(tok, [MSG, [{"role": "user", "content": "Repeat: abcdef"}]], tok.pad_token_id)
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][:, -1].all()
