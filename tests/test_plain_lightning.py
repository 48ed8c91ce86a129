"""Every lightning-cit callback in an ordinary Lightning project (``examples/plain_lightning``).

The project knows lightning-cit only through the contract (``ContinualModule``, ``task_from_records``,
``ContinualInstructionDataModule(datasets=..., collate_fn=...)``). Each method is trained both as one
``Trainer.fit`` per task (same callback objects) and as one fit with epoch = task, and checked against
an independent computation of what it must do; misuse is one clear error at setup.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import REPO
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(REPO / "examples" / "plain_lightning"))
import project
from lightning_cit.callbacks import (
    AdapterEMA,
    FixedRatio,
    ForgettingEvaluator,
    JointFlashbackAdaptation,
    MSSRReplay,
    NoReplay,
    OnPolicyReplay,
)
from lightning_cit.datamodules import ContinualInstructionDataModule

from lightning_cit.contract import ContractError, TaskClock

STYLES = ("fit", "epoch")
NAMES = ("cipher_a", "cipher_b", "shift")


def _records(n_train: int = 64, n_eval: int = 6, tasks: int = 3) -> dict:
    return project.my_records(NAMES[:tasks], n_train=n_train, n_eval=n_eval)


def _train(style: str, module, records, callbacks, steps: int = 6, datamodule=None, **kwargs):
    fit = project.fit_per_task if style == "fit" else project.fit_epoch_per_task
    return fit(module, records, callbacks, steps=steps, datamodule=datamodule, **kwargs)


def _our_data(module, records, steps: int = 6, **kwargs) -> ContinualInstructionDataModule:
    """The same records handed to lightning-cit's DataModule (replay methods need its memory and mixture plan)."""
    return ContinualInstructionDataModule(datasets=project.as_tasks(records), collate_fn=project.my_collate(module.tokenizer),
                                          global_batch_size=8, steps_per_task=steps, **kwargs)


def _trainable(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters() if p.requires_grad]


class Trajectory(Callback):
    """Trainable weights at every task start and after every optimizer step, labelled by the test's own task count."""

    def __init__(self) -> None:
        self.tasks: list[dict] = []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 0 or pl_module.task_clock.style == "epoch":  # the project's own notion: a new task
            self.tasks.append({"start": _trainable(pl_module), "steps": []})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.tasks[-1]["steps"].append(_trainable(pl_module))


