"""Offline demo data: a synthetic instruction set in Alpaca's schema that a tiny model learns on a CPU in minutes.

Tasks a few-million-parameter model can visibly pick up within minutes: copying with a twist (reverse or sort two or
three words, repeat a word), per-word facts (upper case, first letter, letter count) over a 32-word vocabulary, and
single-digit addition and subtraction. Records come with and without ``input``; generation is
deterministic by seed. The demo trains its own SentencePiece tokenizer on this text, cached, so nothing downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from .prompts import format_prompt
from .tokenizer import train_tokenizer

WORDS = (
    "apple river stone cloud tiger music green house light paper window garden bread water ocean forest table "
    "candle silver orange rabbit monkey planet rocket winter summer castle dragon pencil lemon zebra violin"
).split()


def _words(rng: random.Random, lo: int = 2, hi: int = 3) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _record(rng: random.Random) -> dict[str, str]:
    task = rng.randrange(8)
    with_input = rng.random() < 0.5
    if task == 0:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if with_input:
            return {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)}
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
    if task == 1:
        a, b = sorted((rng.randint(0, 9), rng.randint(0, 9)), reverse=True)
        if with_input:
            return {"instruction": "Subtract the second number from the first.", "input": f"{a} and {b}",
                    "output": str(a - b)}
        return {"instruction": f"What is {a} minus {b}?", "input": "", "output": str(a - b)}
    words = _words(rng)
    text = " ".join(words)
    if task == 2:
        instruction, output = "Reverse the order of the words.", " ".join(reversed(words))
    elif task == 3:
        instruction, output = "Sort the words in alphabetical order.", " ".join(sorted(words))
    elif task == 4:
        text = words[0]
        instruction, output = "Convert the word to upper case.", text.upper()
    elif task == 5:
        word = words[0]
        instruction, text, output = "Count the letters in the word.", word, str(len(word))
        if not with_input:
            return {"instruction": f"How many letters are in the word \"{word}\"?", "input": "", "output": output}
    elif task == 6:
        word = words[0]
        instruction, text, output = "Repeat the word three times.", word, " ".join([word] * 3)
        if not with_input:
            return {"instruction": f"Repeat the word \"{word}\" three times.", "input": "", "output": output}
    else:
        text = words[0]
        instruction, output = "Write the first letter of the word.", text[0]
    if with_input:
        return {"instruction": instruction, "input": text, "output": output}
    return {"instruction": f"{instruction} {text}", "input": "", "output": output}


def generate_demo_records(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [_record(rng) for _ in range(n)]


def demo_tokenizer(records: list[dict[str, str]], vocab_size: int, cache_dir: str | Path) -> Path:
    """Train (once, cached by content) the demo's SentencePiece tokenizer on the prompts and responses."""
    texts = [format_prompt(r) + " " + r["output"] for r in records]
    key = hashlib.sha256(json.dumps([vocab_size, texts]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"demo-tokenizer-{vocab_size}-{key}.model"
    if not path.is_file():
        train_tokenizer(texts, vocab_size, path)
    return path


def demo_tokenizer_file(n_records: int, vocab_size: int, cache_dir: str | Path | None) -> Path:
    """The demo tokenizer of ``n_records`` demo records (trained once into the cache)."""
    return demo_tokenizer(generate_demo_records(n_records), vocab_size, cache_dir or default_cache_dir())


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_LORA_CACHE", Path.home() / ".cache" / "llama_lora"))
