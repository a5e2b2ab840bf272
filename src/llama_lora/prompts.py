"""Prompt formats, one object each: how a training record is rendered and masked, how a generation prompt is built,
where a response stops, and the same format as Jinja (a GGUF's or HF folder's ``chat_template``) and as Ollama's Go
template. Stanford Alpaca's prompt is exact to the character; the chat templates are Meta's (llama3's ChatFormat,
llama2's chat_completion). ``resolve_format`` is the one place a run's format is chosen."""

from __future__ import annotations

from typing import Literal

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

# The names a config or a script takes (data.chat_template); "model": the model's own Jinja template, which its
# tokenizer carries (a GGUF's tokenizer.chat_template; tokenizer_config.json's or chat_template.jinja beside a
# tokenizer.json).
ChatTemplateName = Literal["llama3", "llama2", "chatml", "model"]
CHAT_TEMPLATES: tuple[str, ...] = ChatTemplateName.__args__
PromptFormatName = Literal["alpaca", "llama3", "llama2", "chatml", "model"]  # generate.py: Alpaca's prompt too
LLAMA2_INST, LLAMA2_SYS = ("[INST]", "[/INST]"), ("<<SYS>>\n", "\n<</SYS>>\n\n")

Messages = list[dict[str, str]]


def format_prompt(record: dict[str, str]) -> str:
    """The Alpaca prompt for a record; an empty or missing ``input`` selects the no-input template."""
    if record.get("input"):
        return PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def alpaca_as_chat(record: dict[str, str]) -> Messages:
    """An Alpaca record as a conversation, for a chat template chosen for Alpaca data: the instruction (and its input,
    after a blank line) is the user's turn, the output (if any) the assistant's."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    answer = [{"role": "assistant", "content": record["output"]}] if "output" in record else []
    return [{"role": "user", "content": user}, *answer]


def check_conversation(messages: Messages, source: str = "conversation", for_training: bool = True) -> None:
    """An optional system message first, then user and assistant turns alternating from the user (Meta's rule for
    both templates), ending in an assistant turn to train on (or a user turn to answer)."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    roles = [m["role"] for m in turns]
    if not roles or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise ValueError(f"{source}: roles {[m['role'] for m in messages]}: a conversation is an optional system "
                         "message, then user and assistant turns alternating, starting with the user")
    if for_training and roles[-1] != "assistant":
        raise ValueError(f"{source}: the last turn is the user's: nothing to train on (end with the assistant's)")


class PromptFormat:
    """A prompt format. ``render`` gives a training record's ids and which of them the loss falls on; ``prompt`` the
    ids a generation starts from; ``stop_id`` where a response ends; ``jinja`` and ``ollama`` the same format for
    llama.cpp / HF (a ``chat_template``) and for an Ollama Modelfile (Go template, stop strings)."""

    name: str
    description: str

    def check(self, tokenizer) -> None:
        """Refuse, in one line, a tokenizer this format cannot be written with."""

    def render(self, record: dict, tokenizer) -> tuple[list[int], list[bool]]:
        raise NotImplementedError

    def prompt(self, record: dict[str, str], tokenizer, system: str | None = None) -> list[int]:
        """The ids a response to ``record`` ({instruction, input}) is generated after."""
        raise NotImplementedError

    def stop_id(self, tokenizer) -> int:
        return tokenizer.eos_id

    jinja: str
    ollama: tuple[str, list[str]]

    def __repr__(self) -> str:
        return f"PromptFormat({self.name})"


