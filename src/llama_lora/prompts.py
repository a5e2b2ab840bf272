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


# ----- chat: conversations in a model's chat template -----

CHAT_TEMPLATES = ("llama3", "llama2")
LLAMA2_INST, LLAMA2_SYS = ("[INST]", "[/INST]"), ("<<SYS>>\n", "\n<</SYS>>\n\n")


def default_chat_template(tokenizer) -> str:
    """The chat template of a tokenizer's family: Llama 3's for its tiktoken file, Llama 2's for SentencePiece."""
    return "llama3" if tokenizer.kind == "tiktoken" else "llama2"


def check_conversation(messages: list[dict[str, str]], source: str = "conversation", for_training: bool = True) -> None:
    """An optional system message first, then user and assistant turns alternating from the user (Meta's rule for
    both templates), ending in an assistant turn to train on (or a user turn to answer)."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    roles = [m["role"] for m in turns]
    if not roles or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise ValueError(f"{source}: roles {[m['role'] for m in messages]}: a conversation is an optional system "
                         "message, then user and assistant turns alternating, starting with the user")
    if for_training and roles[-1] != "assistant":
        raise ValueError(f"{source}: the last turn is the user's: nothing to train on (end with the assistant's)")


def chat_tokens(messages: list[dict[str, str]], tokenizer, template: str, add_generation_prompt: bool = False
                ) -> tuple[list[int], list[bool]]:
    """(ids, trained) of a conversation in ``template``: trained marks the assistant turns' tokens, each with the
    template's end of turn, which is what the loss falls on. Special tokens go in by id, contents are stripped and
    tokenized as text (a "<|eot_id|>" typed in a message stays text).

    - llama3 (Meta's ChatFormat): BOS, then per message <|start_header_id|>role<|end_header_id|>, "\\n\\n", the
      content and <|eot_id|>; the generation prompt is the assistant's header.
    - llama2 (Meta's chat_completion): per exchange BOS "[INST] user [/INST]" then " answer " EOS, the system
      message wrapped in <<SYS>> into the first user turn; the generation prompt is the last "[INST] ... [/INST]".
    """
    ids: list[int] = []
    trained: list[bool] = []

    def add(tokens: list[int], train: bool = False) -> None:
        ids.extend(tokens)
        trained.extend([train] * len(tokens))

    if template == "llama3":
        if tokenizer.kind != "tiktoken":
            raise ValueError("The llama3 chat template needs Llama 3's tokenizer (its tiktoken tokenizer.model); with "
                             "a SentencePiece tokenizer use chat_template llama2")
        s = tokenizer.special
        add([s["bos"]])
        turns = messages + ([{"role": "assistant", "content": None}] if add_generation_prompt else [])
        for m in turns:
            add([s["start_header"]] + tokenizer.encode(m["role"]) + [s["end_header"]] + tokenizer.encode("\n\n"))
            if m["content"] is not None:
                add(tokenizer.encode(m["content"].strip()) + [s["eot"]], train=m["role"] == "assistant")
    elif template == "llama2":
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        for i, m in enumerate(turns):
            if m["role"] == "user":  # Meta strips the first user turn with the system message merged into it
                content = m["content"]
                if i == 0 and system is not None:
                    content = f"{LLAMA2_SYS[0]}{system}{LLAMA2_SYS[1]}{content}"
                content = content.strip()
                add(tokenizer.encode(f"{LLAMA2_INST[0]} {content} {LLAMA2_INST[1]}", bos=True))
            else:
                add(tokenizer.encode(f"{m['content'].strip()} ", eos=True), train=True)
    else:
        raise ValueError(f"Unknown chat template {template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    return ids, trained


def end_of_turn(tokenizer, template: str) -> int:
    """The id that ends an assistant turn in ``template``: generation stops there."""
    return tokenizer.special["eot"] if template == "llama3" else tokenizer.eos_id


def alpaca_as_chat(record: dict[str, str]) -> list[dict[str, str]]:
    """An Alpaca record as a conversation, for a chat template chosen for Alpaca data: the instruction (and its input,
    after a blank line) is the user's turn, the output the assistant's."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
