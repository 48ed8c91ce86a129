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

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_cit.collate import IGNORE_INDEX, Collator, count_eval_truncation, left_padded_prompts
from lightning_cit.errors import ConfigError
from lightning_cit.metrics import MC_ACCURACY, TEXT_METRICS

LR_SCHEDULES = ("cosine", "linear", "constant")
BASE_ADAPTER = "__base__"
"""What an ``adapter_router`` returns for "answer with the adapters disabled"."""
QUANTIZATIONS = ("nf4", "fp4")  # the string shorthand; lightning_cit.quant.QUANT_FIELDS lists the dict form


@dataclass
class TinyLlama:
    """Shape of the built-in tiny Llama (``model: tiny`` / ``aligned-base``)."""

    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 256
    """Width of the MLP."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Attention heads (no grouped-query attention)."""
    max_position_embeddings: int = 256
    """Longest sequence the rotary embedding is set up for."""


def build_tiny_llama(tokenizer: Any, shape: TinyLlama) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean loss of each sample and its number of target tokens (labels already aligned to inputs)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts


def inference(method: Any) -> Any:
    """Run a forward-only method (evaluation, probes, rollouts) the way Lightning runs its own steps.

    ``torch.no_grad`` plus the trainer's precision context (autocast under ``*-mixed``): under FSDP +
    ``bf16-mixed`` peft casts a LoRA input to the adapter's fp32 master dtype while, inside the adapter's
    FSDP unit, the weight is bf16; autocast reconciles them as it does in ``training_step``. Under
    ``FSDPStrategy`` the call also goes through the root FSDP module's forward (Lightning's forward
    redirection, as for ``training_step``): a callback calling inner FSDP units first would make one of
    them the root and break FSDP's lazy initialization, and the root's own parameters (embeddings,
    head) are only gathered by the root's forward.
    """

    @functools.wraps(method)
    def wrapper(self: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
        trainer = self._trainer
        if trainer is not None and _outside_fsdp_root_forward(trainer.strategy):
            strategy = trainer.strategy
            with torch.no_grad():  # no backward hooks from this forward
                return strategy._forward_redirection(strategy.model, self, method.__name__, *args, **kwargs)
        precision = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
        with torch.no_grad(), precision:
            return method(self, *args, **kwargs)

    return wrapper


def _outside_fsdp_root_forward(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(strategy, FSDPStrategy) or strategy.model is None or strategy.model is strategy.lightning_module:
        return False
    from torch.distributed.fsdp._common_utils import TrainingState

    return strategy.model.training_state == TrainingState.IDLE


class LossComponent:
    """A method's contribution to :meth:`ContinualLM.training_step`, registered with ``add_loss_component``.

    The step's loss starts as ``{"nll": task NLL}`` (prompt-only samples excluded). Each component's
    :meth:`loss_terms` returns named, already weighted terms that are added to it (each is logged as
    ``train/<name>``; the policy logits of the batch are passed in, so a term costs no second
    forward). Then :meth:`backward_loss` may replace the summed loss by the tensor to back-propagate,
    e.g. a gradient-surgery surrogate whose gradient is a projected combination of the terms'
    gradients. Components run in registration order; the defaults add nothing and keep the sum.
    """

    def loss_terms(self, module: ContinualLM, batch: dict[str, Any], logits: torch.Tensor, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def backward_loss(self, module: ContinualLM, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        return loss


class ContinualLM(pl.LightningModule):
    """A causal LM tuned on a sequence of instruction tasks.

    Args:
        model: ``tiny``, ``aligned-base``, a named model converted once into the cache (``smollm2-135m-instruct``:
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
        gradient_checkpointing: recompute each decoder layer's activations in the backward (Hugging Face's
            reentrant checkpointing; +~45% FLOPs for LoRA, far less activation memory).
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
        gradient_checkpointing: bool = False,
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
        from lightning_cit.named_models import NAMED_MODELS, resolve_named_model

        # a named model (e.g. smollm2-135m-instruct) is a cached folder made once by `lightning-cit convert-gguf`
        self.model_dir = resolve_named_model(model, base_cache_dir) if model in NAMED_MODELS else None
        if model not in ("tiny", "aligned-base") and self.model_dir is None and not is_random(model) and not os.path.isdir(os.path.expanduser(model)):
            raise ConfigError(
                f"model.model={model!r} is neither 'tiny', 'aligned-base', a named model ({', '.join(NAMED_MODELS)}) "
                "nor an existing local checkpoint directory"
            )
        self.save_hyperparameters()
        self.model_name = model
        self.tiny = tiny or TinyLlama()
        self.lora = lora
        self.quantization = quant_spec
        self.gradient_checkpointing = gradient_checkpointing
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.reset_optimizer_state = reset_optimizer_state
        self.eval_batch_size = eval_batch_size
        self.base_cache_dir = base_cache_dir
        self.model: torch.nn.Module | None = None
        self.tokenizer = self._load_tokenizer(tokenizer)
        # picks the PEFT adapter that answers a batch of evaluation prompts (set by InstructionGrouping)
        self.adapter_router: Any = None
        # extra loss terms registered by method callbacks (add_loss_component), not hyperparameters
        self.loss_components: list[LossComponent] = []

    # ----------------------------------------------------------------------------------- building
    def _checkpoint_dir(self) -> str | None:
        """The base's source: None for ``tiny``, a directory, or ``random:<architecture>``."""
        if self.model_name == "tiny":
            return None
        if self.model_name.startswith("random:"):
            return self.model_name
        if self.model_name == "aligned-base":
            from lightning_cit.base import ensure_aligned_base

            return ensure_aligned_base(self.tiny, cache_dir=self.base_cache_dir)
        return self.model_dir or os.path.expanduser(self.model_name)

    def _load_tokenizer(self, tokenizer: str | None) -> Any:
        if tokenizer is None and (self.model_name in ("tiny", "aligned-base") or self.model_name.startswith("random:")):
            from lightning_cit.synth import build_char_tokenizer

            return build_char_tokenizer()  # the aligned base is saved with this same tokenizer
        from transformers import AutoTokenizer

        source = os.path.expanduser(tokenizer or self.model_dir or self.model_name)
        loaded = AutoTokenizer.from_pretrained(source, local_files_only=True)
        if loaded.pad_token is None:
            loaded.pad_token = loaded.eos_token
        return loaded

    def configure_model(self) -> None:
        if self.model is not None:
            return
        path = self._checkpoint_dir()
        if path is None:
            model = build_tiny_llama(self.tokenizer, self.tiny)
        else:
            from lightning_cit.quant import check_storage_matches_precision, load_causal_lm

            trainer = self._trainer
            check_storage_matches_precision(self.quantization, trainer)
            # quantize straight onto this rank's GPU (outside a trainer: the module's device); on CPU load on the host
            model = load_causal_lm(path, self.quantization, trainer.strategy.root_device if trainer is not None else self.device)
        if self.gradient_checkpointing:
            # reentrant (as fsdp_qlora recommends with bitsandbytes); transformers also makes the frozen embeddings'
            # output require grad, which reentrant checkpointing needs. Non-reentrant checkpointing was tried: under
            # FSDP (use_orig_params) it leaves the frozen layer units' norms unregistered and full state dicts fail.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        if self.lora:
            from peft import LoraConfig, get_peft_model

            # no prepare_model_for_kbit_training: its fp32 upcast of norms/embeddings would put two dtypes
            # into one FSDP flat parameter and add ~2 GB for an 8B model; peft freezes the base itself
            config = LoraConfig(task_type="CAUSAL_LM", **self.lora)
            model = get_peft_model(model, config)
        self.model = model

    # ----------------------------------------------------------------------------------- training
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def add_loss_component(self, component: LossComponent) -> None:
        """Register a :class:`LossComponent` (once); components run in registration order."""
        if all(c is not component for c in self.loss_components):
            self.loss_components.append(component)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        losses, counts = per_sample_loss(logits, batch["labels"])
        # token-weighted mean over the batch, the usual SFT objective; prompt-only samples (stored
        # prompts whose response is no target, e.g. JFA's flashbacks) are left out of it
        nll_counts = counts * ~batch["prompt_only"] if "prompt_only" in batch else counts
        loss = (losses * nll_counts).sum() / nll_counts.sum().clamp(min=1)
        if self.loss_components:
            terms = {"nll": loss}
            for component in self.loss_components:
                terms.update(component.loss_terms(self, batch, logits, dict(terms)))
            loss = sum(terms.values())
            for name, term in terms.items():
                self.log(f"train/{name}", term.detach(), batch_size=len(losses))
            for component in self.loss_components:
                loss = component.backward_loss(self, terms, loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(losses))
        return {
            "loss": loss,
            "per_sample_loss": losses.detach(),
            "sample_ids": batch["sample_ids"],
            "task_ids": batch["task_ids"],
            "source_ids": batch["source_ids"],
        }

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
        if dm is None or not hasattr(dm, "steps_for"):
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
        if self.adapter_router is not None:  # also needed by validate/test, where callback states are not restored
            checkpoint["adapter_router"] = self.adapter_router.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        import random

        import numpy as np

        if self.adapter_router is not None and "adapter_router" in checkpoint:
            self.adapter_router.load_state_dict(checkpoint["adapter_router"])
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
        dm = self.trainer.datamodule
        task = self.current_epoch
        starting_fresh = dm is None or not hasattr(dm, "task_start_step") or self.global_step == dm.task_start_step(task)
        if self.reset_optimizer_state and task > 0 and starting_fresh:
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

    @torch.no_grad()
    def probe_loss(self, samples: list[dict], max_length: int = 256) -> float:
        """Mean teacher-forced loss over ``samples`` (the cheap probe the controllers read)."""
        losses = self.sample_losses(samples, max_length)
        return float(sum(losses) / max(1, len(losses)))

    @inference
    def sample_losses(self, samples: list[dict], max_length: int = 256) -> list[float]:
        """Teacher-forced loss of each sample (token mean over its response)."""
        collate = Collator(self.tokenizer, max_length, [])
        out: list[float] = []
        for i in range(0, len(samples), self.eval_batch_size):
            batch = collate(samples[i : i + self.eval_batch_size])
            logits = self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            losses, _ = per_sample_loss(logits, batch["labels"].to(self.device))
            out.extend(losses.tolist())
        return out

    @inference
    def generate_answers(self, samples: list[dict], max_new_tokens: int, temperature: float = 0.0) -> list[str]:
        """Answers to each sample's prompt, batched with left padding (KV cache on).

        ``temperature`` 0 is greedy decoding; above 0 samples from the temperature-scaled softmax
        (no top-k / top-p truncation, like vLLM's defaults) with torch's global generator.
        """
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        answers: list[str] = []
        for i in range(0, len(samples), self.eval_batch_size):
            chunk = samples[i : i + self.eval_batch_size]
            batch = left_padded_prompts(self.tokenizer, [s["messages"] for s in chunk], pad_id, self._eval_max_length())
            output = self.model.generate(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **sampling,
            )
            answers.extend(self.tokenizer.batch_decode(output[:, batch["input_ids"].size(1) :], skip_special_tokens=True))
        return answers

    @inference
    def choose_options(self, samples: list[dict]) -> list[int]:
        """Index of the option with the highest total log-likelihood as the answer to each prompt."""
        expanded = [
            {"messages": s["messages"], "response": str(option), "index": (i, j)}
            for i, s in enumerate(samples)
            for j, option in enumerate(s["options"])
        ]
        collate = Collator(self.tokenizer, self._eval_max_length() or 10_000, [])
        scores: dict[tuple[int, int], float] = {}
        for start in range(0, len(expanded), self.eval_batch_size):
            chunk = expanded[start : start + self.eval_batch_size]
            batch = collate(chunk)
            logits = self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            losses, counts = per_sample_loss(logits, batch["labels"].to(self.device))
            for sample, loss, count in zip(chunk, losses.tolist(), counts.tolist()):
                scores[sample["index"]] = -loss * count
        count_eval_truncation("choose_options", sum(collate.truncated.values()), collate.max_length)
        return [max(range(len(s["options"])), key=lambda j: scores[(i, j)]) for i, s in enumerate(samples)]

    def evaluate_samples(self, samples: list[dict], metric: str, max_new_tokens: int) -> dict[str, list]:
        """Per-sample ``scores`` (0..100), teacher-forced ``losses`` and ``predictions`` for one task.

        This is the method :class:`~lightning_cit.callbacks.ForgettingEvaluator` calls; a module of
        another project implements the same signature to be evaluated. With an ``adapter_router``
        (instruction grouping) the prompts are answered by the adapter it picks for them.
        """
        adapter = self.adapter_router.route(samples) if self.adapter_router is not None else None
        active = getattr(self.model, "active_adapter", None)
        if adapter is None or adapter == active:
            return self._evaluate_samples(samples, metric, max_new_tokens)
        if adapter == BASE_ADAPTER:  # the router's "no group fits": the base model answers
            with self.model.disable_adapter():
                return self._evaluate_samples(samples, metric, max_new_tokens)
        self.model.set_adapter(adapter)
        try:
            return self._evaluate_samples(samples, metric, max_new_tokens)
        finally:
            self.model.set_adapter(active)

    def _eval_max_length(self) -> int | None:
        """The data's ``max_length`` (evaluation inputs are cut to it like training samples); None without a DataModule."""
        trainer = self._trainer
        value = getattr(getattr(trainer, "datamodule", None), "max_length", None) if trainer is not None else None
        return value if isinstance(value, int) and value > 0 else None

    def _evaluate_samples(self, samples: list[dict], metric: str, max_new_tokens: int) -> dict[str, list]:
        losses = self.sample_losses(samples)
        if metric == MC_ACCURACY:
            chosen = self.choose_options(samples)
            predictions = [str(s["options"][c]) for s, c in zip(samples, chosen)]
            scores = [100.0 * (c == int(s["answer_index"])) for s, c in zip(samples, chosen)]
        else:
            predictions = self.generate_answers(samples, max_new_tokens)
            scorer = TEXT_METRICS[metric]
            scores = [scorer(p, s["response"]) for p, s in zip(predictions, samples)]
        return {"scores": scores, "losses": losses, "predictions": predictions}


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


__all__ = ["ContinualLM", "LossComponent", "TinyLlama", "build_tiny_llama", "per_sample_loss"]