class Alpaca(PromptFormat):
    """Stanford Alpaca's prompt: BOS + prompt, then the response + EOS, tokenized separately so that the prompt's
    tokens are exactly a prefix (SentencePiece would otherwise merge across the boundary)."""

    name, description = "alpaca", "Stanford Alpaca's prompt"

    def render(self, record: dict, tokenizer) -> tuple[list[int], list[bool]]:
        prompt = self.prompt(record, tokenizer)
        target = tokenizer.encode(record["output"], eos=True)  # an empty output still trains on EOS
        return prompt + target, [False] * len(prompt) + [True] * len(target)

    def prompt(self, record: dict[str, str], tokenizer, system: str | None = None) -> list[int]:
        if system is not None:
            raise ValueError("--system is a chat template's system message; Alpaca's prompt has none (give "
                             "--chat_template llama3 or llama2)")
        return tokenizer.encode(format_prompt(record), bos=True)

    @property
    def jinja(self) -> str:
        """As a Jinja chat template: a system message is the Alpaca input, each user message an instruction, each
        assistant message a response ending in EOS. BOS is the tokenizer's to add (add_bos_token), as in training."""
        with_input = PROMPT_INPUT.format(instruction="{{ message['content'] }}", input="{{ ns.input }}")
        without = PROMPT_NO_INPUT.format(instruction="{{ message['content'] }}")
        return ("{%- set ns = namespace(input='') -%}"
                "{%- for message in messages -%}"
                "{%- if message['role'] == 'system' -%}{%- set ns.input = message['content'] -%}"
                f"{{%- elif message['role'] == 'user' -%}}{{%- if ns.input -%}}{with_input}{{%- else -%}}{without}"
                "{%- endif -%}"
                "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + eos_token }}"
                "{%- endif -%}"
                "{%- endfor -%}")

    @property
    def ollama(self) -> tuple[str, list[str]]:
        """The Alpaca "input", if any, goes in the system message."""
        with_input = PROMPT_INPUT.format(instruction="{{ .Prompt }}", input="{{ .System }}")
        without = PROMPT_NO_INPUT.format(instruction="{{ .Prompt }}")
        return f"{{{{ if .System }}}}{with_input}{{{{ else }}}}{without}{{{{ end }}}}", ["</s>", "### Instruction:"]


