"""Cost of one EMA update per optimizer step: ``torch._foreach_*`` (what AdapterEMA/DynamicEMA run) vs a per-tensor loop.

    python benchmarks/ema_overhead.py            # LoRA r=16 on q,k,v,o,gate,up,down of Llama-3-8B shapes, 1 thread

The tensors are the LoRA A/B matrices of every adapted projection (Llama-3-8B: 32 layers x 7
projections x 2 = 448 tensors, 42M parameters); no model is built, only the update arithmetic runs:
``AdapterEMA`` (one lerp per tensor) and ``DynamicEMA`` (three L1 norms per tensor, the weight rule,
the lerp), each with ``torch._foreach_*`` multi-tensor kernels and with a per-tensor loop (both paths of
``DynamicEMA.norms``). The variants run alternately in one process; the last line is a JSON object
with the median milliseconds per update and the loop / foreach ratios (> 1: foreach is faster).
DynamicEMA picks the foreach path on CUDA and the loop on CPU, where it measured faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_cit.callbacks.lcia.ema import DynamicEMA

# (in_features, out_features) of Llama-3-8B's projections
LLAMA3_8B = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
             "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096)}


def lora_tensors(layers: int, rank: int, shapes: dict[str, tuple[int, int]]) -> list[torch.Tensor]:
    out = []
    for _ in range(layers):
        for fan_in, fan_out in shapes.values():
            out += [torch.randn(rank, fan_in) * 0.01, torch.randn(fan_out, rank) * 0.01]
    return out


def loop_dynamic(rule: DynamicEMA, params, averages, grads, prev_grads) -> None:
    a, b, c = rule.norms(params, averages, grads, prev_grads, vectorized=False)
    for avg, p, w in zip(averages, params, rule.dynamic_weight(a, b, c).unbind()):
        avg.lerp_(p, w)


def foreach_dynamic(rule: DynamicEMA, params, averages, grads, prev_grads) -> None:
    a, b, c = rule.norms(params, averages, grads, prev_grads, vectorized=True)
    torch._foreach_lerp_(averages, params, list(rule.dynamic_weight(a, b, c).unbind()))


def loop_fixed(params, averages, weight: float) -> None:
    for p, avg in zip(params, averages):
        avg.lerp_(p, weight)


def foreach_fixed(params, averages, weight: float) -> None:
    torch._foreach_lerp_(averages, params, weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = lora_tensors(args.layers, args.rank, LLAMA3_8B)
    averages = [p + 0.001 for p in params]
    grads = [torch.randn_like(p) for p in params]
    prev_grads = [torch.randn_like(p) for p in params]
    rule = DynamicEMA(scale=2.0)
    variants = {
        "fixed_loop": lambda: loop_fixed(params, averages, 0.01),
        "fixed_foreach": lambda: foreach_fixed(params, averages, 0.01),
        "dynamic_loop": lambda: loop_dynamic(rule, params, averages, grads, prev_grads),
        "dynamic_foreach": lambda: foreach_dynamic(rule, params, averages, grads, prev_grads),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # alternate so drift on a shared machine hits every variant alike
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    result = {k + "_ms": round(statistics.median(v[2:]), 3) for k, v in times.items()}
    result.update(
        tensors=len(params), parameters=sum(p.numel() for p in params), threads=args.threads,
        fixed_loop_over_foreach=round(result["fixed_loop_ms"] / result["fixed_foreach_ms"], 2),
        dynamic_loop_over_foreach=round(result["dynamic_loop_ms"] / result["dynamic_foreach_ms"], 2),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
