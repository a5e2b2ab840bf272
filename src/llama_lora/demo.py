"""The offline demo's synthetic world: facts about numbers and 32 words, told two ways.

- As plain prose (``prose``), the text a small base model is pretrained on: "7 plus 5 is 12.", "A lemon is a kind of
  fruit.", "The word garden has 6 letters." The base learns the facts, never the Alpaca template.
- As Alpaca instructions (``instruction_records``): "What is 7 plus 5?", "Name the colour of the thing. lemon". LoRA on
  the frozen base learns to answer them. The facts are split by (task, item): the instructions held out for the
  exact-match test (``heldout_records``) ask about facts that no training instruction asks about, so a right answer
  there is knowledge of the base, put to use by the adapter.

Everything is deterministic by seed; the demo trains its own SentencePiece tokenizer on this text, cached, so nothing
downloads.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from .cache import default_cache_dir
from .prompts import format_prompt
from .tokenizer import train_tokenizer

# word: (kind, colour)
WORDS = {
    "apple": ("fruit", "red"), "lemon": ("fruit", "yellow"), "orange": ("fruit", "orange"),
    "banana": ("fruit", "yellow"), "cherry": ("fruit", "red"), "grape": ("fruit", "purple"),
    "tiger": ("animal", "orange"), "zebra": ("animal", "white"), "rabbit": ("animal", "brown"),
    "monkey": ("animal", "brown"), "dragon": ("animal", "green"), "frog": ("animal", "green"),
    "river": ("place", "blue"), "ocean": ("place", "blue"), "forest": ("place", "green"),
    "garden": ("place", "green"), "castle": ("place", "grey"), "desert": ("place", "yellow"),
    "stone": ("thing", "grey"), "cloud": ("thing", "white"), "paper": ("thing", "white"),
    "window": ("thing", "clear"), "table": ("thing", "brown"), "candle": ("thing", "white"),
    "pencil": ("tool", "yellow"), "hammer": ("tool", "grey"), "ladder": ("tool", "brown"),
    "violin": ("instrument", "brown"), "drum": ("instrument", "red"), "flute": ("instrument", "silver"),
    "rocket": ("vehicle", "silver"), "boat": ("vehicle", "blue"),
}
HELDOUT = 100  # facts whose instructions are kept for the exact-match test
WORD_FACT_WEIGHT = 3  # word facts are arbitrary associations: the prose repeats them 3x as often as arithmetic

Fact = tuple[str, object, str]  # (task, item, answer)


def facts() -> list[Fact]:
    """Every fact of the world: single-digit sums and differences, and four facts per word."""
    out: list[Fact] = []
    for a in range(10):
        for b in range(10):
            out.append(("add", (a, b), str(a + b)))
            if a >= b:
                out.append(("sub", (a, b), str(a - b)))
    for word, (kind, colour) in WORDS.items():
        out += [("count", word, str(len(word))), ("first", word, word[0]), ("kind", word, kind),
                ("colour", word, colour)]
    return out


# Prose: each fact in three phrasings, item first and answer last.
_PROSE = {
    "add": ("{a} plus {b} is {x}.", "Adding {a} and {b} gives {x}.", "The sum of {a} and {b} is {x}."),
    "sub": ("{a} minus {b} is {x}.", "{a} take away {b} leaves {x}.", "The difference of {a} and {b} is {x}."),
    "count": ("The word {w} has {x} letters.", "{w} is spelled with {x} letters.", "Spelling {w} takes {x} letters."),
    "first": ("The word {w} starts with {x}.", "{w} begins with the letter {x}.", "The first letter of {w} is {x}."),
    "kind": ("A {w} is a kind of {x}.", "The {w} is a {x}.", "Every {w} is a {x}."),
    "colour": ("A {w} is {x}.", "The colour of a {w} is {x}.", "Each {w} looks {x}."),
}
# Instructions: each task in two Alpaca forms, without and with an input.
_INSTRUCTIONS = {
    "add": (("What is {a} plus {b}?", ""), ("Add the two numbers.", "{a} and {b}")),
    "sub": (("What is {a} minus {b}?", ""), ("Subtract the second number from the first.", "{a} and {b}")),
    "count": (('How many letters are in the word "{w}"?', ""), ("Count the letters in the word.", "{w}")),
    "first": (("What is the first letter of {w}?", ""), ("Write the first letter of the word.", "{w}")),
    "kind": (("What kind of thing is a {w}?", ""), ("Name the category of the word.", "{w}")),
    "colour": (("What colour is a {w}?", ""), ("Name the colour of the thing.", "{w}")),
}


def _fields(item: object, answer: str) -> dict[str, object]:
    if isinstance(item, tuple):
        return {"a": item[0], "b": item[1], "x": answer}
    return {"w": item, "x": answer}


def prose(n_documents: int = 2000, seed: int = 0) -> list[str]:
    """Plain-text documents of 8 fact sentences each, drawn with the word facts weighted up."""
    rng = random.Random(seed)
    pool = []
    for task, item, answer in facts():
        sentences = [s.format(**_fields(item, answer)) for s in _PROSE[task]]
        pool += sentences * (WORD_FACT_WEIGHT if task in ("count", "first", "kind", "colour") else 1)
    return [" ".join(rng.sample(pool, 8)) for _ in range(n_documents)]


def _split(seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    order = facts()
    random.Random(seed).shuffle(order)
    return order[HELDOUT:], order[:HELDOUT]


def _record(task: str, item: object, answer: str, form: int) -> dict[str, str]:
    instruction, input = _INSTRUCTIONS[task][form]
    fields = _fields(item, answer)
    return {"instruction": instruction.format(**fields), "input": input.format(**fields), "output": answer}


def instruction_records(n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca records for the training facts, both forms of each (the first ``n`` of a seeded shuffle)."""
    train, _ = _split()
    records = [_record(task, item, answer, form) for task, item, answer in train for form in (0, 1)]
    random.Random(seed).shuffle(records)
    return records[:n] if n is not None else records


