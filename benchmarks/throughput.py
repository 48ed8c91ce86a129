"""Training throughput, MFU, peak memory, and the cost of lightning-cit's machinery over a plain loop.

    python benchmarks/throughput.py --device cpu            # tiny random Llama, 1 thread (~3 min on 2 cores)
    python benchmarks/throughput.py --device cuda           # Llama-3-8B architecture, QLoRA, seq 2048 (needs a GPU)

Ratios are measured by **alternating steps in one process** (performance.md §7.1): two participants
run in two threads that hand a baton to each other after every optimizer step, so exactly one of
them computes at a time and both see the same machine state. Each step's time runs from taking the
baton to handing it back. A participant is either

- ``framework``: a real ``lightning-cit fit`` (the CLI's classes from a config: mixture sampler,
  ``FixedRatio`` controller, ``ForgettingEvaluator`` loss probes every 10 steps, ``AdapterEMA``, logging),
  timed from one ``on_train_batch_end`` to the next (data loading, the step, every callback hook);
- ``plain``: PyTorch + PEFT with no Lightning: ``model(input_ids, attention_mask, labels).loss``,
  backward, gradient clipping, AdamW, on an identically built model (same LoRA, quantization,
  precision), training on **the very batch** the framework participant just trained on;
- ``off``: the same fit as ``framework`` with the ``NoReplay`` controller (no replay mixing).

Steps of the second task after ``--warmup`` are paired in order (task 2 has replay buffers, so the
controller and the sampler mix sources); the keys are medians over ``--repeats`` of the per-repeat
median of paired ratios, with the ratio of summed times next to them (it includes the probe steps
the median discounts). ``framework_over_plain`` = framework / plain, ``controller_on_over_off`` =
FixedRatio(0.25) fit / NoReplay fit.

On CUDA the plain loop and the framework use lightning-cit's fused chunked loss (``--loss``; ``hf`` for Hugging
Face's), and the plain participant also gives the headline numbers: ``tokens_per_s`` (real tokens of full
2048-token rows, no padding, per second, after ``--warmup`` steps), ``mfu`` from the LoRA FLOP count
``4N + 6N_lora + 12·L·d·S`` (performance.md §3; no recompute counted) over the card's dense bf16
peak, ``hfu`` with the checkpointing recompute, and ``peak_mem_gib`` (max allocated after the model
is loaded). The last printed line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `callable:throughput:...` task sources
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# dense bf16 tensor-core peaks, FLOP/s (performance.md §3.1; Lightning's table has H200's sparse figure)
PEAK_BF16 = {"h100 sxm": 989.4e12, "h100 nvl": 835e12, "h100 pcie": 756e12, "h200": 989.4e12, "a100": 312e12}
# the CPU benchmark's model: performance.md §7.1 "tiny" (hidden 256, 4 layers, vocab 4096)
TINY = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": False}


# ------------------------------------------------------------------------------------ FLOP count
def lora_flops_per_token(config: Any, seq_len: int, rank: int, targets: tuple[str, ...] = LORA_TARGETS, mode: str = "lora",
                         activation_checkpointing: bool = False, causal: bool = False) -> float:
    """Model FLOPs per token of a Llama-style decoder (performance.md §3.2, Appendix A).

    N counts the parameters that take part in matmuls (every linear layer and the head, not the
    embedding lookup); ``lora``: ``4N + 6N_lora`` (the frozen base needs dX but no dW) plus attention
    ``12·L·d·S`` (PaLM/torchtitan convention, halved with ``causal``); ``full``: ``6N``;
    ``fwd``: ``2N + 2N_lora`` + ``4·L·d·S``. ``activation_checkpointing`` adds the recomputed forward
    of the layers (hardware FLOPs, for HFU; MFU never counts it).
    """
    layers, d, ffn, vocab = config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    shapes = {"q_proj": (d, d), "k_proj": (d, kv_dim), "v_proj": (d, kv_dim), "o_proj": (d, d),
              "gate_proj": (d, ffn), "up_proj": (d, ffn), "down_proj": (ffn, d)}
    n_layers = layers * sum(i * o for i, o in shapes.values())
    n = n_layers + d * vocab
    n_lora = layers * rank * sum(i + o for name, (i, o) in shapes.items() if name in targets)
    attention_fwd = 4 * layers * d * seq_len * (0.5 if causal else 1.0)
    flops = {"full": 6 * n + 3 * attention_fwd, "lora": 4 * n + 6 * n_lora + 3 * attention_fwd, "fwd": 2 * n + 2 * n_lora + attention_fwd}[mode]
    if activation_checkpointing and mode != "fwd":
        flops += 2 * n_layers + 2 * n_lora + attention_fwd
    return float(flops)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by name ("NVIDIA H100 80GB HBM3" is the SXM part), None when unknown."""
    name = device_name.lower()
    if "h100" in name:
        return PEAK_BF16["h100 nvl" if "nvl" in name else "h100 pcie" if "pcie" in name else "h100 sxm"]
    for key in ("h200", "a100"):
        if key in name:
            return PEAK_BF16[key]
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    return tokens_per_s * flops_per_token / peak


