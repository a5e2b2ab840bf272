"""Talk to a base model + adapter: `python scripts/generate.py --adapter lightning_logs/demo
"What is 3 plus 5?"`. Prompts come from arguments, --file (one per line, or a JSON list) or stdin.

--mode instruction wraps each prompt in the Alpaca template and prints only the response; --mode completion
continues raw text. --seed_prompts runs the original experiment's four completion prompts. Sampling (--temperature,
--top_p, --top_k) defaults to Llama.generate's; --greedy takes the argmax.
"""

import inspect
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

from llama_lora.adapters import adapter_plan, load_model, open_adapter, resolve_chat_template, resolve_tokenizer
from llama_lora.cli import configure_logging, main_guard, script_arguments
from llama_lora.config import LlamaConfig
from llama_lora.model import Llama, check_sampling
from llama_lora.plan import BaseDtypeName, PrecisionName
from llama_lora.prompts import SEED_PROMPTS, alpaca_as_chat, chat_tokens, end_of_turn, format_prompt

SAMPLING = ("temperature", "top_k", "top_p")  # Llama.generate_stream's own defaults

log = logging.getLogger("generate")


def _sampling_defaults() -> dict[str, Any]:
    params = inspect.signature(Llama.generate_stream).parameters
    return {name: params[name].default for name in SAMPLING}


def read_prompts(prompts: list[str], file: str | None, seed_prompts: bool, input: str) -> list[dict[str, str]]:
    """Prompts as Alpaca records ({instruction, input}); completion mode uses the instruction as raw text."""
    if seed_prompts:
        texts: list = list(SEED_PROMPTS)
    elif prompts:
        texts = list(prompts)
    elif file:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file not found: {path}")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text; give one prompt per line or a JSON list") from None
        if path.suffix == ".json":
            try:
                texts = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
            if not isinstance(texts, list):
                raise ValueError(f"{path}: expected a JSON list of prompts or of {{instruction, input}} records")
        else:
            texts = [line for line in raw.splitlines() if line.strip()]
    else:
        if sys.stdin.isatty():  # a terminal, and no prompt given: say what is awaited rather than seem to hang
            print("Reading prompts from the terminal, one per line; end with Ctrl-D (or give them as arguments, with "
                  "--file or --seed_prompts)", file=sys.stderr, flush=True)
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    records = [t if isinstance(t, dict) else {"instruction": str(t), "input": input} for t in texts]
    if not records:
        raise ValueError("No prompts: give them as arguments, with --file, on stdin, or use --seed_prompts")
    for i, r in enumerate(records):
        if not all(isinstance(r.get(k, ""), str) for k in ("instruction", "input")):
            raise ValueError(f"Prompt {i}: instruction and input must be strings, got {r!r:.80}")
        if not r.get("instruction", "").strip():
            raise ValueError(f"Prompt {i} is empty; give some text to continue or an instruction")
    return records


def check_prompt_lengths(prompts: list[list[int]], context: int) -> None:
    for i, ids in enumerate(prompts):
        if len(ids) >= context:
            raise ValueError(f"Prompt {i} has {len(ids)} tokens, the model's context holds {context}; "
                             "shorten it to leave room for the response")


