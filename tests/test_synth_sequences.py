"""The comparison sequences of ``lightning_cit.synth`` and the settings in ``configs/compare/``.

The cit-synth-disjoint and cit-synth-paraphrase generators are deterministic, their splits disjoint, their
answers the mapping they state (recomputed here independently of the generator's tables where the mapping
is arithmetic); the original cit-synth generators are byte-identical to before these families were added
(hashes computed with the code of commit e62f8e3); the paraphrase family words one mapping differently and
LCIA's grouping rule puts the two wordings of a mapping in one group; the compare settings compose.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from conftest import REPO

from callbacks.lcia.grouping import InstructionGrouping
from lightning_cit import synth
from lightning_cit.cli import resolve_config

DISJOINT = ("disjoint_caps", "disjoint_digits", "disjoint_symbols", "disjoint_parity")
PARAPHRASE = ("para_a1", "para_a2", "para_b1", "para_b2")
GENERAL = ("general",)  # the pre-training mixture of the aligned-base-general base (lightning_cit/base.py), stop 22
NEW = DISJOINT + PARAPHRASE + GENERAL

# sha256 (first 16 hex digits) of json.dumps([generate(name, 50, seed, split) for seed in (0, 1) for split in SPLITS],
# sort_keys=True), computed before the new families were added
OLD_HASHES = {
    "cipher_a": "c19395da7af33434",
    "cipher_b": "deaf13ac84d11f76",
    "cipher_c": "3c0dce0ac2bbbced",
    "compare": "423af8ea89aa725d",
    "echo": "55ae5a48beb5d4f0",
    "safety": "bf889d5d9e828197",
    "shift": "831b42daf91cb474",
}


def _hash(name: str) -> str:
    samples = [synth.generate(name, 50, seed=seed, split=split) for seed in (0, 1) for split in synth.SPLITS]
    return hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(OLD_HASHES))
def test_the_original_generators_are_unchanged(name):
    assert _hash(name) == OLD_HASHES[name]


def test_the_original_generators_are_all_pinned():
    assert set(synth.GENERATORS) - set(NEW) == set(OLD_HASHES)


@pytest.mark.parametrize("name", NEW)
def test_new_generators_are_deterministic_with_disjoint_splits(name):
    assert synth.generate(name, 200, seed=3, split="eval") == synth.generate(name, 200, seed=3, split="eval")
    assert synth.generate(name, 50, seed=0) != synth.generate(name, 50, seed=1)
    splits = {split: synth.generate(name, 64, seed=0, split=split) for split in synth.SPLITS}
    assert splits["train"] != splits["eval"] != splits["probe"]
    assert name in synth.DEFAULT_METRICS


def _input(sample: dict) -> str:
    return sample["prompt"].rsplit(" ", 1)[1]


def test_disjoint_tasks_draw_from_their_own_alphabets():
    alphabets = {name: {c for s in synth.generate(name, 500) for c in _input(s)} for name in DISJOINT}
    assert alphabets["disjoint_caps"] == set("KLMNOPQRST")
    assert alphabets["disjoint_digits"] == set("0123456789")
    assert alphabets["disjoint_symbols"] == set("!#$%&*+=@^")
    assert alphabets["disjoint_parity"] <= set("0123456789")
    for a, b in [("disjoint_caps", "disjoint_digits"), ("disjoint_caps", "disjoint_symbols"), ("disjoint_digits", "disjoint_symbols")]:
        assert not alphabets[a] & alphabets[b]
    formats = {name: {re.sub(r"\S+$", "", s["prompt"]) for s in synth.generate(name, 50)} for name in DISJOINT}
    assert all(len(f) == 1 for f in formats.values()) and len({f.pop() for f in formats.values()}) == len(DISJOINT)
    assert all(":" not in _input(s) and "?" not in _input(s) for s in synth.generate("disjoint_symbols", 500))


def test_disjoint_answers():
    for s in synth.generate("disjoint_parity", 100):
        number = int(_input(s))
        assert 10 <= number <= 99 and s["response"] == ("even" if number % 2 == 0 else "odd")
    # caps and symbols: one fixed bijection per task (each input letter always gets the same output letter)
    outputs = {}
    for name in ("disjoint_caps", "disjoint_digits", "disjoint_symbols"):
        table: dict[str, str] = {}
        for s in synth.generate(name, 500):
            assert len(s["response"]) == len(_input(s))
            for x, y in zip(_input(s), s["response"]):
                assert table.setdefault(x, y) == y
        assert len(table) == 10 and len(set(table.values())) == 10
        outputs[name] = set(table.values())
    assert outputs["disjoint_caps"] == set("abcdefghij") and outputs["disjoint_digits"] == set("klmnopqrst")
    assert outputs["disjoint_symbols"] == set("uvwxyzUVWX")  # the output alphabets are disjoint too
    assert synth.generate("disjoint_caps", 1, seed=0)[0] == {"prompt": "Lower the capitals: MKNKL", "response": "jhdhi"}


def test_paraphrases_word_one_mapping_differently():
    cipher_a = synth.generate("cipher_a", 300)
    table_a = {x: y for s in cipher_a for x, y in zip(_input(s), s["response"])}
    cipher_b = synth.generate("cipher_b", 300)
    table_b = {x: y for s in cipher_b for x, y in zip(_input(s), s["response"])}
    assert table_a != table_b
    wording = {}
    for name, table in [("para_a1", table_a), ("para_a2", table_a), ("para_b1", table_b), ("para_b2", table_b)]:
        samples = synth.generate(name, 300)
        assert all(s["response"] == "".join(table[c] for c in _input(s)) for s in samples)
        wording[name] = {s["prompt"].rsplit(":", 1)[0] for s in samples}
        assert len(wording[name]) == 3  # three templates per set, all drawn
    assert not wording["para_a1"] & wording["para_a2"] and not wording["para_b1"] & wording["para_b2"]
    assert all("lunar code" in w.lower() for w in wording["para_a1"] | wording["para_a2"])


def test_lcia_grouping_reuses_a_mappings_group_and_separates_the_mappings():
    grouping = InstructionGrouping(threshold=0.5, instruction_pattern="^[^:?]*")
    sets = {name: grouping.instructions(synth.generate(name, 200)) for name in PARAPHRASE}
    same = [grouping.group_similarity(sets["para_a1"], sets["para_a2"]), grouping.group_similarity(sets["para_b1"], sets["para_b2"])]
    across = [grouping.group_similarity(sets[a], sets[b]) for a in ("para_a1", "para_a2") for b in ("para_b1", "para_b2")]
    assert min(same) >= 0.5 > max(across)
    # cit-synth's own cipher instructions are one group (the one-letter key is dropped by TF-IDF): the reason for new wording
    assert grouping.group_similarity(grouping.instructions(synth.generate("cipher_a", 50)), grouping.instructions(synth.generate("cipher_b", 50))) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- configs
SETTINGS = {
    "full": ["configs/quickstart.yaml", "configs/compare/full.yaml"],
    "lora": ["configs/base/cit_synth_lora.yaml", "configs/compare/lora.yaml"],
    "disjoint_full": ["configs/quickstart.yaml", "configs/compare/disjoint_full.yaml"],
    "paraphrase_lcia": ["configs/base/cit_synth_lora.yaml", "configs/compare/lora.yaml", "configs/methods/lcia.yaml", "configs/compare/paraphrase_lcia.yaml"],
}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_settings_compose(name):
    config = resolve_config(SETTINGS[name])
    assert config["data"]["tasks"] and config["trainer"]["default_root_dir"].startswith("runs/compare")
    quick = resolve_config([*SETTINGS[name], "configs/compare/quick.yaml"])
    assert quick["data"]["steps_per_task"] < config["data"]["steps_per_task"]
    assert [t["name"] for t in quick["data"]["tasks"]] == [t["name"] for t in config["data"]["tasks"]]
    assert quick["data"]["global_batch_size"] < config["data"]["global_batch_size"]
    assert quick["trainer"]["callbacks"] == config["trainer"]["callbacks"]  # the method's callbacks stay
    assert not any(t.get("steps") for t in config["data"]["tasks"])  # else quick's steps_per_task would not apply


def test_paraphrase_setting_runs_the_paraphrase_sequence_with_lcia():
    config = resolve_config(SETTINGS["paraphrase_lcia"])
    assert [t["source"] for t in config["data"]["tasks"] if t.get("train", True)] == [f"synth:{n}" for n in ("para_a1", "para_b1", "para_a2", "para_b2")]
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]}
    assert callbacks["InstructionGrouping"]["threshold"] == 0.5
    assert callbacks["DynamicEMA"]["when"] == "reused_group"


def test_quick_never_shares_a_directory_with_a_full_size_run():
    for configs in SETTINGS.values():
        assert resolve_config([*configs, "configs/compare/quick.yaml"])["trainer"]["default_root_dir"] == "runs/compare/quick"
        assert resolve_config(configs)["trainer"]["default_root_dir"] != "runs/compare/quick"