# ------------------------------------------------------------------------------ task sources
def _long_samples(n: int, seed: int, chars: int) -> list[dict]:
    rng = random.Random(seed)
    letters = string.ascii_lowercase + "     "
    half = chars // 2
    return [{"prompt": "".join(rng.choice(letters) for _ in range(half)), "response": "".join(rng.choice(letters) for _ in range(half))}
            for _ in range(n)]


def cpu_task(split: str, n: int, seed: int) -> list[dict]:
    """~128-token chat samples (character tokenizer) for the CPU runs."""
    return _long_samples(n, seed + (split == "eval"), 120)


def gpu_task(split: str, n: int, seed: int) -> list[dict]:
    """Samples longer than 2048 tokens, truncated to full 2048-token rows (no padding)."""
    return _long_samples(n, seed + (split == "eval"), 2100)


# ----------------------------------------------------------------------------------- alternation
class Baton:
    """Lets named participants (threads) take turns, one optimizer step each, in a fixed order."""

    def __init__(self, names: list[str]) -> None:
        self.order = list(names)
        self.turn = 0
        self.done: set[str] = set()
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.order[self.turn] == name)

    def pass_on(self, name: str) -> None:
        with self.cond:
            self._advance()

    def finish(self, name: str) -> None:
        with self.cond:
            self.done.add(name)
            if self.order[self.turn] == name:
                self._advance()

    def _advance(self) -> None:
        for _ in range(len(self.order)):
            self.turn = (self.turn + 1) % len(self.order)
            if self.order[self.turn] not in self.done:
                break
        self.cond.notify_all()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _make_baton_callback(baton: Baton, name: str, device: str, warmup: int, record: list, batches: list | None):
    import lightning.pytorch as pl

    class BatonCallback(pl.Callback):
        """Times each step from taking the baton to this hook (runs after every other callback's hook)."""

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            baton.wait(name)
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
            _sync(device)
            elapsed = time.perf_counter() - self.started
            if trainer.current_epoch == 1 and batch_idx >= warmup:
                record.append((elapsed, int(batch["attention_mask"].sum())))
                if batches is not None:  # the plain participant trains on this same batch
                    batches.append({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
            baton.pass_on(name)
            baton.wait(name)
            self.started = time.perf_counter()

    return BatonCallback()


def _config(device: str, controller: dict, steps_per_task: int, model: str, max_length: int, batch: int, quant: dict | None,
            checkpointing: bool, root: str) -> dict:
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    task = "callable:throughput:" + ("gpu_task" if device == "cuda" else "cpu_task")
    return {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": root, "accelerator": device, "devices": 1, "precision": precision, "gradient_clip_val": 1.0,
            "log_every_n_steps": 25, "enable_progress_bar": False, "enable_checkpointing": False,
            "callbacks": [
                controller,
                {"class_path": "lightning_cit.callbacks.AdapterEMA", "init_args": {"decay": 0.99}},
                {"class_path": "lightning_cit.callbacks.ForgettingEvaluator",
                 "init_args": {"probe_every_n_steps": 10, "heatmap": False, "print_table": False}},
            ],
        },
        "model": {"model": model, "lora": {"r": 16 if device == "cuda" else 8, "lora_alpha": 32, "lora_dropout": 0.0,
                                           "target_modules": list(LORA_TARGETS)},
                  "quantization": quant, "gradient_checkpointing": checkpointing, "learning_rate": 1e-4, "warmup_steps": 2,
                  **({"fused_loss": True} if device == "cuda" else {}),
                  "lr_schedule": "constant", "eval_batch_size": 4},
        "data": {"global_batch_size": batch, "steps_per_task": steps_per_task, "buffer_size": 16, "max_length": max_length, "seed": 0,
                 "tasks": [{"name": f"t{k}", "source": task, "metric": "edit_similarity", "train_size": 64, "eval_size": 2,
                            "probe_size": 2, "max_new_tokens": 2} for k in range(2)]},
    }


def _fit_participant(config: dict, baton: Baton, name: str, device: str, warmup: int, record: list, batches: list | None) -> Callable[[], None]:
    import yaml

    from lightning_cit.cli import CITCLI

    path = Path(config["trainer"]["default_root_dir"]) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    cli = CITCLI(args=["--config", str(path)], run=False)
    cli.trainer.callbacks.append(_make_baton_callback(baton, name, device, warmup, record, batches))
    cli.datamodule.load_tasks()

    def run() -> None:
        try:
            cli.trainer.fit(cli.model, cli.datamodule)
        finally:
            baton.finish(name)

    return run


LOSSES = ("fused", "chunked", "hf")


def training_loss(module: Any, model: Any, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The token-mean loss of a batch: ``fused`` (lightning-cit's ``fused_loss``: head applied chunk by chunk to the
    hidden states), ``chunked`` (lightning-cit's loss from full bf16 logits) or ``hf`` (Hugging Face's own loss)."""
    from lightning_cit.loss import per_sample_loss, per_sample_loss_from_hidden

    if kind == "hf":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    if kind == "fused":
        hidden, head = module._hidden_states(batch["input_ids"], batch["attention_mask"])
        losses, counts = per_sample_loss_from_hidden(hidden, head, batch["labels"], module.loss_chunk_tokens)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, counts = per_sample_loss(logits, batch["labels"], module.loss_chunk_tokens)
    return (losses * counts).sum() / counts.sum().clamp(min=1)


def _plain_participant(config: dict, baton: Baton, name: str, device: str, record: list, batches: list, feeder_done: Callable[[], bool]):
    """PyTorch + PEFT, no Lightning: the same model built the same way, trained on the framework's batches."""
    from lightning_cit.module import ContinualLM

    spec = config["model"]
    module = ContinualLM(**{k: spec[k] for k in ("model", "lora", "quantization", "gradient_checkpointing", "fused_loss") if k in spec})
    module.to(device)  # configure_model loads (and quantizes) onto the module's device
    module.configure_model()
    model = module.model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["learning_rate"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def run() -> None:
        try:
            used = 0
            while True:
                baton.wait(name)
                if used >= len(batches):
                    if feeder_done():
                        return
                    baton.pass_on(name)
                    continue
                batch = {k: v.to(device) for k, v in batches[used].items()}
                used += 1
                start = time.perf_counter()
                with autocast:  # the framework's own loss on CUDA (fused_loss), Hugging Face's on the CPU benchmark
                    loss = training_loss(module, model, batch, "fused" if spec.get("fused_loss") else "hf")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                _sync(device)
                record.append((time.perf_counter() - start, int(batch["attention_mask"].sum())))
                baton.pass_on(name)
        finally:
            baton.finish(name)

    return run


def _run_threads(runs: list[Callable[[], None]]) -> None:
    errors: list[Exception] = []

    def guard(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 -- re-raised in the main thread once both threads ended
            errors.append(err)

    threads = [threading.Thread(target=guard, args=(fn,)) for fn in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _paired(a: list, b: list) -> dict[str, float]:
    n = min(len(a), len(b))
    if n == 0:
        raise RuntimeError("no paired steps were measured")
    ratios = [a[i][0] / b[i][0] for i in range(n)]
    return {"median_ratio": statistics.median(ratios), "total_ratio": sum(x[0] for x in a[:n]) / sum(x[0] for x in b[:n]),
            "pairs": n, "a_ms": 1e3 * statistics.median(x[0] for x in a[:n]), "b_ms": 1e3 * statistics.median(x[0] for x in b[:n]),
            "a_tokens": statistics.mean(x[1] for x in a[:n]), "b_tokens": statistics.mean(x[1] for x in b[:n])}


FIXED = {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.25}}
NO_REPLAY = {"class_path": "lightning_cit.callbacks.NoReplay"}


def framework_over_plain(device: str, pairs: int, warmup: int, model: str, max_length: int, batch: int, quant: dict | None,
                         checkpointing: bool, root: str) -> dict[str, float]:
    config = _config(device, FIXED, warmup + pairs, model, max_length, batch, quant, checkpointing, f"{root}/framework")
    baton = Baton(["framework", "plain"])
    framework, plain, batches = [], [], []
    fit = _fit_participant(config, baton, "framework", device, warmup, framework, batches)
    loop = _plain_participant(config, baton, "plain", device, plain, batches, lambda: "framework" in baton.done)
    _run_threads([fit, loop])
    return _paired(framework, plain)


def controller_on_over_off(device: str, pairs: int, warmup: int, model: str, max_length: int, batch: int, quant: dict | None,
                           checkpointing: bool, root: str) -> dict[str, float]:
    baton = Baton(["on", "off"])
    on, off = [], []
    runs = [_fit_participant(_config(device, controller, warmup + pairs, model, max_length, batch, quant, checkpointing, f"{root}/{name}"),
                             baton, name, device, warmup, record, None)
            for name, controller, record in (("on", FIXED, on), ("off", NO_REPLAY, off))]
    _run_threads(runs)
    return _paired(on, off)


def _summarize(results: list[dict[str, float]], key: str) -> dict[str, Any]:
    return {key: statistics.median(r["median_ratio"] for r in results),
            f"{key}_total": statistics.median(r["total_ratio"] for r in results),
            f"{key}_per_repeat": [round(r["median_ratio"], 4) for r in results],
            f"{key}_ms": [[round(r["a_ms"], 2), round(r["b_ms"], 2)] for r in results],
            f"{key}_tokens_per_step": [round(results[0]["a_tokens"], 1), round(results[0]["b_tokens"], 1)]}


# ------------------------------------------------------------------------------------ GPU headline
def gpu_throughput(steps: int, warmup: int, micro_batch: int, seq_len: int, checkpointing: bool, quant: dict, rank: int,
                   loss: str = "fused", model_name: str = "random:llama3-8b", device: str = "cuda") -> dict[str, Any]:
    """tokens/s, MFU, HFU and peak memory of QLoRA on the Llama-3-8B architecture (random weights), plain loop with
    lightning-cit's loss (``loss``, see :func:`training_loss`). ``device="cpu"`` runs the same loop on a small
    ``model_name`` (benchmarks/gpu_check.sh's dry mode; no memory figures there)."""
    from lightning_cit.module import ContinualLM
    from lightning_cit.quant import random_architecture

    cuda = device == "cuda"
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    module = ContinualLM(model=model_name, lora={"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(LORA_TARGETS)},
                         quantization=quant, gradient_checkpointing=checkpointing, fused_loss=loss == "fused")
    module.to(device)  # configure_model quantizes straight onto the GPU
    module.configure_model()
    model = module.model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    _sync(device)
    load_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    load_final = torch.cuda.memory_allocated() / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = random_architecture(model_name)
    generator = torch.Generator(device=device).manual_seed(0)
    times = []
    for step in range(warmup + steps):
        tokens = torch.randint(0, config.vocab_size, (micro_batch, seq_len), device=device, generator=generator)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            value = training_loss(module, model, {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}, loss)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    tokens_per_s = micro_batch * seq_len * len(times) / sum(times)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_flops(name)
    model_flops = lora_flops_per_token(config, seq_len, rank)
    hardware_flops = lora_flops_per_token(config, seq_len, rank, activation_checkpointing=checkpointing)
    return {"device": name, "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, model_flops, peak) if peak else None,
            "hfu": mfu(tokens_per_s, hardware_flops, peak) if peak else None, "peak_tflops_used": peak / 1e12 if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "load_peak_mem_gib": load_mem, "loaded_mem_gib": load_final,
            "load_peak_over_final": load_mem / load_final if cuda and load_final else None,
            "flops_per_token": model_flops, "micro_batch": micro_batch, "seq_len": seq_len, "model": model_name,
            "steps": steps, "warmup": warmup, "activation_checkpointing": checkpointing, "lora_rank": rank, "loss_kind": loss,
            "checkpointing_mode": "non_reentrant" if checkpointing else None, "loss": float(value)}


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--pairs", type=int, default=None, help="measured steps per participant and repeat (cpu 60, cuda 50)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps at the start of task 2 (cpu 5, cuda 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the only stable setting on small VMs)")
    parser.add_argument("--micro-batch", type=int, default=1, help="cuda: sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="cuda: tokens per sequence")
    parser.add_argument("--no-checkpointing", action="store_true", help="cuda: activation checkpointing off")
    parser.add_argument("--skip-overhead", action="store_true", help="cuda: only the headline tokens/s, MFU and memory")
    parser.add_argument("--loss", choices=LOSSES, default="fused", help="cuda headline: the loss of the plain loop (default: lightning-cit's fused loss)")
    parser.add_argument("--model", default="random:llama3-8b", help="cuda headline: random:<preset or config.json> (default: random:llama3-8b)")
    parser.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="throughput_")
    result: dict[str, Any] = {"device": args.device, "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}

    if args.device == "cpu":
        pairs, warmup = args.pairs or 60, 5 if args.warmup is None else args.warmup
        model_json = Path(root) / "tiny_llama.json"
        model_json.write_text(json.dumps(TINY))
        common = {"device": "cpu", "pairs": pairs, "warmup": warmup, "model": f"random:{model_json}", "max_length": 128, "batch": 4,
                  "quant": None, "checkpointing": False}
        result.update(model="tiny Llama (hidden 256, 4 layers, vocab 4096), LoRA r=8 all-linear, fp32, batch 4 x 128 tokens", pairs=pairs)
        over_plain = [framework_over_plain(root=f"{root}/fop{r}", **common) for r in range(args.repeats)]
        on_off = [controller_on_over_off(root=f"{root}/onoff{r}", **common) for r in range(args.repeats)]
        result.update(_summarize(over_plain, "framework_over_plain"))
        result.update(_summarize(on_off, "controller_on_over_off"))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda needs a CUDA GPU")
        import yaml

        quant = yaml.safe_load((REPO / "configs" / "gpu" / "llama3_8b_qlora.yaml").read_text())["model"]["quantization"]
        checkpointing = not args.no_checkpointing
        pairs, warmup = args.pairs or 50, 10 if args.warmup is None else args.warmup
        result.update(gpu_throughput(pairs, warmup, args.micro_batch, args.seq_len, checkpointing, quant, rank=16, loss=args.loss, model_name=args.model))
        if not args.skip_overhead:
            common = {"device": "cuda", "pairs": pairs, "warmup": warmup, "model": "random:llama3-8b", "max_length": args.seq_len,
                      "batch": args.micro_batch, "quant": quant, "checkpointing": checkpointing}
            result.update(_summarize([framework_over_plain(root=f"{root}/fop{r}", **common) for r in range(args.repeats)], "framework_over_plain"))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
