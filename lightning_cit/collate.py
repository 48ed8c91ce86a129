"""Tokenization: chat template when the tokenizer has one, prompt tokens masked out of the loss.

``encode`` returns ``(prompt_ids, response_ids)``; the loss is computed on the response (plus EOS)
only. With a chat template the prompt is ``apply_chat_template(messages, add_generation_prompt=True)``
and the full text the template applied to ``messages + [assistant answer]``; the response ids are
what the full text adds after the prompt. Without a template the prompt is the turns' contents
joined by newlines, followed by a newline.

Truncation keeps the prompt's end and the response's start (a sample is cut to ``max_length``
tokens, prompt first); every truncated sample is counted per task and warned about once per task.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

IGNORE_INDEX = -100


def prompt_text(tokenizer: Any, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def encode(tokenizer: Any, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    prompt = prompt_text(tokenizer, messages)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt):
            response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
            return prompt_ids, response_ids
    eos = tokenizer.eos_token or ""
    return prompt_ids, tokenizer(response + eos, add_special_tokens=False)["input_ids"]


class Collator:
    """Turns a list of samples into a right-padded training batch with masked prompt tokens.

    Every batch carries ``sample_ids``, ``task_ids`` and ``source_ids`` (the task whose buffer or
    data the sample was drawn from; ``is_replay`` tells replay from current-task samples;
    ``prompt_only`` marks stored samples whose response is not a target).
    """

    def __init__(self, tokenizer: Any, max_length: int, task_names: list[str]) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.task_names = task_names
        self.truncated: Counter[int] = Counter()
        self._warned: set[int] = set()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, sample: dict) -> tuple[list[int], list[int]]:
        prompt_ids, response_ids = encode(self.tokenizer, sample["messages"], sample["response"])
        if len(prompt_ids) + len(response_ids) > self.max_length:
            task = int(sample.get("task_id", -1))
            self.truncated[task] += 1
            if task not in self._warned:
                self._warned.add(task)
                name = self.task_names[task] if 0 <= task < len(self.task_names) else "?"
                rank_zero_warn(
                    f"task {name!r}: samples longer than max_length={self.max_length} tokens are truncated "
                    "(counted in `truncated_samples`; warned once per task). Raise data.max_length to keep them whole."
                )
            keep_prompt = min(len(prompt_ids), max(1, self.max_length // 2), self.max_length - 1)
            keep_prompt = max(keep_prompt, self.max_length - len(response_ids))
            prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :] if keep_prompt else []
            response_ids = response_ids[: self.max_length - len(prompt_ids)]
        return prompt_ids, response_ids

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(s) for s in samples]
        length = max(len(p) + len(r) for p, r in encoded)
        input_ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, (prompt_ids, response_ids) in enumerate(encoded):
            ids = prompt_ids + response_ids
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, len(prompt_ids) : len(ids)] = torch.tensor(response_ids)
            attention_mask[row, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "sample_ids": torch.tensor([int(s.get("sample_id", -1)) for s in samples]),
            "task_ids": torch.tensor([int(s.get("task_id", -1)) for s in samples]),
            "source_ids": torch.tensor([int(s.get("source_id", -1)) for s in samples]),
            "is_replay": torch.tensor([bool(s.get("is_replay", False)) for s in samples]),
            # a stored sample whose response is not a training target (e.g. a JFA flashback: its
            # response is only the span a divergence is computed on); ContinualLM leaves it out of the NLL
            "prompt_only": torch.tensor([bool(s.get("prompt_only", False)) for s in samples]),
        }


EVAL_TRUNCATED: Counter[str] = Counter()
"""Evaluation prompts cut to ``max_length`` tokens in this process, by kind (``generate``); warned about once per kind."""
_eval_warned: set[str] = set()


def count_eval_truncation(kind: str, count: int, max_length: int) -> None:
    """Count ``count`` truncated evaluation inputs of ``kind``; warn the first time a kind is truncated."""
    if count <= 0:
        return
    EVAL_TRUNCATED[kind] += count
    if kind not in _eval_warned:
        _eval_warned.add(kind)
        rank_zero_warn(
            f"evaluation ({kind}): inputs longer than max_length={max_length} tokens are cut to their last {max_length} "
            "tokens (counted in lightning_cit.collate.EVAL_TRUNCATED; warned once). Raise data.max_length to keep them whole."
        )


def left_padded_prompts(tokenizer: Any, prompts: list[list[dict]], pad_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Prompts ready for batched generation: left padding so every row ends where generation starts.

    ``max_length`` (the data's limit) keeps each prompt's last ``max_length`` tokens, the end being where the
    question and the generation prompt are; truncations are counted and warned about once.
    """
    ids = [tokenizer(prompt_text(tokenizer, m), add_special_tokens=False)["input_ids"] for m in prompts]
    if max_length is not None:
        count_eval_truncation("generate", sum(len(x) > max_length for x in ids), max_length)
        ids = [x[len(x) - max_length :] if len(x) > max_length else x for x in ids]
    length = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, length - len(x) :] = torch.tensor(x)
        attention_mask[row, length - len(x) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def encode_options(tokenizer: Any, messages: list[dict], options: list[str], max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """One sample's prompt ids and each option's ids, for scoring all options against one shared prompt.

    The ids are what :func:`encode` gives (its prompt ids never depend on the response), so one-pass
    scores equal per-option scores. When the prompt plus the longest option exceeds ``max_length``, the prompt is cut
    once (from the left, by :class:`Collator`'s rule applied to the longest option) and every option is
    scored against that same cut prompt, options cut to fit; the third value says so.
    """
    encoded = [encode(tokenizer, messages, str(option)) for option in options]
    prompt_ids = encoded[0][0]
    answers = [r for _, r in encoded]
    longest = max(len(r) for r in answers)
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, answers, False
    keep_prompt = min(len(prompt_ids), max(1, max_length // 2), max_length - 1)
    keep_prompt = max(keep_prompt, max_length - longest)
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :] if keep_prompt else []
    return prompt_ids, [r[: max_length - len(prompt_ids)] for r in answers], True
