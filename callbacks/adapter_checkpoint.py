"""``AdapterOnlyCheckpoint``: checkpoints hold the trainable weights only; the frozen base is rebuilt.

A QLoRA base cannot go through a Lightning checkpoint and come back: bitsandbytes' ``Params4bit``
saves its packed storage plus ``absmax``/``quant_map``/``quant_state.*`` entries, and
``nn.Module.load_state_dict`` into a freshly quantized model rejects them (unexpected keys, packed
shape mismatches). It is also wasteful: Llama-3-8B's 4-bit base is ~6 GB per checkpoint, its r=16
adapters 0.17 GB. So, like Answer.AI's ``fsdp_qlora`` (it saves only the adapter weights) and peft's
``save_pretrained``, this callback drops every frozen tensor from ``checkpoint["state_dict"]``. When
loading, the module builds its base again from the same source (a checkpoint directory, or a
``random:`` architecture with its fixed seed), quantizes it the same way, and only the adapters are
read from the checkpoint; ``strict_loading`` is turned off for the missing base keys, and the
callback checks on resume that every trainable tensor was in the checkpoint.

The rebuilt base must be the base the adapters were trained on: each checkpoint stores a fingerprint of
the frozen tensors it leaves out (a strided sample of each, summed in float64 on the CPU: cheap at 8B),
and loading refuses a checkpoint whose fingerprint differs from the rebuilt base's (a different random
init, another checkpoint directory). Under FSDP the tensors are sharded and the check is skipped.
``lightning-cit fit`` adds this callback whenever ``model.lora`` is set (the base is frozen).

Everything stored is a tensor or a plain type, so checkpoints load with ``weights_only=True``. Under
FSDP (full state dict) only rank 0 holds the state dict; the other ranks' empty dicts pass through.

Under ``FSDPStrategy`` the optimizer state is also stored keyed by parameter names (FSDP's own
format) instead of Lightning's positions in ``model.parameters()``: with bitsandbytes layers and
Hugging Face checkpointing, a frozen FSDP unit (the embeddings) is missing from ``parameters()``
after a step but present in a freshly built model, so positions shift between saving and resuming
(``KeyError`` in ``optim_state_dict_to_load``). Lightning loads name-keyed states as they are.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

# wrapper prefixes that FSDP (use_orig_params) and activation checkpointing insert into parameter names
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def trainable_state_keys(module: pl.LightningModule) -> set[str]:
    """State-dict keys of the parameters that require grad, with wrapper prefixes removed."""
    names = {_clean(name) for name, param in module.named_parameters() if param.requires_grad}
    if any("_flat_param" in n for n in names):
        raise RuntimeError("AdapterOnlyCheckpoint needs parameter names: use FSDPStrategy(use_orig_params=True), Lightning's default")
    return names


def adapter_state_keys(module: pl.LightningModule) -> set[str]:
    """What an adapter-only checkpoint keeps: the trainable tensors plus every peft adapter's weights.

    peft freezes the adapters that are not active (instruction grouping keeps one per group), so
    ``requires_grad`` alone would drop them; their names carry the adapter's name after ``lora_*.`` or
    ``modules_to_save.``.
    """
    keep = trainable_state_keys(module)
    adapters: set[str] = set()
    for sub in module.modules():
        adapters.update(getattr(sub, "peft_config", {}) or {})
    if adapters:
        markers = tuple(f"{kind}.{name}." for name in adapters for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                                                                            "lora_magnitude_vector", "modules_to_save"))
        keep |= {_clean(n) for n, _ in module.named_parameters() if any(m in _clean(n) for m in markers)}
    return keep


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def base_fingerprint(state: dict[str, Any], trainable: set[str], samples_per_tensor: int = 1024) -> list[int]:
    """Byte sums of a strided sample of every frozen tensor, in key order (see module docstring).

    Bytes, not values: packed 4-bit storage read as floats holds NaNs, and NaN never equals itself.
    """
    import torch

    total, weighted, count = 0, 0, 0
    for key in sorted(state):
        value = state[key]
        if key in trainable or not isinstance(value, torch.Tensor) or value.numel() == 0:
            continue
        flat = value.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples_per_tensor)].contiguous().cpu()
        raw = sample.view(torch.uint8).to(torch.int64) if sample.dtype != torch.bool else sample.to(torch.int64)
        total += int(raw.sum())
        weighted += int((raw * torch.arange(1, raw.numel() + 1)).sum())
        count += 1
    return [count, total, weighted]


def _keyed_by_name(model: Any, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """Lightning's positional optimizer state (ids = positions in ``model.parameters()`` now) keyed by names."""
    if not optimizer_state.get("state") or not all(isinstance(k, int) for k in optimizer_state["state"]):
        return optimizer_state
    names = [_clean(n) for n, _ in model.named_parameters()]
    return {
        "state": {names[k]: v for k, v in optimizer_state["state"].items()},
        "param_groups": [dict(g, params=[names[k] for k in g["params"]]) for g in optimizer_state["param_groups"]],
    }


class AdapterOnlyCheckpoint(Callback):
    """Save only trainable parameters in checkpoints (see module docstring); the frozen base is rebuilt on load."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.strict_loading = False  # base keys are absent from the checkpoint by design

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict") or {}
        if not state:  # non-zero FSDP ranks under a full state dict
            return
        keep = adapter_state_keys(pl_module)
        missing = sorted(keep - set(state))
        if missing:
            raise RuntimeError(f"AdapterOnlyCheckpoint: trainable tensors missing from the state dict: {missing[:5]}")
        from lightning.pytorch.strategies import FSDPStrategy

        if not isinstance(trainer.strategy, FSDPStrategy):
            checkpoint["base_fingerprint"] = base_fingerprint(state, keep)
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}
        checkpoint["adapter_only"] = {"kept": len(keep), "dropped": len(state) - len(keep)}

        if isinstance(trainer.strategy, FSDPStrategy):
            checkpoint["optimizer_states"] = [_keyed_by_name(trainer.strategy.model, s) for s in checkpoint.get("optimizer_states", [])]

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict") or {}
        if not state:
            return
        missing = sorted(adapter_state_keys(pl_module) - set(state))
        if missing:
            raise RuntimeError(
                f"the checkpoint lacks {len(missing)} trainable tensor(s) of this model (e.g. {missing[0]}): it was written "
                "for different adapters"
            )
        from lightning.pytorch.strategies import FSDPStrategy

        stored = checkpoint.get("base_fingerprint")
        if stored is not None and not isinstance(trainer.strategy, FSDPStrategy):
            now = base_fingerprint(pl_module.state_dict(), adapter_state_keys(pl_module))
            if now != list(stored):
                from lightning_cit.errors import ConfigError

                raise ConfigError(
                    "this adapter-only checkpoint was trained on another base: the frozen tensors rebuilt now differ from the ones "
                    f"it was saved with (fingerprint {now} vs {list(stored)}); resume with the same model source and seed"
                )


__all__ = ["AdapterOnlyCheckpoint", "adapter_state_keys", "base_fingerprint", "trainable_state_keys"]
