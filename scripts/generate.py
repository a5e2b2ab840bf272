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

from llama_lora.cli import configure_logging, main_guard, script_arguments
from llama_lora.model import Llama, check_sampling
from llama_lora.plan import BaseDtypeName, PrecisionName, resolve_device
from llama_lora.prompts import SEED_PROMPTS, PromptFormatName
from llama_lora.trained_run import open_run

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
             chat_template: PromptFormatName | None = None, system: str | None = None,
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
            turn; alpaca: Alpaca's prompt (default: the format the adapter trained in, else the one a merged model,
            PEFT folder or GGUF carries, a model's own Jinja template included; else Alpaca's prompt).
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
        device: cuda or cpu (default: cuda when there is a GPU).
    """
    sampling = {**(sampling or {}), **({"temperature": 0.0} if greedy else {})}
    check_sampling(max_new_tokens, **{k: sampling.get(k, v) for k, v in _sampling_defaults().items()})
    records = read_prompts(prompts, file, seed_prompts, input)
    mode = "completion" if seed_prompts else mode
    if system is not None and mode == "completion":
        raise ValueError("--system is a chat template's system message; completion mode continues raw text")
    # The run, its tokenizer and prompt format, and the prompts' lengths, before the base model is loaded.
    run = open_run(adapter, checkpoint_dir, model, tokenizer_path, chat_template)
    tok = run.tokenizer()
    fmt = run.prompt_format
    if mode == "instruction":
        fmt.check(tok)
        log.info("Prompt format: %s%s", fmt.description, f" (from {run.format_source})" if run.format_source else "")
        ids = [fmt.prompt(r, tok, system) for r in records]
    else:
        ids = [tok.encode(r["instruction"], bos=True) for r in records]
    if run.config is not None:
        check_prompt_lengths(ids, run.config.max_seq_len)
    device = resolve_device(device)
    plan = run.plan_for(device, precision, base_dtype)
    plan.log()
    llama = run.build(plan, device)
    tok.check_fits(llama.config.vocab_size)
    check_prompt_lengths(ids, llama.config.max_seq_len)
    eos_id = fmt.stop_id(tok) if mode == "instruction" else tok.eos_id
    generator = torch.Generator(device=device).manual_seed(seed)
    for record, prompt in zip(records, ids, strict=True):
        if mode == "completion":
            print(record["instruction"], end="", flush=True)
        out: list[int] = []
        start = time.perf_counter()
        tokens = llama.generate_stream(prompt, max_new_tokens, eos_id=eos_id, generator=generator, **sampling)
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