def heldout_records() -> list[dict[str, str]]:
    """One instruction for each held-out fact (the form alternates): none of these facts is asked in training."""
    _, held = _split()
    return [_record(task, item, answer, i % 2) for i, (task, item, answer) in enumerate(held)]


def _wrong_answer(task: str, item: object, answer: str, rng: random.Random) -> str:
    """A plausible wrong answer of the same kind: a nearby number, another letter of the alphabet, another kind or
    colour of the world."""
    if task in ("add", "sub", "count"):
        return str(rng.choice([x for x in range(int(answer) - 2, int(answer) + 3) if x >= 0 and x != int(answer)]))
    if task == "first":
        return rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != answer])
    pool = sorted({kind if task == "kind" else colour for kind, colour in WORDS.values()} - {answer})
    return rng.choice(pool)


def _pair(task: str, item: object, answer: str, form: int, rng: random.Random) -> dict[str, str]:
    record = _record(task, item, answer, form)
    return {"instruction": record["instruction"], "input": record["input"], "chosen": answer,
            "rejected": _wrong_answer(task, item, answer, rng)}


def preference_records(n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs on the training facts, both forms of each: the world's answer chosen, a plausible wrong one
    rejected (the first ``n`` of a seeded shuffle)."""
    train, _ = _split()
    rng = random.Random(f"pairs-{seed}")
    records = [_pair(task, item, answer, form, rng) for task, item, answer in train for form in (0, 1)]
    random.Random(seed).shuffle(records)
    return records[:n] if n is not None else records


def heldout_preference_records() -> list[dict[str, str]]:
    """One pair for each held-out fact (``heldout_records``' instructions): the held-out preference accuracy."""
    _, held = _split()
    rng = random.Random("heldout-pairs")
    return [_pair(task, item, answer, i % 2, rng) for i, (task, item, answer) in enumerate(held)]


def demo_tokenizer_file(vocab_size: int, cache_dir: str | Path | None = None) -> Path:
    """The demo's SentencePiece tokenizer, trained (once, cached by content) on its prose and instructions."""
    records = instruction_records() + heldout_records()
    texts = prose(300) + [format_prompt(r) + " " + r["output"] for r in records]
    key = hashlib.sha256(json.dumps([vocab_size, texts]).encode()).hexdigest()[:12]
    path = Path(cache_dir or default_cache_dir()) / f"demo-tokenizer-{vocab_size}-{key}.model"
    if not path.is_file():
        train_tokenizer(texts, vocab_size, path)
    return path

