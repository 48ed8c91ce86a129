"""``ContinualLM``: the LightningModule that tunes one causal LM through a whole task sequence.

The model is built in :meth:`configure_model` (so strategies can shard it) from

- ``model: tiny``: a small ``LlamaForCausalLM`` built from :class:`TinyLlama` with the built-in
  character tokenizer (random initialization, trained from scratch);
- ``model: aligned-base``: the same architecture briefly pre-trained on a general mixture plus
  the safety task and cached on disk (:mod:`lightning_cit.base`), a stand-in for an aligned chat model;
- any other string: a local Hugging Face checkpoint directory, loaded offline with ``from_pretrained``.

``lora`` (peft ``LoraConfig`` fields) adds LoRA adapters and freezes the base; ``quantization: nf4``
loads the base in 4-bit NF4 through bitsandbytes (QLoRA; it runs on CPU too; a dict sets the compute
and storage dtypes, see :mod:`lightning_cit.quant`); ``model: random:llama3-8b`` builds an architecture
with seeded random weights (benchmarks without downloads). With no adapter
configured every parameter is trained.

The learning rate follows a per-task schedule (linear warmup, then cosine or linear decay) that
restarts at every task; ``reset_optimizer_state`` clears the optimizer's moments at each task start.
Training steps return per-sample losses (``outputs["per_sample_loss"]`` with the batch's
``sample_ids``/``task_ids``/``source_ids``) so callbacks can read them in ``on_train_batch_end``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_cit.contract import BASE_ADAPTER, ContinualModule, LossComponent, TaskClock, TaskStyle, inference
from lightning_cit.errors import ConfigError
from lightning_cit.loss import DEFAULT_CHUNK_TOKENS, per_sample_loss, per_sample_loss_from_hidden  # per_sample_loss: re-exported
from lightning_cit.models import TinyLlama, build_tiny_llama

LR_SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINTING = (True, False, "reentrant", "non_reentrant")
QUANTIZATIONS = ("nf4", "fp4")  # the string shorthand; lightning_cit.quant.QUANT_FIELDS lists the dict form


class ContinualLM(ContinualModule, pl.LightningModule):
    """A causal LM tuned on a sequence of instruction tasks.

    Args:
        model: ``tiny``, ``aligned-base`` / ``aligned-base-general`` (:mod:`lightning_cit.base`), a named model converted once into the cache (``smollm2-135m-instruct``:
            ``lightning-cit convert-gguf``) or a local Hugging Face checkpoint directory.
        tiny: architecture of ``tiny`` / ``aligned-base``.
        tokenizer: a local tokenizer directory; None uses the model's own (or the built-in one).
        lora: peft ``LoraConfig`` fields (e.g. ``{r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}``); None = full fine-tuning.
        quantization: ``nf4`` or ``fp4`` loads the base in 4-bit with bitsandbytes (needs ``lora``); a dict
            ``{quant_type, compute_dtype, quant_storage, double_quant}`` sets every field (``quant_storage: bfloat16``
            for FSDP); None = no quantization.
        learning_rate: peak learning rate of every task.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup at the start of every task (optimizer steps).
        lr_schedule: ``cosine``, ``linear`` or ``constant`` decay after warmup, restarted every task.
        min_lr_ratio: the decay ends at ``learning_rate * min_lr_ratio``.
        reset_optimizer_state: clear AdamW's moments at each task start.
        eval_batch_size: prompts per generation / scoring batch during evaluation.
        base_cache_dir: where ``aligned-base`` is cached (default ``$LIGHTNING_CIT_CACHE`` or ``~/.cache/lightning-cit``).
        gradient_checkpointing: recompute each decoder layer's activations in the backward (+~45% FLOPs for LoRA,
            far less activation memory): ``true`` = non-reentrant, except under FSDP where it is reentrant (see
            :meth:`configure_model`); ``reentrant`` / ``non_reentrant`` force one; ``false`` = off.
        fused_loss: train through :func:`lightning_cit.loss.per_sample_loss_from_hidden` (the head applied chunk by
            chunk to the decoder's hidden states, no full logits; not under FSDP or with loss components, which
            need the logits). Off: the logits' loss, chunked too.
        loss_chunk_tokens: rows per chunk of the loss (float32 logits of at most this many tokens at a time).
        task_style: ``epoch`` (one fit walks the sequence, epoch = task: the CLI) or ``fit`` (one ``Trainer.fit``
            per task); see :class:`~lightning_cit.contract.TaskClock`.
        max_eval_length: tokens per evaluated prompt (generation, option scoring, rollouts; longer prompts keep their end,
            counted and warned about); None = the data's ``max_length``, as for training samples.
    """

    def __init__(
        self,
        model: str = "tiny",
        tiny: TinyLlama | None = None,
        tokenizer: str | None = None,
        lora: dict[str, Any] | None = None,
        quantization: str | dict[str, Any] | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        lr_schedule: str = "linear",
        min_lr_ratio: float = 0.0,
        reset_optimizer_state: bool = False,
        eval_batch_size: int = 64,
        base_cache_dir: str | None = None,
        gradient_checkpointing: bool | str = False,
        fused_loss: bool = False,
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        task_style: TaskStyle = "epoch",
        max_eval_length: int | None = None,
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"model.lr_schedule={lr_schedule!r} is unknown; valid: {', '.join(LR_SCHEDULES)}")
        _check_settings(learning_rate, weight_decay, warmup_steps, min_lr_ratio, eval_batch_size, tiny)
        from lightning_cit.quant import is_random, quantization_spec, random_architecture

        quant_spec = quantization_spec(quantization)  # ConfigError naming the field and the valid choices
        if is_random(model):
            random_architecture(model)  # an unknown preset or missing config.json fails before training
        if quantization is not None and not lora:
            raise ConfigError("model.quantization needs model.lora: a 4-bit base is frozen, only adapters train")
        if lora is not None:
            _check_lora_fields(lora)
        if gradient_checkpointing not in CHECKPOINTING:
            raise ConfigError(f"model.gradient_checkpointing={gradient_checkpointing!r}; valid: true, false, reentrant, non_reentrant")
        if isinstance(loss_chunk_tokens, bool) or not isinstance(loss_chunk_tokens, int) or loss_chunk_tokens < 1:
            raise ConfigError(f"model.loss_chunk_tokens must be a positive integer, got {loss_chunk_tokens!r}")
        from lightning_cit.named_models import NAMED_MODELS, resolve_named_model

        # a named model (e.g. smollm2-135m-instruct) is a cached folder made once by `lightning-cit convert-gguf`
        self.model_dir = resolve_named_model(model, base_cache_dir) if model in NAMED_MODELS else None
        from lightning_cit.base import RECIPES

        if model != "tiny" and model not in RECIPES and self.model_dir is None and not is_random(model) and not os.path.isdir(os.path.expanduser(model)):
            raise ConfigError(
                f"model.model={model!r} is neither 'tiny', an aligned base ({', '.join(RECIPES)}), a named model ({', '.join(NAMED_MODELS)}) "
                "nor an existing local checkpoint directory"
            )
        self.save_hyperparameters()
        self.model_name = model
        self.tiny = tiny or TinyLlama()
        self.lora = lora
        self.quantization = quant_spec
        self.gradient_checkpointing = gradient_checkpointing
        self.fused_loss = fused_loss
        self.loss_chunk_tokens = loss_chunk_tokens
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.reset_optimizer_state = reset_optimizer_state
        self.eval_batch_size = eval_batch_size
        self.base_cache_dir = base_cache_dir
        self.model: torch.nn.Module | None = None
        self.max_eval_length = max_eval_length
        from lightning_cit.models import load_tokenizer

        self.tokenizer = load_tokenizer(model, self.model_dir, tokenizer)
        self.task_clock = TaskClock(task_style)

    # ----------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from lightning_cit.models import build_causal_lm, model_source

        source = model_source(self.model_name, self.model_dir, self.tiny, self.base_cache_dir)
        self.model = build_causal_lm(source, self.tokenizer, self.tiny, self.quantization, self.lora, self.gradient_checkpointing,
                                     self._trainer, self.device)

    # ----------------------------------------------------------------------------------- training
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _under_fsdp(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        # under FSDP the head is its own unit: called chunk by chunk it would be gathered once per chunk
        return self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy)

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The decoder's last hidden states (LoRA layers included) and the output head, for the fused loss."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state, base.get_output_embeddings()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        # token-weighted mean over the batch (the usual SFT objective) plus registered loss components;
        # per-sample losses and the batch's ids go to the callbacks through the step outputs
        if self.fused_loss and not self.loss_components and not self._under_fsdp():
            hidden, head = self._hidden_states(batch["input_ids"], batch["attention_mask"])
            outputs = self.continual_loss(batch, None, losses=per_sample_loss_from_hidden(hidden, head, batch["labels"], self.loss_chunk_tokens))
        else:
            outputs = self.continual_loss(batch, self(batch["input_ids"], batch["attention_mask"]), chunk_tokens=self.loss_chunk_tokens)
        self.log("train/loss", outputs["loss"], prog_bar=True, batch_size=len(outputs["per_sample_loss"]))
        return outputs

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP precision plugin refuses norm clipping; FSDP's own clip_grad_norm_ computes
            # the norm over all shards (the Lightning docs' recipe)
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _task_bounds(self, step: int) -> tuple[int, int]:
        """(step within its task, steps of that task) for a global optimizer step."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "steps_for") or self.task_clock.style == "fit":
            # one fit per task: the scheduler is new with each fit's optimizer, its step count is the step in the task
            total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
            return step, int(total)
        start = 0
        for k in range(dm.num_tasks):
            length = dm.steps_for(k)
            if step < start + length:
                return step - start, length
            start += length
        return length, length

    def _lr_factor(self, step: int) -> float:
        position, length = self._task_bounds(step)
        if position < self.warmup_steps:
            return (position + 1) / (self.warmup_steps + 1)
        if self.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (position - self.warmup_steps) / max(1, length - self.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.lr_schedule == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning does not save RNG states; dropout needs them for an exact resume. Plain types
        # only, so the checkpoint still loads with torch.load(weights_only=True).
        import random

        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        }
        super().on_save_checkpoint(checkpoint)  # the task clock and the adapter router

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        import random

        import numpy as np

        super().on_load_checkpoint(checkpoint)  # the task clock and the adapter router
        states = checkpoint.get("rng_states")
        if not states:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))

    def on_train_epoch_start(self) -> None:
        # Lightning skips this hook when it resumes mid-epoch, so a resumed task keeps its moments; in the
        # fit-per-task style every fit builds a fresh optimizer anyway
        clock = self.task_clock
        task = clock.task_of(self.trainer) if clock.style == "epoch" else 0
        if self.reset_optimizer_state and task > 0 and self.current_epoch % clock.epochs_per_task == 0:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()

    # --------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def _eval_step(self, batch: list[dict], dataloader_idx: int, prefix: str) -> None:
        """``lightning-cit validate|test``: every task's metric and loss for the loaded weights."""
        task = self.trainer.datamodule.evaluation_tasks()[dataloader_idx]
        result = self.evaluate_samples(batch, task.metric, task.spec.max_new_tokens)
        n = len(batch)
        name = task.spec.name
        self.log(f"{prefix}/score/{name}", sum(result["scores"]) / n, batch_size=n, add_dataloader_idx=False, sync_dist=True)
        self.log(f"{prefix}/loss/{name}", sum(result["losses"]) / n, batch_size=n, add_dataloader_idx=False, sync_dist=True)