def generate(prompts: list[str] = [], adapter: str | None = None, checkpoint_dir: str | None = None,  # noqa: B006
             model: str | None = None, tokenizer_path: str | None = None,
             mode: Literal["instruction", "completion"] = "instruction", input: str = "", file: str | None = None,
             chat_template: Literal["llama3", "llama2"] | None = None, system: str | None = None,
             seed_prompts: bool = False, max_new_tokens: int = 128, greedy: bool = False, seed: int = 1234,
             precision: PrecisionName = "auto", base_dtype: BaseDtypeName = "auto", device: str | None = None,
             sampling: dict[str, Any] | None = None) -> None:
    """Generate responses and print them as they come.

    Args:
        prompts: instructions (or texts in completion mode).
        adapter: a fit.py .ckpt or a PEFT adapter folder; none: the base alone.
        checkpoint_dir: base weights (default: the ones the adapter was trained on).
        model: preset (default: the adapter's, or the checkpoint's own config).
        tokenizer_path: tokenizer.model (default: the adapter's, or the one beside the base weights).
        mode: instruction (Alpaca template, or a chat template; the response only) or completion (raw text).
        input: the Alpaca 'input' field for every instruction (in a chat template: after it, in the user's turn).
        chat_template: llama3 or llama2: each prompt a user turn in that template, the response ending at its end of
            turn (default: the template the adapter trained in, if any; else Alpaca's prompt).
        system: a system message before each prompt (chat templates).
        file: prompts: one per line, or a JSON list of strings or {instruction, input} records.
        seed_prompts: the original experiment's four completion prompts.
        max_new_tokens: the longest response.
        greedy: argmax decoding (ignores the sampling settings).
        seed: the sampling seed.
        precision: Lightning's precision to compute in; auto: mixed precision where the hardware computes it
            natively (bf16-mixed), else 32-true (AVX2-only CPUs).
        base_dtype: dtype of the weights; auto: the dtype the compute runs in, on an NF4 base if the adapter was
            trained on one; nf4: 4-bit blocks, the rest in the compute dtype.
        device: cuda or cpu (default: cuda when available).
    """
    sampling = {**(sampling or {}), **({"temperature": 0.0} if greedy else {})}
    check_sampling(max_new_tokens, **{k: sampling.get(k, v) for k, v in _sampling_defaults().items()})
    records = read_prompts(prompts, file, seed_prompts, input)
    mode = "completion" if seed_prompts else mode
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The tokenizer and the prompts' lengths are checked before the base model is loaded.
    trained = open_adapter(adapter, checkpoint_dir, model)
    tok = resolve_tokenizer(tokenizer_path, trained, checkpoint_dir)
    template = resolve_chat_template(chat_template, trained, tok) if mode == "instruction" else None
    if system is not None and template is None:
        raise ValueError("--system is a chat template's system message; give --chat_template llama3 or llama2")
    eos_id = end_of_turn(tok, template) if template else tok.eos_id
    if mode == "instruction":
        log.info("Prompt format: %s", f"the {template} chat template" if template else "Stanford Alpaca's prompt")
    texts = [format_prompt(r) if mode == "instruction" else r["instruction"] for r in records]
    if template:
        head = [{"role": "system", "content": system}] if system is not None else []
        ids = [chat_tokens(head + alpaca_as_chat({**r, "output": ""})[:1], tok, template, add_generation_prompt=True)[0]
               for r in records]
    else:
        ids = [tok.encode(text, bos=True) for text in texts]
    preset = model or (trained.preset if trained else None)
    if preset:
        check_prompt_lengths(ids, LlamaConfig.from_name(preset).max_seq_len)
    plan = adapter_plan(trained, device, precision, base_dtype)
    plan.log()
    loaded = load_model(checkpoint_dir, adapter, model, plan, device)
    if tok.vocab_size != loaded.config.vocab_size:
        raise ValueError(f"The tokenizer has {tok.vocab_size} pieces, the model {loaded.config.vocab_size}; "
                         "use the tokenizer that matches the model")
    check_prompt_lengths(ids, loaded.config.max_seq_len)
    generator = torch.Generator(device=device).manual_seed(seed)
    for text, prompt in zip(texts, ids, strict=True):
        if mode == "completion":
            print(text, end="", flush=True)
        out: list[int] = []
        start = time.perf_counter()
        tokens = loaded.model.generate_stream(prompt, max_new_tokens, eos_id=eos_id, generator=generator,
                                              **sampling)
        for piece in tok.stream(out.append(t) or t for t in tokens):  # whole characters only, as they complete
            print(piece, end="", flush=True)
        seconds = time.perf_counter() - start
        print(flush=True)
        print(f"[{len(out)} tokens, {len(out) / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    args = script_arguments(generate, argv, __doc__, positional="prompts", skip=["sampling"],
                            borrowed=[((Llama, "generate_stream"), SAMPLING)])
    sampling = {k: args.pop(k) for k in SAMPLING}
    generate(**args, sampling=sampling)


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
