"""benchmarks/throughput.py: the LoRA FLOP formula behind MFU, the GPU peak table, and the step alternation."""

from __future__ import annotations

import importlib.util
import threading

import pytest
import torch
from conftest import REPO

from lightning_cit.quant import random_architecture

spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)


def test_lora_flop_formula_matches_the_flop_counter_on_a_tiny_llama():
    """performance.md gate C7: analytic 4N + 6N_lora + 12·L·d·S against torch's FlopCounterMode (eager attention)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, target_modules=list(throughput.LORA_TARGETS)))
    model.enable_input_require_grads()  # the layer-0 input gradient is counted too (as in the formula)
    seq = 128
    tokens = torch.randint(0, 1024, (1, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    counted = counter.get_total_flops() / seq
    analytic = throughput.lora_flops_per_token(config, seq, 16)
    assert counted == pytest.approx(analytic, rel=0.02)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=tokens)
    assert counter.get_total_flops() / seq == pytest.approx(throughput.lora_flops_per_token(config, seq, 16, mode="fwd"), rel=0.02)


def test_llama3_8b_flops_and_mfu_reproduce_the_reference_numbers():
    config = random_architecture("random:llama3-8b")
    per_token = throughput.lora_flops_per_token(config, 2048, 16)
    assert per_token == pytest.approx(33.5e9, rel=0.005)  # performance.md §3.2
    assert throughput.lora_flops_per_token(config, 2048, 16, mode="full") == pytest.approx(48.2e9, rel=0.005)
    assert throughput.lora_flops_per_token(config, 2048, 16, mode="fwd") == pytest.approx(16.2e9, rel=0.005)
    assert throughput.lora_flops_per_token(config, 2048, 16, activation_checkpointing=True) == pytest.approx(48.6e9, rel=0.005)
    peak = throughput.peak_flops("NVIDIA H100 80GB HBM3")
    assert peak == 989.4e12
    assert throughput.mfu(8_863, per_token, peak) == pytest.approx(0.30, abs=0.001)  # the 9,000 tok/s goal is ~30% MFU
    assert throughput.peak_flops("NVIDIA H100 PCIe") == 756e12 and throughput.peak_flops("Tesla T4") is None


def test_baton_alternates_steps_and_lets_the_survivor_finish():
    baton = throughput.Baton(["a", "b"])
    order: list[str] = []

    def participant(name: str, steps: int) -> None:
        try:
            for _ in range(steps):
                baton.wait(name)
                order.append(name)
                baton.pass_on(name)
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=participant, args=("a", 5)), threading.Thread(target=participant, args=("b", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert order == ["a", "b", "a", "b", "a", "b", "a", "a"]


def test_paired_ratio_pairs_steps_in_order():
    result = throughput._paired([(2.0, 10), (3.0, 10), (30.0, 10)], [(1.0, 10), (3.0, 10), (10.0, 10)])
    assert result["median_ratio"] == 2.0 and result["pairs"] == 3
    assert result["total_ratio"] == pytest.approx(35 / 14)