# ------------------------------------------------------------------------------------------- LCIA: EMA
@pytest.mark.parametrize("style", STYLES)
def test_ema_equals_an_independent_ema_and_keeps_the_last_tasks_training(style, tmp_path):
    pl.seed_everything(0)
    module, records, decay = project.MyCausalLM(hidden=32), _records(tasks=2), 0.7
    trajectory = Trajectory()
    _train(style, module, records, [trajectory, AdapterEMA(decay=decay)], default_root_dir=str(tmp_path))
    assert len(trajectory.tasks) == 2 and all(len(t["steps"]) == 6 for t in trajectory.tasks)
    last = trajectory.tasks[-1]
    expected = [t.clone() for t in last["start"]]  # the average restarts from the task's start weights
    for step in last["steps"]:
        expected = [decay * e + (1 - decay) * s for e, s in zip(expected, step)]
    final = _trainable(module)
    for got, want in zip(final, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the last task's training is kept: the weights moved away from where the last task started
    assert max((f - s).abs().max().item() for f, s in zip(final, last["start"])) > 1e-4
    # and every task start is the previous task's average (copied in at its end)
    middle = trajectory.tasks[0]
    average = [t.clone() for t in middle["start"]]
    for step in middle["steps"]:
        average = [decay * e + (1 - decay) * s for e, s in zip(average, step)]
    for got, want in zip(last["start"], average):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- the evaluator
class Reevaluate(Callback):
    """After each task (the project's own count), score every task again with plain calls to the module."""

    def __init__(self, tasks) -> None:
        self.tasks, self.rows = tasks, []

    def _row(self, pl_module):
        pl_module.eval()
        row = []
        for task in self.tasks:
            result = pl_module.evaluate_samples(task.eval, task.metric, task.spec.max_new_tokens)
            row.append(sum(result["scores"]) / len(result["scores"]))
        pl_module.train()
        return row

    def on_train_epoch_end(self, trainer, pl_module):
        self.rows.append(self._row(pl_module))


@pytest.mark.parametrize("style", STYLES)
def test_the_evaluators_matrix_equals_an_independent_reevaluation(style, tmp_path):
    pl.seed_everything(0)
    module, records = project.MyCausalLM(hidden=32), _records(tasks=2)
    tasks = project.as_tasks(records)
    evaluator = ForgettingEvaluator(tasks=tasks, probe_every_n_steps=None, output_dir=str(tmp_path), heatmap=False, print_table=False)
    check = Reevaluate(tasks)
    _train(style, module, records, [AdapterEMA(decay=0.5), evaluator, check], default_root_dir=str(tmp_path))
    scores = evaluator.scores(pl.Trainer(logger=False))
    assert scores["rows"] == ["base", *NAMES[:2]] and scores["complete"]
    assert len(check.rows) == 2
    for got, want in zip(scores["matrix"][1:], check.rows):
        assert got == pytest.approx(want, abs=1e-9)


# ------------------------------------------------------------------------------------------- replay methods
class Shares(Callback):
    def __init__(self) -> None:
        self.replay: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        task = int(batch["task_ids"][~batch["is_replay"]][0]) if (~batch["is_replay"]).any() else -1
        self.replay.setdefault(task, []).append(batch["is_replay"].float().mean().item())


@pytest.mark.parametrize("style", STYLES)
def test_a_controller_mixes_the_share_it_asked_for(style, tmp_path):
    pl.seed_everything(0)
    module, records = project.MyCausalLM(hidden=32), _records(tasks=2)
    data = _our_data(module, records, steps=8, buffer_size=16)
    shares = Shares()
    _train(style, module, records, [FixedRatio(ratio=0.5), shares], datamodule=data, default_root_dir=str(tmp_path))
    assert sum(shares.replay[0]) == 0.0  # nothing to replay during the first task
    mean = sum(shares.replay[1]) / len(shares.replay[1])
    assert abs(mean - 0.5) < 0.15, mean
    assert sorted(j for j, _ in data.memory.items()) == [0]


@pytest.mark.parametrize("style", STYLES)
def test_mssr_reviews_replayed_samples(style, tmp_path):
    pl.seed_everything(0)
    module, records = project.MyCausalLM(hidden=32), _records(tasks=2)
    data = _our_data(module, records, steps=8, buffer_size=16)
    mssr = MSSRReplay(schedule="fixed", fixed_ratio=0.5, replay_mode="every_batch", rescore_interval=None)
    _train(style, module, records, [mssr], datamodule=data, default_root_dir=str(tmp_path))
    reviewed = sum(int((t > 0).sum()) for t in mssr.memory.t_review.values())
    assert reviewed > 0 and set(mssr.memory.log_m) == {0}


@pytest.mark.parametrize("style", STYLES)
def test_opr_buffers_hold_the_models_own_answers(style, tmp_path):
    pl.seed_everything(0)
    module, records = project.MyCausalLM(hidden=32), _records(tasks=2)
    data = _our_data(module, records, steps=6, buffer_size=4)

    class AnswersAtTaskEnd(Callback):  # after OPR at the end of the first task: regenerate greedily, compare
        def __init__(self) -> None:
            self.checked = 0

        def on_train_epoch_end(self, trainer, pl_module):
            if self.checked or 0 not in data.memory:
                return
            entries = data.memory.get(0).entries
            prompts = [{"messages": e["messages"], "response": ""} for e in entries]
            pl_module.eval()
            answers = pl_module.generate_answers(prompts, data.train_tasks[0].spec.max_new_tokens)
            pl_module.train()
            assert [e["response"] for e in entries] == answers
            self.checked = len(entries)

    check = AnswersAtTaskEnd()
    _train(style, module, records, [OnPolicyReplay(budget=4, temperature=0.0), NoReplay(), check], datamodule=data,
           default_root_dir=str(tmp_path))
    assert check.checked == 4
    assert all(isinstance(e, dict) and "opr_score" in e for e in data.memory.get(0).entries)


@pytest.mark.parametrize("style", STYLES)
def test_jfa_divergence_is_nonzero_and_only_adapters_are_snapshotted(style, tmp_path):
    pl.seed_everything(0)
    module, records = project.MyCausalLM(hidden=32, lora_rank=4), _records(tasks=2)
    data = _our_data(module, records, steps=6, buffer_size=8)
    jfa = JointFlashbackAdaptation(flashbacks_per_task=4, max_new_tokens=6, latent_tasks=False, projection=False)

    class Divergence(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "train/flashback_divergence" in trainer.callback_metrics and batch["prompt_only"].any():
                self.values.append(float(trainer.callback_metrics["train/flashback_divergence"]))

    divergence = Divergence()
    _train(style, module, records, [jfa, FixedRatio(ratio=0.3), divergence], datamodule=data, default_root_dir=str(tmp_path))
    assert jfa.flashback_tasks == [0]
    assert divergence.values and max(divergence.values) > 0
    assert jfa._snapshot and all("lora_" in name for name in jfa._snapshot)  # adapter tensors only, no frozen model copy
    assert jfa._frozen is None


# ------------------------------------------------------------------------------------------- misuse
def test_replay_methods_with_a_plain_datamodule_are_one_clear_error(tmp_path):
    module, records = project.MyCausalLM(hidden=32), _records()
    trainer = pl.Trainer(max_epochs=1, callbacks=[MSSRReplay(), OnPolicyReplay()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(ContractError) as err:
        trainer.fit(module, datamodule=project.OneTaskData(records["cipher_a"]["train"], module.tokenizer, steps=2))
    message = str(err.value)
    assert "MSSRReplay needs DataModule members" in message and "memory" in message and "set_mixture" in message
    assert "ContinualInstructionDataModule(datasets=...)" in message


def test_a_module_without_the_mixin_is_one_error_listing_what_it_lacks(tmp_path):
    class Bare(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    trainer = pl.Trainer(max_epochs=1, callbacks=[AdapterEMA(), ForgettingEvaluator(tasks=[])], logger=False, enable_checkpointing=False)
    with pytest.raises(ContractError, match=r"AdapterEMA needs module members \['task_clock', 'continual'\].*ContinualModule"):
        AdapterEMA().setup(trainer, Bare(), "fit")
    evaluator = ForgettingEvaluator(tasks=[])
    with pytest.raises(ContractError, match=r"'evaluate_samples', 'sample_losses'"):
        evaluator.setup(trainer, Bare(), "fit")


def test_two_controllers_and_wrong_order_are_refused_at_setup(tmp_path):
    module, records = project.MyCausalLM(hidden=32), _records()
    data = _our_data(module, records)
    trainer = pl.Trainer(max_epochs=1, callbacks=[FixedRatio(), NoReplay()], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ContractError, match="two callbacks provide the 'mixture' service"):
        trainer.fit(module, datamodule=data)
    module = project.MyCausalLM(hidden=32)
    trainer = pl.Trainer(max_epochs=1, callbacks=[OnPolicyReplay(), AdapterEMA()], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ContractError, match="AdapterEMA must come before OnPolicyReplay"):
        trainer.fit(module, datamodule=_our_data(module, records))


def test_a_fit_without_an_end_and_a_datamodule_for_the_wrong_style_are_refused(tmp_path):
    module, records = project.MyCausalLM(hidden=32), _records()
    trainer = pl.Trainer(max_epochs=-1, callbacks=[AdapterEMA()], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ContractError, match="needs an end: set the Trainer's max_epochs or max_steps"):
        trainer.fit(module, datamodule=project.OneTaskData(records["cipher_a"]["train"], module.tokenizer, steps=2))
    module.task_clock = TaskClock("fit")
    trainer = pl.Trainer(max_epochs=3, callbacks=[FixedRatio()], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(Exception, match=r"TaskClock\('fit'\) each fit trains one task .* set Trainer\(max_epochs=1\)"):
        trainer.fit(module, datamodule=_our_data(module, records))


def test_missing_batch_keys_and_step_outputs_are_one_error_at_the_first_step():
    from lightning_cit.callbacks import CostMeter

    from lightning_cit.contract import ContinualRegistry

    registry = ContinualRegistry()
    for callback in (MSSRReplay(), JointFlashbackAdaptation(), CostMeter()):
        registry.register_callback(callback)
    with pytest.raises(ContractError) as err:
        registry.check_batch({"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2, 3)})
    message = str(err.value)
    assert "training batches lack keys" in message
    assert "MSSRReplay needs ['sample_ids', 'source_ids', 'is_replay']" in message
    assert "JointFlashbackAdaptation needs ['attention_mask']" in message
    assert "CostMeter" not in message  # it has its input_ids
    registry.check_batch({})  # checked once per fit: the first batch decides
    with pytest.raises(ContractError, match=r"MSSRReplay needs \['per_sample_loss'\]: training_step returned a Tensor"):
        registry.check_step_outputs(torch.tensor(1.0))


def test_the_cost_meter_with_a_datamodule_that_does_not_mark_replay_reports_no_share(tmp_path):
    import json

    from lightning_cit.callbacks import CostMeter

    module, records = project.MyCausalLM(hidden=32), _records(tasks=2)
    meter = CostMeter()
    trainers = _train("fit", module, records, [meter], steps=3, default_root_dir=str(tmp_path))
    report = json.loads((tmp_path / "cost.json").read_text())
    assert report["replay_share"] is None and set(report["replay_share_per_task"].values()) == {None}
    assert report["replay_share_unknown"].startswith("96 trained samples came in batches without 'is_replay'")
    assert report["optimizer_steps"] == 6 and len(trainers) == 2


# ------------------------------------------------------------------------------------------- resume, one fit per task
class CrashAt(Callback):
    def __init__(self, fit: int, step: int) -> None:
        self.fit, self.step, self.fits = fit, step, 0

    def on_train_start(self, trainer, pl_module):
        self.fits += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.fits == self.fit and trainer.global_step == self.step:
            raise RuntimeError("injected crash")


def _resumable_run(tmp_path, crash: CrashAt | None, resume_from: str | None = None, first_task: int = 0):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    module, records = project.MyCausalLM(hidden=32), _records(tasks=2)
    data = _our_data(module, records, steps=6, buffer_size=16)
    evaluator = ForgettingEvaluator(probe_every_n_steps=None, output_dir=str(tmp_path), heatmap=False, print_table=False)
    callbacks = [FixedRatio(ratio=0.5), AdapterEMA(decay=0.7), evaluator]
    for k in range(first_task, 2):
        saver = ModelCheckpoint(dirpath=str(tmp_path / f"ckpt{k}"), every_n_train_steps=2, save_last=True, save_top_k=-1)
        trainer = pl.Trainer(max_epochs=1, callbacks=[*callbacks, saver, *([crash] if crash else [])], logger=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
        if resume_from is None:
            module.task_clock.begin_task(k)
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
        resume_from = None
    return evaluator, _trainable(module)


def test_one_fit_per_task_resumes_exactly_after_a_crash(tmp_path):
    reference, weights = _resumable_run(tmp_path / "reference", crash=None)
    with pytest.raises(RuntimeError, match="injected crash"):
        _resumable_run(tmp_path / "crashed", crash=CrashAt(fit=2, step=3))
    # a new process: fresh module, DataModule and callbacks; resume the interrupted fit of task 1 from its last checkpoint
    resumed, resumed_weights = _resumable_run(tmp_path / "crashed", crash=None, resume_from=str(tmp_path / "crashed" / "ckpt1" / "last.ckpt"),
                                              first_task=1)
    assert resumed.rows == reference.rows == ["base", *NAMES[:2]]
    assert resumed.matrix == reference.matrix
    for got, want in zip(resumed_weights, weights):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_resume_from_a_tasks_last_step_replays_the_task_end(tmp_path):
    """A checkpoint of a fit's last step (before the task-end hooks ran) resumes into the task end, not past it."""
    reference, weights = _resumable_run(tmp_path / "reference", crash=None)
    _resumable_run(tmp_path / "first", crash=None)  # leaves ckpt0/epoch=0-step=6.ckpt: task 0's last step, before its end
    resumed, resumed_weights = _resumable_run(tmp_path / "first", crash=None, resume_from=str(tmp_path / "first" / "ckpt0" / "epoch=0-step=6.ckpt"),
                                              first_task=0)
    assert resumed.matrix == reference.matrix and resumed.rows == reference.rows
    for got, want in zip(resumed_weights, weights):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_several_epochs_per_task_start_and_end_each_task_once(tmp_path):
    pl.seed_everything(0)
    module, records = project.MyCausalLM(hidden=32), _records(tasks=2)
    module.task_clock = TaskClock("epoch", epochs_per_task=2)
    tasks = project.as_tasks(records)

    class CountingEMA(AdapterEMA):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.starts: list[int] = []

        def on_average_start(self, task: int) -> None:
            self.starts.append(task)

    ema = CountingEMA(decay=0.5)
    evaluator = ForgettingEvaluator(tasks=tasks, probe_every_n_steps=None, output_dir=str(tmp_path), heatmap=False, print_table=False)
    data = project.SequenceData([r["train"] for r in records.values()], module.tokenizer, steps=3, epochs_per_task=2)
    trainer = pl.Trainer(max_epochs=4, reload_dataloaders_every_n_epochs=1, callbacks=[ema, evaluator], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    assert evaluator.rows == ["base", *NAMES[:2]]  # one row per task, not per epoch
    assert ema.starts == [0, 1]  # the average restarted at each task's first epoch only
