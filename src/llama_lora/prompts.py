"""Prompts: Stanford Alpaca's templates, exact to the character, and the seed experiment's completion prompts."""

from __future__ import annotations

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# The original experiment's four completion prompts (Meta's example_text_completion.py).
SEED_PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that",
    "A brief message congratulating the team on the launch:\n\nHi everyone,\n\nI just",
    "Translate English to French:\n\nsea otter => loutre de mer\npeppermint => menthe poivrée\n"
    "plush girafe => girafe peluche\ncheese =>",
]


def format_prompt(record: dict[str, str]) -> str:
    """The Alpaca prompt for a record; an empty or missing ``input`` selects the no-input template."""
    if record.get("input"):
        return PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])
