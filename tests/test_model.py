"""Model building: local HF checkpoints, LoRA, 4-bit NF4 (bitsandbytes on CPU), the aligned base."""

import json

import pytest
import torch
from test_e2e import small_config

from lightning_cit.base import ensure_aligned_base
from lightning_cit.cli import main
from lightning_cit.errors import ConfigError
from lightning_cit.module import ContinualLM, TinyLlama, build_tiny_llama
from lightning_cit.synth import build_char_tokenizer


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    build_tiny_llama(tokenizer, TinyLlama(hidden_size=64, intermediate_size=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_lora_on_a_local_checkpoint_trains_only_adapters(local_checkpoint):
    module = ContinualLM(model=local_checkpoint, lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_nf4_quantized_base_with_lora_runs_forward_backward_and_generation(local_checkpoint):
    import bitsandbytes as bnb

    module = ContinualLM(model=local_checkpoint, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}, quantization="nf4")
    module.configure_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
    sample = {"messages": [{"role": "user", "content": "Repeat: abc"}], "response": "abc"}
    from lightning_cit.collate import Collator

    batch = Collator(module.tokenizer, 64, ["t"])([sample, sample])
    out = module.training_step(batch, 0)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()
    grads = [p.grad for n, p in module.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    assert len(module.generate_answers([sample], max_new_tokens=4)) == 1


def test_qlora_fit_through_the_cli(tmp_path, local_checkpoint):
    config = small_config(tmp_path)
    extra = ["--model.model", local_checkpoint, "--model.quantization", "nf4",
             "--model.lora", json.dumps({"r": 4, "target_modules": ["q_proj", "v_proj"]}), "--data.steps_per_task", "3"]
    assert main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"), *extra]) == 0
    scores = json.loads(next((tmp_path / "run").rglob("scores.json")).read_text())
    assert scores["complete"]


def test_bad_model_options_are_reported():
    with pytest.raises(ConfigError, match="quantization needs model.lora"):
        ContinualLM(quantization="nf4")
    with pytest.raises(ConfigError, match="unknown field"):
        ContinualLM(lora={"rank": 8})
    with pytest.raises(ConfigError, match="lr_schedule"):
        ContinualLM(lr_schedule="exp")
    with pytest.raises(ConfigError, match="neither"):
        ContinualLM(model="/nonexistent/model")


def test_aligned_base_is_prepared_once_and_loads_offline(tmp_path):
    shape = TinyLlama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    path = ensure_aligned_base(shape, cache_dir=str(tmp_path), steps=3)
    assert ensure_aligned_base(shape, cache_dir=str(tmp_path), steps=3) == path  # cached
    module = ContinualLM(model=path, lora={"r": 2, "target_modules": ["q_proj"]})
    module.configure_model()
    assert module.tokenizer.chat_template


def test_the_two_aligned_base_recipes_are_cached_apart_and_v1_keeps_its_key(tmp_path):
    import hashlib
    from dataclasses import asdict
    from pathlib import Path

    from lightning_cit.base import RECIPES
    from lightning_cit.synth import generate

    shape = TinyLlama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    general = ensure_aligned_base(shape, cache_dir=str(tmp_path), steps=3, recipe="aligned-base-general")
    assert Path(general).name.startswith("aligned-base-general-") and general != ensure_aligned_base(shape, cache_dir=str(tmp_path), steps=3)
    # the default base's cache key predates the second recipe: bases cached before are reused, results regenerate
    key = hashlib.sha256(json.dumps({"shape": asdict(TinyLlama()), "recipe": RECIPES["aligned-base"]}, sort_keys=True).encode()).hexdigest()[:12]
    assert key == "e12aa29240ee"
    # the wider mixture covers every character the cit-synth tasks use (digits and option letters for compare)
    seen = set("".join(r["prompt"] for r in generate("general", 2000, seed=99)))
    assert set("0123456789AB") <= seen
    with pytest.raises(ValueError, match="unknown aligned base 'aligned-base-v9'; valid: aligned-base, aligned-base-general"):
        ensure_aligned_base(shape, cache_dir=str(tmp_path), recipe="aligned-base-v9")
    module = ContinualLM(model="aligned-base-general", base_cache_dir=str(tmp_path))
    assert module.tokenizer.chat_template  # the built-in tokenizer; the model itself is built at configure_model


def test_lr_schedule_restarts_at_every_task():
    module = ContinualLM(warmup_steps=2, lr_schedule="linear")
    module._task_bounds = lambda step: (step % 10, 10)  # tasks of 10 steps
    factors = [module._lr_factor(s) for s in range(20)]
    assert factors[:10] == factors[10:]
    assert factors[0] < factors[1] < factors[2] and factors[9] < factors[3]