class ChatFormat(PromptFormat):
    """A chat template: a conversation (``{"messages": ...}``, or an Alpaca record as a two-turn one) with the loss on
    each assistant turn and its end of turn. Special tokens go in by id, contents are stripped and tokenized as text
    (a "<|eot_id|>" typed in a message stays text)."""

    def tokens(self, messages: Messages, tokenizer, add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        raise NotImplementedError

    def render(self, record: dict, tokenizer) -> tuple[list[int], list[bool]]:
        return self.tokens(record["messages"] if "messages" in record else alpaca_as_chat(record), tokenizer)

    def prompt(self, record: dict[str, str], tokenizer, system: str | None = None) -> list[int]:
        head = [{"role": "system", "content": system}] if system is not None else []
        turn = alpaca_as_chat({"instruction": record["instruction"], "input": record.get("input", "")})
        return self.tokens(head + turn, tokenizer, add_generation_prompt=True)[0]


class Llama3Chat(ChatFormat):
    """Meta's ChatFormat: BOS, then per message <|start_header_id|>role<|end_header_id|>, "\\n\\n", the content and
    <|eot_id|>; the generation prompt is the assistant's header."""

    name, description = "llama3", "the llama3 chat template"
    jinja = ("{%- for message in messages -%}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
             "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor -%}{%- if add_generation_prompt -%}"
             "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}")
    ollama = ("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
              "<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n", ["<|eot_id|>"])

    def check(self, tokenizer) -> None:
        if not {"eot", "start_header", "end_header"} <= tokenizer.special.keys():
            raise ValueError("The llama3 chat template needs Llama 3's tokenizer (its tiktoken tokenizer.model or "
                             "tokenizer.json); with a SentencePiece tokenizer use chat_template llama2")

    def tokens(self, messages: Messages, tokenizer, add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        self.check(tokenizer)
        s, ids, trained = tokenizer.special, [tokenizer.special["bos"]], [False]
        for m in messages + ([{"role": "assistant", "content": None}] if add_generation_prompt else []):
            head = [s["start_header"]] + tokenizer.encode(m["role"]) + [s["end_header"]] + tokenizer.encode("\n\n")
            ids += head
            trained += [False] * len(head)
            if m["content"] is not None:
                body = tokenizer.encode(m["content"].strip()) + [s["eot"]]
                ids += body
                trained += [m["role"] == "assistant"] * len(body)
        return ids, trained

    def stop_id(self, tokenizer) -> int:
        self.check(tokenizer)
        return tokenizer.special["eot"]


class Llama2Chat(ChatFormat):
    """Meta's chat_completion: per exchange BOS "[INST] user [/INST]" then " answer " EOS, the system message wrapped
    in <<SYS>> into the first user turn; the generation prompt is the last "[INST] ... [/INST]"."""

    name, description = "llama2", "the llama2 chat template"
    # BOS is the tokenizer's to add (add_bos_token) at the start, as in training; later ones are written out.
    jinja = ("{%- set ns = namespace(system=none) -%}{%- if messages[0]['role'] == 'system' -%}"
             "{%- set ns.system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}{%- endif -%}"
             "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
             "{%- set content = message['content'] -%}{%- if loop.first and ns.system is not none -%}"
             "{%- set content = '<<SYS>>\n' + ns.system + '\n<</SYS>>\n\n' + content -%}{%- endif -%}"
             "{%- if not loop.first -%}{{ bos_token }}{%- endif -%}{{ '[INST] ' + content | trim + ' [/INST]' }}"
             "{%- else -%}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif -%}{%- endfor -%}")
    ollama = ("[INST] {{ if .System }}<<SYS>>\n{{ .System }}\n<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST]", ["</s>"])

    def tokens(self, messages: Messages, tokenizer, add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        ids: list[int] = []
        trained: list[bool] = []
        for i, m in enumerate(messages[1:] if system is not None else messages):
            if m["role"] == "user":  # Meta strips the first user turn with the system message merged into it
                content = m["content"]
                if i == 0 and system is not None:
                    content = f"{LLAMA2_SYS[0]}{system}{LLAMA2_SYS[1]}{content}"
                part = tokenizer.encode(f"{LLAMA2_INST[0]} {content.strip()} {LLAMA2_INST[1]}", bos=True)
            else:
                part = tokenizer.encode(f"{m['content'].strip()} ", eos=True)
            ids += part
            trained += [m["role"] == "assistant"] * len(part)
        return ids, trained


def jinja_package():
    """jinja2, imported here only, or one line that says how to get it."""
    try:
        import jinja2.sandbox
    except ImportError:
        raise ValueError('A model\'s own chat template needs jinja2: pip install -e ".[tokenizers]", or pip install '
                         "jinja2") from None
    return jinja2


class ModelChat(ChatFormat):
    """The model's own chat template (Jinja, from its tokenizer_config.json, chat_template.jinja or GGUF), rendered
    as transformers renders it: a sandboxed environment with ``raise_exception``, ``bos_token``, ``eos_token`` and
    ``add_generation_prompt``, the text then tokenized whole with its special tokens parsed. The loss falls on each
    assistant turn as the template writes it, up to and with its end-of-turn token: the span between the conversation
    rendered up to the turn's generation prompt and rendered through the turn."""

    name, description, ollama = "model", "the model's own chat template", None

    def __init__(self, template: str, source: str = "the model") -> None:
        self.jinja, self.source = template, source
        jinja2 = jinja_package()

        def raise_exception(message: str) -> None:
            raise ValueError(f"{source}: the chat template says: {message}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.compiled = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ValueError(f"{source}: the chat template is not valid Jinja ({e})") from None

    def check(self, tokenizer) -> None:
        if not hasattr(tokenizer, "encode_rendered"):
            raise ValueError(f"{self.source}: the model's own chat template writes its special tokens as text, which "
                             "its own tokenizer (tokenizer.json or the GGUF's) parses; give that with --tokenizer_path")

    def render_text(self, messages: Messages, tokenizer, add_generation_prompt: bool = False) -> str:
        return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=tokenizer.token_text(tokenizer.bos_id) or "",
                                    eos_token=tokenizer.token_text(tokenizer.eos_id) or "")

    def tokens(self, messages: Messages, tokenizer, add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        self.check(tokenizer)
        text = self.render_text(messages, tokenizer, add_generation_prompt)
        ids, offsets = tokenizer.encode_rendered(text)
        stop = tokenizer.token_text(self.stop_id(tokenizer))
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant" or add_generation_prompt:
                continue
            before = self.render_text(messages[:k], tokenizer, add_generation_prompt=True)
            through = self.render_text(messages[: k + 1], tokenizer)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(f"{self.source}: the chat template cannot be split into turns (the conversation "
                                 "rendered up to an answer is not a prefix of it rendered whole), so the loss cannot "
                                 "fall on the answers alone; choose --data.chat_template")
            end = through.find(stop, len(before)) if stop else -1
            spans.append((len(before), end + len(stop) if end >= 0 else len(through.rstrip())))
        trained = [any(a <= lo and hi <= b for a, b in spans) for lo, hi in offsets]
        return ids, trained

    def stop_id(self, tokenizer) -> int:
        return tokenizer.special.get("eot", tokenizer.eos_id)


class ChatML(ModelChat):
    """ChatML (Qwen's, SmolLM's and many others'): per message <|im_start|>role, a newline, the content, <|im_end|> and
    a newline; the generation prompt is the assistant's header. Rendered and masked as a model's own template is, so
    it needs a tokenizer that has the two tokens (a tokenizer.json or GGUF)."""

    name, description = "chatml", "the ChatML chat template"
    START, END = "<|im_start|>", "<|im_end|>"
    TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
    ollama = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n"
              "{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n", ["<|im_end|>"])

    def __init__(self) -> None:
        self.jinja, self.source, self.compiled = self.TEMPLATE, "chatml", None

    def render_text(self, messages: Messages, tokenizer, add_generation_prompt: bool = False) -> str:
        if self.compiled is None:  # jinja2 is an optional extra: compiled when first used
            super().__init__(self.TEMPLATE, "chatml")
        return super().render_text(messages, tokenizer, add_generation_prompt)

    def check(self, tokenizer) -> None:
        super().check(tokenizer)
        if any(tokenizer.token_id(t) is None for t in (self.START, self.END)):
            raise ValueError(f"The chatml chat template needs a tokenizer with {self.START} and {self.END} tokens; "
                             f"{tokenizer.path.name} has none: choose another data.chat_template")

    def stop_id(self, tokenizer) -> int:
        return tokenizer.token_id(self.END)


FORMATS: dict[str, PromptFormat] = {f.name: f for f in (Alpaca(), Llama3Chat(), Llama2Chat(), ChatML())}


def resolve_format(data_format: str | None = None, chat_template: str | None = None, tokenizer=None) -> PromptFormat:
    """The one rule for a run's prompt format: the chat template chosen ("model": the one the tokenizer carries),
    else for chat data the model's own where its tokenizer carries one, else the tokenizer family's (llama3 for Llama
    3's tiktoken file, llama2 for SentencePiece), else Alpaca's prompt (instruction data; text runs are prompted in
    it too)."""
    if chat_template is None and data_format == "chat":
        own = tokenizer is not None and tokenizer.chat_template is not None
        if own and isinstance(model_format(tokenizer), ChatFormat):  # not a merged Alpaca run's template
            chat_template = "model"
        else:
            chat_template = "llama3" if tokenizer is not None and "eot" in tokenizer.special else "llama2"
    name = chat_template or "alpaca"
    if name == "model":
        fmt = model_format(tokenizer)
    elif name in FORMATS:
        fmt = FORMATS[name]
    else:
        raise ValueError(f"Unknown prompt format {name!r}; choose one of {', '.join(CHAT_TEMPLATES)} (or none for "
                         "Alpaca's prompt)")
    if data_format == "chat" and not isinstance(fmt, ChatFormat):
        raise ValueError(f"chat data needs a chat template, and chat_template {name} is {fmt.description}; choose "
                         f"{', '.join(t for t in CHAT_TEMPLATES if t != 'model')}")
    if tokenizer is not None:
        fmt.check(tokenizer)
    return fmt


def model_format(tokenizer) -> PromptFormat:
    """The model's own chat template, as its tokenizer carries it (one of this project's where it wrote it)."""
    template = tokenizer.chat_template if tokenizer is not None else None
    if template is None:
        where = tokenizer.path if tokenizer is not None else "the run's tokenizer"
        raise ValueError(f"chat_template model: {where} carries no chat template (a GGUF's tokenizer.chat_template, "
                         "or tokenizer_config.json's or chat_template.jinja beside a tokenizer.json); choose "
                         f"{', '.join(t for t in CHAT_TEMPLATES if t != 'model')}")
    return format_of_jinja(template) or ModelChat(template, str(tokenizer.path))


def format_of_jinja(text: str) -> PromptFormat | None:
    """The format whose Jinja ``text`` is (a template this project wrote beside a model or adapter), or None."""
    return next((f for f in FORMATS.values() if f.jinja == text), None)


def chat_tokens(messages: Messages, tokenizer, template: str, add_generation_prompt: bool = False
                ) -> tuple[list[int], list[bool]]:
    """(ids, trained) of a conversation in chat template ``template`` (see ``ChatFormat``)."""
    fmt = FORMATS.get(template)
    if not isinstance(fmt, ChatFormat):
        raise ValueError(f"Unknown chat template {template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    return fmt.tokens(messages, tokenizer, add_generation_prompt)
