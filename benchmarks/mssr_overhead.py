"""MSSR's cost per optimizer step next to the training step it rides on (CPU, one thread).

    python benchmarks/mssr_overhead.py [--buffer 1024] [--repeats 200]

Measures, alternately in one run: (a) one training step of the quickstart tiny Llama on a global
batch of 32 (forward, backward, AdamW); (b) MSSR's per-step work: the reviews of the replayed
entries (Eq.4/5/13-14, ``MemoryStates.review``) plus, amortized over ``decision_interval`` steps, one
decision (lazy strengths of every buffer entry, Eq.10 weights); (c) the periodic re-scoring (a
forward pass over every buffer entry), amortized over ``rescore_interval`` steps. Prints a JSON
object last: ``train_step_ms``, ``mssr_ms_per_step``, ``mssr_over_step``, ``rescore_ms_per_step`` and
``mssr_with_rescore_over_step``. Not included: Lightning's hook dispatch and the weight broadcast.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--buffer", type=int, default=1024, help="entries over all buffers (paper: 1024)")
    parser.add_argument("--tasks", type=int, default=4, help="buffers the entries are split over")
    parser.add_argument("--replayed", type=int, default=2, help="replayed entries per step (batch 32 at ~5%)")
    parser.add_argument("--decision_interval", type=int, default=10)
    parser.add_argument("--rescore_interval", type=int, default=50, help="steps between re-scorings of the whole buffer")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from lightning_cit.callbacks.mssr import MemoryStates

    from lightning_cit.collate import Collator
    from lightning_cit.module import ContinualLM, per_sample_loss
    from lightning_cit.tasks import TaskSpec, load_task

    module = ContinualLM()
    module.configure_model()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    samples = load_task(TaskSpec(name="c", source="synth:cipher_a", train_size=32)).train
    batch = Collator(module.tokenizer, 256, ["c"])(samples)

    def train_step() -> None:
        logits = module(batch["input_ids"], batch["attention_mask"])
        losses, counts = per_sample_loss(logits, batch["labels"])
        ((losses * counts).sum() / counts.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()

    memory = MemoryStates()
    per_task = args.buffer // args.tasks
    for task in range(args.tasks):
        memory.add_task(task, per_task, step=0)
    generator = torch.Generator().manual_seed(0)
    step = [1]

    def mssr_step() -> None:
        t = step[0]
        positions = torch.randint(0, per_task, (args.replayed,), generator=generator)
        memory.review(t % args.tasks, positions, torch.rand(args.replayed, generator=generator) * 3, t)
        if t % args.decision_interval == 0:
            for task in range(args.tasks):
                logs = -memory.log_strength(task, t)
                torch.exp(logs - logs.max()).tolist()
        step[0] += 1

    buffer_samples = load_task(TaskSpec(name="b", source="synth:cipher_b", train_size=args.buffer)).train

    def rescore() -> None:  # the forward pass over every buffer entry, plus the memory update
        losses = torch.tensor(module.sample_losses(buffer_samples))
        for task in range(args.tasks):
            memory.rescore(task, losses[task * per_task : (task + 1) * per_task], step[0])

    start = time.perf_counter()
    for _ in range(3):
        rescore()
    rescore_ms = 1000 * (time.perf_counter() - start) / 3

    for fn in (train_step, mssr_step):  # warm-up
        for _ in range(5):
            fn()
    train_time = mssr_time = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        train_step()
        train_time += time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.decision_interval):  # the per-step average includes one decision
            mssr_step()
        mssr_time += (time.perf_counter() - start) / args.decision_interval
    train_ms = 1000 * train_time / args.repeats
    mssr_ms = 1000 * mssr_time / args.repeats
    result = {
        "buffer_entries": args.buffer,
        "train_step_ms": train_ms,
        "mssr_ms_per_step": mssr_ms,
        "mssr_over_step": mssr_ms / train_ms,
        "rescore_ms": rescore_ms,
        "rescore_ms_per_step": rescore_ms / args.rescore_interval,
        "mssr_with_rescore_over_step": (mssr_ms + rescore_ms / args.rescore_interval) / train_ms,
        "threads": 1,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
