"""Write the three toy task files used by ``configs/examples/jsonl_tasks.yaml``.

Deterministic (seeded ``random.Random``, no network, no dependencies): running it again rewrites
byte-identical files. Run from anywhere:

    python configs/examples/data/make_data.py

- ``capitals.jsonl``: ``{"prompt", "response"}`` records; English plurals by suffix rules
  ("Plural of: box" -> "boxes").
- ``antonyms.jsonl``: chat records ``{"messages": [user, assistant]}``; an antonym pair, asked
  in both directions and in a few phrasings.
- ``upper.jsonl``: ``{"question", "answer"}`` records (custom field names, mapped with
  ``prompt_field``/``response_field``); uppercase a short lowercase string.

Every string is ASCII and shorter than 40 characters.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
N = 150
MAX_CHARS = 40

NOUNS = (
    "cat dog car book tree lamp desk cup pen hat bird frog ship road door coat bike key ring "
    "song box bus fox glass dish brush church match wish tax kiss watch bench "
    "city baby party lady story fly berry pony cherry army "
    "day boy toy tray monkey valley donkey"
).split()

ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("old", "new"),
    ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("rich", "poor"), ("wet", "dry"),
    ("loud", "quiet"), ("thick", "thin"), ("strong", "weak"), ("clean", "dirty"), ("near", "far"),
    ("push", "pull"), ("first", "last"), ("left", "right"), ("in", "out"), ("win", "lose"),
]
ANTONYM_TEMPLATES = ("Opposite of {w}?", "Antonym of: {w}", "What is the opposite of {w}?")

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def capitals() -> list[dict]:
    # the noun list is shorter than N: prompts vary in phrasing so every record is distinct
    templates = ("Plural of: {w}", "Plural of {w}?", "Give the plural of {w}")
    pairs = [(t, w) for t in templates for w in NOUNS]
    random.Random("capitals").shuffle(pairs)
    return [{"prompt": t.format(w=w), "response": plural(w)} for t, w in pairs[:N]]


def antonyms() -> list[dict]:
    pairs = ANTONYMS + [(b, a) for a, b in ANTONYMS]
    items = [(t, a, b) for t in ANTONYM_TEMPLATES for a, b in pairs]
    random.Random("antonyms").shuffle(items)
    return [
        {"messages": [{"role": "user", "content": t.format(w=a)}, {"role": "assistant", "content": b}]}
        for t, a, b in items[:N]
    ]


def upper() -> list[dict]:
    rng = random.Random("upper")
    seen: set[str] = set()
    records = []
    while len(records) < N:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        if word in seen:
            continue
        seen.add(word)
        records.append({"question": f"Uppercase: {word}", "answer": word.upper()})
    return records


def write(name: str, records: list[dict]) -> None:
    for record in records:
        for text in _strings(record):
            assert text.isascii() and len(text) < MAX_CHARS, (name, text)
    lines = [json.dumps(r, ensure_ascii=True) for r in records]
    assert len(set(lines)) == len(lines), f"{name}: duplicate records"
    (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} records to {HERE / name}")


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


if __name__ == "__main__":
    write("capitals.jsonl", capitals())
    write("antonyms.jsonl", antonyms())
    write("upper.jsonl", upper())
