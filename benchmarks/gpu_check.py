"""Python steps of benchmarks/gpu_check.sh (see that script): fit configs, the CUDA smoke test, the summary
(the fits' per-step callback is in gpu_check_callbacks.py, so writing a config imports neither torch nor Lightning).

    python benchmarks/gpu_check.py mkcfg SRC NAME WORK RES MODEL ACCEL MODE
    python benchmarks/gpu_check.py smoke OUT DEVICE MODEL_JSON
    python benchmarks/gpu_check.py headline OUT DEVICE MODEL_JSON        # dry mode's stand-in for throughput.py --device cuda
    python benchmarks/gpu_check.py overhead OUT PAIRS WARMUP
    python benchmarks/gpu_check.py summarize RES OUT START BUDGET
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
QUANT = {"quant_type": "nf4", "compute_dtype": "bfloat16", "quant_storage": "bfloat16", "double_quant": True}


def _dump(obj: Any, path: str) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


# ----------------------------------------------------------------------------------------- configs
def mkcfg(src: str, name: str, work: str, res: str, model: str, accel: str, mode: str) -> None:
    """configs/gpu/*.yaml shrunk to 2 short tasks + an eval-only one: WORK/NAME.yaml and WORK/NAME_r.yaml (the resume)."""
    import yaml

    for suffix, stats in (("", f"{res}/{name}.json"), ("_r", f"{res}/{name}_resume.json")):
        config = yaml.safe_load(Path(src).read_text())
        _shrink(config, f"{work}/{name}", model, stats, accel, mode)
        Path(f"{work}/{name}{suffix}.yaml").write_text(yaml.safe_dump(config))


def _shrink(config: dict, root: str, model: str, stats: str, accel: str, mode: str) -> None:
    t = config["trainer"]
    t.update(default_root_dir=root, accelerator=accel, devices=1, enable_progress_bar=False, log_every_n_steps=1, accumulate_grad_batches=1)
    if mode == "single":
        t["strategy"] = "auto"
    if mode == "cpuddp":  # dry run: DDP on one CPU process (gloo)
        t["strategy"] = {"class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": {"process_group_backend": "gloo"}}
    if mode == "cpufsdp":  # dry run: the tests' CPU twin of FSDPStrategy
        t["strategy"]["class_path"] = "helpers_fsdp.CPUFSDPStrategy"
        t["strategy"]["init_args"]["process_group_backend"] = "gloo"
        t["strategy"]["init_args"]["precision_plugin"] = {"class_path": "helpers_fsdp.CPUFSDPPrecision", "init_args": {"precision": t.pop("precision")}}
    for callback in t["callbacks"]:
        if callback["class_path"].endswith("ForgettingEvaluator"):
            callback["init_args"].update(probe_every_n_steps=2, heatmap=False)
        if callback["class_path"].endswith("TaskCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 2
    t["callbacks"].append({"class_path": "gpu_check_callbacks.StepStats", "init_args": {"path": stats}})
    config["model"].update(model=model, eval_batch_size=8, warmup_steps=1, learning_rate=1e-3)
    small = accel == "cpu"
    config["data"].update(global_batch_size=2 if small else 4, steps_per_task=3, max_length=64 if small else 256, num_workers=0 if small else 2, tasks=[
        {"name": "cipher_a", "source": "synth:cipher_a", "train_size": 8, "eval_size": 2, "probe_size": 2, "max_new_tokens": 4},
        {"name": "compare", "source": "synth:compare", "metric": "mc_accuracy", "train_size": 8, "eval_size": 2, "probe_size": 2},
        {"name": "safety", "source": "synth:safety", "metric": "exact_match", "eval_size": 2, "probe_size": 2, "max_new_tokens": 8, "train": False}])


# ------------------------------------------------------------------------------------------- smoke
def smoke(out: str, device: str, model_json: str) -> None:
    """4-bit kernels, a QLoRA build at Llama-3-8B widths, 3 training steps (every LoRA tensor gets a gradient, an
    eval pass changes no later gradient, fused = chunked = HF loss), EMA's foreach path, generation."""
    import importlib.metadata as md

    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch
    from bitsandbytes import cextension
    from gpu_check_callbacks import CUDA, gib, sync
    from lightning_cit.callbacks.lcia.ema import DynamicEMA

    from lightning_cit.loss import per_sample_loss, per_sample_loss_from_hidden
    from lightning_cit.module import ContinualLM

    def version(package: str) -> str | None:
        try:
            return md.version(package)
        except md.PackageNotFoundError:
            return None

    res: dict[str, Any] = {"versions": {p: version(p) for p in ("torch", "lightning", "transformers", "peft", "bitsandbytes", "jsonargparse", "torchmetrics")}}
    res["versions"].update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name() if CUDA else None, bnb_lib=type(cextension.lib).__name__)
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16)

    def check(name: str, fn: Any) -> None:
        try:
            res[name] = {"ok": True, **fn()}
        except Exception as err:  # noqa: BLE001 -- recorded, the next check runs
            res[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:1500]}
        print(name, json.dumps(res[name], default=str)[:800], flush=True)
        _dump(res, out)

    def kernels() -> dict:  # 4-bit matmul (train and gemv paths) against the dequantized weight; packed bf16 bits survive copies
        w = (torch.randn(2048, 1024, device=device) * 0.02).bfloat16()
        q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
        d = F.dequantize_4bit(q, state)
        x = torch.randn(4, 64, 1024, device=device).bfloat16().requires_grad_()
        y = bnb.matmul_4bit(x, q.t(), state)
        g = torch.randn_like(y)
        y.backward(g)
        x1 = x[:1, :1].detach()
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
        r = {"dequant_err": rel(d, w), "matmul_err": rel(y.detach(), x.detach() @ d.t()), "grad_err": rel(x.grad, g @ d),
             "gemv_err": rel(bnb.matmul_4bit(x1, q.t(), state), x1 @ d.t()),
             "bits_kept": all(torch.equal(c.view(torch.int16), q.view(torch.int16)) for c in (q.clone(), torch.cat([q, q])[: len(q)], q.cpu().to(device)))}
        assert max(r["matmul_err"], r["grad_err"], r["gemv_err"]) < 2e-2 and r["bits_kept"], r
        return r

    check("kernels", kernels)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    m = ContinualLM(model=f"random:{model_json}", lora=LORA, quantization=QUANT, gradient_checkpointing=True).to(device)
    t0 = time.perf_counter()
    m.configure_model()  # includes the setup check that every LoRA tensor gets a gradient
    w4 = [x.weight for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    res["build"] = {"load_s": round(time.perf_counter() - t0, 2), "linear4bit": len(w4), "quant_state_ok": all(getattr(w, "quant_state", None) is not None for w in w4),
                    "packed": sorted({f"{w.dtype}@{w.device}" for w in w4}), "trainable": sum(p.numel() for _, p in trainable),
                    "mem_gib": gib(torch.cuda.memory_allocated()) if CUDA else None, "load_peak_gib": gib(torch.cuda.max_memory_allocated()) if CUDA else None}
    if CUDA:
        res["build"]["load_peak_over_final"] = round(torch.cuda.max_memory_allocated() / torch.cuda.memory_allocated(), 3)
    seq = 512 if CUDA else 64
    tokens = torch.randint(3, 90, (2, seq)).to(device)

    def train() -> dict:  # 3 AdamW steps through non-reentrant checkpointing: every LoRA tensor must get a gradient
        opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-3)
        r: dict[str, Any] = {"losses": [], "checkpointing": m.model.is_gradient_checkpointing}
        for i in range(3):
            sync()
            t1 = time.perf_counter()
            with autocast():
                loss = m.model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            sync()
            r[f"step{i}_s"] = round(time.perf_counter() - t1, 3)
            r["losses"].append(float(loss))
            r[f"no_or_zero_grad_{i}"] = [n for n, p in trainable if p.grad is None or (float(p.grad.abs().sum()) == 0 and (i > 0 or ".lora_B." in n))][:5]
            opt.step()
            opt.zero_grad(set_to_none=True)

        def grads() -> list[torch.Tensor]:
            m.model.train()
            m.model.zero_grad(set_to_none=True)
            with autocast():
                m.model(input_ids=tokens, labels=tokens).loss.backward()
            return [q.grad.detach().float().clone() for _, q in trainable]

        g0 = grads()
        m.model.eval()
        with torch.no_grad(), autocast():
            m.model(input_ids=tokens[:, :64])  # an eval pass must not change later training
        r["eval_pass_grad_rel_diff"] = max(float((a - b).norm() / (b.norm() + 1e-12)) for a, b in zip(grads(), g0))
        r["peak_gib"] = gib(torch.cuda.max_memory_allocated()) if CUDA else None
        assert all(map(math.isfinite, r["losses"])) and not r["no_or_zero_grad_0"] and not r["no_or_zero_grad_1"] and r["eval_pass_grad_rel_diff"] < 1e-2, r
        params = [q.detach() for _, q in trainable]
        averages = [q + 0.01 for q in params]
        gr = [q.grad.detach() for _, q in trainable]
        prev = [0.5 * q for q in gr]
        a, b = (DynamicEMA.norms(params, averages, gr, prev, vectorized=v) for v in (True, False))  # EMA's foreach path vs the loop
        r["ema_norms_rel_diff"] = float(((a - b).abs() / b.abs().clamp(min=1e-12)).max())
        assert r["ema_norms_rel_diff"] < 1e-3, r
        return r

    check("train", train)

    def losses() -> dict:  # lightning-cit's fused and chunked losses against Hugging Face's, in bf16 autocast
        m.model.train()
        labels = tokens.clone()
        labels[:, : seq // 4] = -100  # a prompt
        with torch.no_grad(), autocast():
            hf = float(m.model(input_ids=tokens, labels=labels).loss)
            logits = m.model(input_ids=tokens).logits
            l1, c1 = per_sample_loss(logits, labels, 128)
            hidden, head = m._hidden_states(tokens, torch.ones_like(tokens))
            l2, c2 = per_sample_loss_from_hidden(hidden, head, labels, 128)
        chunked, fused = float((l1 * c1).sum() / c1.sum()), float((l2 * c2).sum() / c2.sum())
        r = {"hf": hf, "chunked": chunked, "fused": fused}
        assert abs(chunked - hf) / hf < 1e-3 and abs(fused - hf) / hf < 2e-2, r  # fused: bf16 logits of row chunks
        return r

    check("losses", losses)

    def generate() -> dict:
        s = [{"messages": [{"role": "user", "content": "abc def"}], "response": "x", "options": ["yes", "no"], "answer_index": 0}]
        m.eval()
        with autocast():
            r = {"answers": m.generate_answers(s * 2, 6), "losses": m.sample_losses(s), "chosen": m.choose_options(s)}
        assert all(map(math.isfinite, r["losses"])), r
        return r

    check("generate", generate)
    res["ok"] = all(v.get("ok", True) for v in res.values() if isinstance(v, dict) and "ok" in v)
    _dump(res, out)
    sys.exit(0 if res["ok"] else 1)


def headline(out: str, device: str, model_json: str) -> None:
    """The dry mode's stand-in for ``throughput.py --device cuda``: the same function on a tiny model on CPU."""
    import throughput

    result = throughput.gpu_throughput(2, 1, 1, 64, True, QUANT, 16, loss="fused", model_name=f"random:{model_json}", device=device)
    _dump(result, out)


def overhead(out: str, pairs: str, warmup: str) -> None:
    """framework_over_plain on Llama-3-8B, one short repeat."""
    import tempfile

    import throughput
    import yaml

    quant = yaml.safe_load((REPO / "configs/gpu/llama3_8b_qlora.yaml").read_text())["model"]["quantization"]
    result = throughput.framework_over_plain("cuda", int(pairs), int(warmup), "random:llama3-8b", 2048, 1, quant, True, tempfile.mkdtemp())
    _dump(result, out)


# ----------------------------------------------------------------------------------------- summary
def summarize(res_dir: str, out: str, start: str, budget: str) -> None:
    import torch

    def load(name: str) -> dict:
        try:
            return json.loads(Path(res_dir, name).read_text())
        except Exception as err:  # noqa: BLE001 -- a missing step is part of the report
            return {"missing": repr(err)[:200]}

    smi = Path(res_dir, "smi.txt")
    report: dict[str, Any] = {"elapsed_s": int(time.time()) - int(start), "budget_s": int(budget), "nvidia_smi": smi.read_text().strip() if smi.exists() else None,
                              "steps": {f.name[5:-5]: load(f.name) for f in sorted(Path(res_dir).iterdir()) if f.name.startswith("step_")},
                              "smoke": load("smoke.json"), "throughput": load("throughput.json"), "overhead": load("overhead.json")}
    for name in ("fit_single", "fit_ddp", "fit_fsdp"):
        a, b = load(f"{name}.json"), load(f"{name}_resume.json")
        la, lb = ({r["step"]: r["loss"] for r in x.get("rows", [])} for x in (a, b))
        common = sorted(set(la) & set(lb))
        section: dict[str, Any] = {"run": a, "resume": b}
        if common:
            section["resume_max_rel_diff"] = max(abs(la[k] - lb[k]) / abs(la[k]) for k in common)
        if name != "fit_single":
            ref = {r["step"]: r["loss"] for r in load("fit_single.json").get("rows", [])}
            both = sorted(set(ref) & set(la))
            if both:
                section["vs_single_max_rel_diff"] = max(abs(la[k] - ref[k]) / abs(ref[k]) for k in both)
        ck = Path(res_dir).parent / name / "checkpoints"
        section["checkpoints_mib"] = {f.name: round(f.stat().st_size / 2**20, 2) for f in sorted(ck.iterdir())} if ck.is_dir() else None
        if (ck / "last.ckpt").exists():
            c = torch.load(ck / "last.ckpt", map_location="cpu", weights_only=True)
            section["last_ckpt"] = {"keys": len(c["state_dict"]), "all_lora": all(".lora_" in k for k in c["state_dict"]), "adapter_only": c.get("adapter_only")}
        report[name] = section
    tp, ov = report["throughput"], report["overhead"]

    def goal(value: Any, ok: Any, text: str) -> dict:
        return {"goal": text, "value": value, "met": None if value is None else bool(ok(value))}

    report["goals"] = {"tokens_per_s": goal(tp.get("tokens_per_s"), lambda v: v >= 9000, ">= 9000"),
                       "peak_mem_gib": goal(tp.get("peak_mem_gib"), lambda v: v <= 10, "<= 10 (micro-batch 1, checkpointing)"),
                       "mfu": goal(tp.get("mfu"), lambda v: v >= 0.30, "~0.30"),
                       "framework_over_plain": goal(ov.get("median_ratio"), lambda v: v <= 1.02, "<= 1.02"),
                       "load_peak_over_final": goal(tp.get("load_peak_over_final"), lambda v: v <= 1.2, "~1.2 (8B QLoRA load)")}
    _dump(report, out)
    print(json.dumps({"goals": report["goals"], "steps_ok": {k: v.get("ok") for k, v in report["steps"].items()}}, indent=1))


if __name__ == "__main__":
    {"mkcfg": mkcfg, "smoke": smoke, "headline": headline, "overhead": overhead, "summarize": summarize}[sys.argv[1]](*sys.argv[2:])
