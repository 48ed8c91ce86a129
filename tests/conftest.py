"""Shared test set-up: offline Hugging Face libraries, an importable ``tests/`` directory, an isolated cache.

``HF_HUB_OFFLINE`` is read when ``huggingface_hub`` is imported, so it is set here, before any test
module imports ``datasets``/``transformers``. ``tests/`` has no ``__init__.py``; it is put on
``sys.path`` explicitly so that ``callable:helpers_sources:<fn>`` task sources and
``helpers_callbacks.*`` class paths import whatever the pytest import mode.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # the aligned base is cached per test session, never in the user's home
    monkeypatch.setenv("LIGHTNING_CIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
