"""Peak host memory while loading a QLoRA base, over the loaded model's size (CPU; issue 17 item 5).

    python benchmarks/load_memory.py                     # scaled-down Llama-3 layout, ~1 min on 2 cores
    python benchmarks/load_memory.py --layers 32 --hidden 4096 --ffn 14336 --vocab 128256   # Llama-3-8B (needs ~20 GB RAM)

Each case runs in a fresh process; ``peak`` is the growth of the process's peak RSS (``ru_maxrss``) from just
before loading, ``anon_peak`` the same for anonymous memory only (a memory-mapped checkpoint's page cache counts in
RSS but is reclaimable), ``final`` the loaded model's ``get_memory_footprint()`` (packed 4-bit storage + bf16 embeddings,
norms and head). Cases:

- ``random``: ``load_causal_lm("random:<config>", nf4)``: meta-device skeleton, seeded tensors generated one at a
  time in the load dtype and quantized as transformers loads them;
- ``checkpoint``: the same architecture saved as a bf16 safetensors checkpoint, loaded with ``load_causal_lm(dir, nf4)``
  (transformers reads it tensor by tensor and quantizes while loading);
- ``eager_random``: the former ``random:`` path for comparison: the whole model built in float32, then quantized
  from its state dict.

The last printed line is a JSON object; ``peak_over_final`` (anonymous memory) is the figure issue 17 asks for (goal ~1.2 on an 8B
model, where the largest transient tensor, the 1 GB bf16 embedding, is 1/6 of the final size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUANT = {"quant_type": "nf4", "compute_dtype": "bfloat16", "quant_storage": "bfloat16", "double_quant": True}


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class AnonPeak:
    """Peak anonymous resident memory (``RssAnon``: heap, not the page cache of a memory-mapped checkpoint), sampled
    every millisecond by a thread."""

    def __init__(self) -> None:
        import threading

        self.peak = self.read()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def read() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.read())

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return max(self.peak, self.read())


def _case(kind: str, config_json: str, checkpoint: str | None) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    import bitsandbytes  # noqa: F401 -- imports (and bitsandbytes' CPU library) before the baseline
    import transformers.models.llama.modeling_llama  # noqa: F401

    from lightning_cit.quant import load_causal_lm, quantization_spec, random_architecture

    spec = quantization_spec(QUANT)
    torch.set_num_threads(1)
    load_causal_lm("random:tiny-llama", spec)  # warms up every lazy import and kernel load
    anon_before = AnonPeak.read()
    anon = AnonPeak()
    before = _rss_peak_bytes()
    if kind == "random":
        model = load_causal_lm(f"random:{config_json}", spec)
    elif kind == "checkpoint":
        model = load_causal_lm(checkpoint, spec)
    else:  # eager_random: the former path
        from transformers import AutoModelForCausalLM

        config = random_architecture(f"random:{config_json}")
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
        full = model_class(config).to(torch.bfloat16)
        state = full.state_dict()
        del full
        from lightning_cit.quant import bnb_config

        model = model_class.from_pretrained(None, config=config, state_dict=state, quantization_config=bnb_config(spec), dtype=torch.bfloat16)
        del state
    peak = _rss_peak_bytes() - before
    anon_peak = anon.close() - anon_before
    final = model.get_memory_footprint()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return {"case": kind, "anon_peak_mib": round(anon_peak / 2**20, 1), "final_mib": round(final / 2**20, 1),
            "peak_over_final": round(anon_peak / final, 3), "rss_peak_mib": round(peak / 2**20, 1), "rss_peak_over_final": round(peak / final, 3),
            "largest_tensor_mib": round(largest / 2**20, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=3584)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--cases", default="random,checkpoint,eager_random")
    parser.add_argument("--out", default=None)
    parser.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._case:
        print(json.dumps(_case(args._case, args._config, args._checkpoint)))
        return {}
    work = Path(tempfile.mkdtemp(prefix="load_memory_"))
    arch = {"model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.ffn,
            "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
            "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False}
    config_json = work / "config.json"
    config_json.write_text(json.dumps(arch))
    checkpoint = work / "checkpoint"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if "checkpoint" in args.cases:
        code = ("import sys, torch; sys.path.insert(0, %r); from lightning_cit.quant import load_causal_lm; "
                "m = load_causal_lm('random:%s', None); m.to(torch.bfloat16).save_pretrained(%r)") % (str(REPO), config_json, str(checkpoint))
        subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    result = {"architecture": arch, "quantization": QUANT, "machine": f"{os.cpu_count()} CPUs", "cases": []}
    for case in args.cases.split(","):
        proc = subprocess.run([sys.executable, __file__, "--_case", case, "--_config", str(config_json), "--_checkpoint", str(checkpoint)],
                              env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            result["cases"].append({"case": case, "error": proc.stderr[-1500:]})
            continue
        result["cases"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