def _check_lora_fields(lora: dict[str, Any]) -> None:
    from dataclasses import fields

    from peft import LoraConfig

    valid = {f.name for f in fields(LoraConfig)}
    unknown = sorted(set(lora) - valid)
    if unknown:
        raise ConfigError(f"model.lora has unknown field(s) {unknown}; valid peft LoraConfig fields include: " + ", ".join(sorted(valid)))
    rank = lora.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:  # peft only checks it deep inside get_peft_model
        raise ConfigError(f"model.lora.r must be a positive integer (the adapter rank), got {rank!r}")
    try:
        LoraConfig(**lora)  # peft's own field checks now, not inside configure_model
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.lora is not a valid peft LoraConfig: {str(err).splitlines()[0]}") from None


def _check_settings(learning_rate: Any, weight_decay: Any, warmup_steps: Any, min_lr_ratio: Any, eval_batch_size: Any,
                    tiny: TinyLlama | None) -> None:
    """Optimizer, schedule, evaluation and tiny-shape settings, checked before anything is built."""
    import math

    if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ConfigError(f"model.learning_rate must be a positive number, got {learning_rate!r}")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ConfigError(f"model.weight_decay must be >= 0, got {weight_decay!r}")
    if not isinstance(min_lr_ratio, (int, float)) or not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"model.min_lr_ratio must lie in [0, 1], got {min_lr_ratio!r}")
    for name, value, low in (("warmup_steps", warmup_steps, 0), ("eval_batch_size", eval_batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"model.{name} must be an integer >= {low}, got {value!r}")
    if isinstance(tiny, TinyLlama):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            value = getattr(tiny, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.tiny.{name} must be a positive integer, got {value!r}")
        if tiny.hidden_size % tiny.num_attention_heads:
            raise ConfigError(
                f"model.tiny.hidden_size={tiny.hidden_size} must be a multiple of model.tiny.num_attention_heads={tiny.num_attention_heads}"
            )


__all__ = ["BASE_ADAPTER", "ContinualLM", "LossComponent", "TinyLlama", "build_tiny_llama", "inference", "per_sample_loss"]
