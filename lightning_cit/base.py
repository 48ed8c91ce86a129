"""The aligned tiny base: the built-in Llama briefly pre-trained on a general mixture plus safety.

It stands in for an aligned chat model at ``cit-synth`` scale: it repeats words on request (the
general mixture), answers benign requests and refuses harmful ones (the safety task). Continual
runs can start from it with full fine-tuning or LoRA (``model: aligned-base``) and watch the safety
behaviour erode. It is trained once per architecture with a plain PyTorch loop (about 20 s on two
cores), saved as a Hugging Face checkpoint directory with its tokenizer, and cached under
``$LIGHTNING_CIT_CACHE`` (default ``~/.cache/lightning-cit``), keyed by the architecture and recipe.

Two recipes, each a model name:

- ``aligned-base``: pre-trained on ``echo`` (repeat a word over a..j) and ``safety``. It never sees a digit, a
  capital or an option letter, so those embeddings stay at their random init; LoRA on the projections cannot move
  them, and ``compare`` (digits, options A/B) stays near chance under LoRA. Kept unchanged so that the results
  made with it (``docs/results/lcia.md``, ``opr.md``, ``jfa.md``) regenerate.
- ``aligned-base-general``: the same plus ``general`` (repeat strings over letters, capitals, digits and
  punctuation) and twice the steps, so every character a cit-synth task uses has a trained embedding. It teaches
  copying only, no task's mapping. The comparison's LoRA settings (``configs/compare/lora.yaml``) start from it.

``lightning-cit prepare-base [--recipe NAME] [--out DIR]`` prepares one ahead of time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

RECIPE = {"mixture": {"echo": 0.5, "safety": 0.5}, "steps": 400, "batch_size": 32, "lr": 1e-3, "seed": 1234, "version": 1}
RECIPES: dict[str, dict] = {
    "aligned-base": RECIPE,
    "aligned-base-general": {**RECIPE, "mixture": {"echo": 0.25, "general": 0.35, "safety": 0.4}, "steps": 800, "version": 2},
}


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(os.path.expanduser(cache_dir or os.environ.get("LIGHTNING_CIT_CACHE") or "~/.cache/lightning-cit"))


def ensure_aligned_base(shape, cache_dir: str | None = None, out: str | None = None, steps: int | None = None,
                        recipe: str = "aligned-base") -> str:
    """Path of the aligned base ``recipe`` (a key of :data:`RECIPES`) for ``shape`` (a
    :class:`~lightning_cit.models.TinyLlama`), trained if absent."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown aligned base {recipe!r}; valid: {', '.join(RECIPES)}")
    chosen = {**RECIPES[recipe], "steps": steps or RECIPES[recipe]["steps"]}
    # the v1 key is unchanged (no name in it), so bases cached before there were two recipes are reused
    keyed = {"shape": asdict(shape), "recipe": chosen}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(out) if out else cache_root(cache_dir) / f"{recipe}-{key}"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        _train(shape, staging, chosen)
        try:
            os.replace(staging, target)  # atomic: a concurrent rank may have won the race
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _train(shape, out: Path, recipe: dict) -> None:
    from lightning_cit import synth
    from lightning_cit.collate import Collator
    from lightning_cit.loss import per_sample_loss
    from lightning_cit.models import build_tiny_llama
    from lightning_cit.tasks import TaskSpec, _normalize

    tokenizer = synth.build_char_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(recipe["seed"])
        model = build_tiny_llama(tokenizer, shape)
    pools = {
        name: [_normalize(TaskSpec(name=name, source=f"synth:{name}"), r, name) for r in synth.generate(name, 2000, seed=99, split="train")]
        for name in recipe["mixture"]
    }
    names, weights = list(recipe["mixture"]), list(recipe["mixture"].values())
    rng = random.Random(recipe["seed"])
    collate = Collator(tokenizer, 256, names)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"])
    steps = recipe["steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    model.train()
    for _ in range(steps):
        batch = collate([rng.choice(pools[rng.choices(names, weights)[0]]) for _ in range(recipe["batch_size"])])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, counts = per_sample_loss(logits, batch["labels"])
        loss = (losses * counts).sum() / counts.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lightning_cit_base.json").write_text(json.dumps({"shape": asdict(shape), "recipe": recipe, "final_loss": float(loss.detach())}, indent=2))


def main(argv: list[str]) -> int:
    from lightning_cit.models import TinyLlama

    parser = argparse.ArgumentParser(prog="lightning-cit prepare-base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="directory to write (default: the cache)")
    parser.add_argument("--cache_dir", default=None, help="cache root (default: $LIGHTNING_CIT_CACHE or ~/.cache/lightning-cit)")
    parser.add_argument("--recipe", default="aligned-base", choices=list(RECIPES), help="which base (default: aligned-base)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    args = parser.parse_args(argv)
    path = ensure_aligned_base(TinyLlama(), cache_dir=args.cache_dir, out=args.out, steps=args.steps, recipe=args.recipe)
    print(path)
    return 0
