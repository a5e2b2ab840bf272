"""Talk to a base model + adapter: `python scripts/generate.py --adapter lightning_logs/demo/checkpoints/last.ckpt
"What is 3 plus 5?"`. Prompts come from arguments, --file (one per line, or a JSON list) or stdin.

--mode instruction wraps each prompt in the Alpaca template and prints only the response; --mode completion
continues raw text. --seed-prompts runs the original experiment's four completion prompts.
"""

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from llama_lora.adapters import load_model, read_adapter
from llama_lora.cli import configure_logging, main_guard
from llama_lora.config import LlamaConfig
from llama_lora.data import AlpacaDataModule, format_prompt
from llama_lora.module import DTYPES
from llama_lora.tokenizer import Tokenizer

SEED_PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that",
    "A brief message congratulating the team on the launch:\n\nHi everyone,\n\nI just",
    "Translate English to French:\n\nsea otter => loutre de mer\npeppermint => menthe poivrée\n"
    "plush girafe => girafe peluche\ncheese =>",
]


def read_prompts(args: argparse.Namespace) -> list[dict[str, str]]:
    """Prompts as Alpaca records ({instruction, input}); completion mode uses the instruction as raw text."""
    if args.seed_prompts:
        args.mode = "completion"
        texts: list = list(SEED_PROMPTS)
    elif args.prompts:
        texts = list(args.prompts)
    elif args.file:
        path = Path(args.file)
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
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    records = [t if isinstance(t, dict) else {"instruction": str(t), "input": args.input} for t in texts]
    if not records:
        raise ValueError("No prompts: give them as arguments, with --file, on stdin, or use --seed-prompts")
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


def load_tokenizer(args: argparse.Namespace, datamodule_hparams: dict) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer(args.tokenizer)
    if datamodule_hparams:  # the tokenizer the adapter was trained with (the demo's is rebuilt from its cache)
        known = inspect.signature(AlpacaDataModule).parameters  # LightningCLI also saves its own keys
        return AlpacaDataModule(**{k: v for k, v in datamodule_hparams.items() if k in known}).load_tokenizer()
    if args.checkpoint_dir:
        return Tokenizer(Path(args.checkpoint_dir) / "tokenizer.model")
    raise ValueError("Say which tokenizer to use: --tokenizer path/to/tokenizer.model")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="instructions (or texts in completion mode)")
    p.add_argument("--adapter", help="fit.py .ckpt or PEFT adapter folder; none: the base alone")
    p.add_argument("--checkpoint_dir", help="base weights (default: the one the adapter was trained on)")
    p.add_argument("--model", help="preset (default: the adapter's, or the checkpoint's own config)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the adapter's, or checkpoint_dir/tokenizer.model)")
    p.add_argument("--mode", choices=["instruction", "completion"], default="instruction")
    p.add_argument("--input", default="", help="the Alpaca 'input' field for every instruction")
    p.add_argument("--file", help="prompts: one per line, or a JSON list of strings or {instruction, input}")
    p.add_argument("--seed-prompts", action="store_true", help="the original experiment's four completion prompts")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--base_dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    records = read_prompts(args)
    # The tokenizer and the prompts' lengths are checked before the base model is loaded.
    trained = read_adapter(args.adapter) if args.adapter and Path(args.adapter).is_file() else None
    hparams, datamodule_hparams = (trained.hparams, trained.datamodule_hparams) if trained else ({}, {})
    tok = load_tokenizer(args, datamodule_hparams)
    texts = [format_prompt(r) if args.mode == "instruction" else r["instruction"] for r in records]
    prompts = [[tok.bos_id] + tok.encode(text) for text in texts]
    preset = args.model or hparams.get("model")
    if preset:
        check_prompt_lengths(prompts, LlamaConfig.from_name(preset).max_seq_len)
    loaded = load_model(args.checkpoint_dir, args.adapter, args.model, DTYPES[args.base_dtype], args.device)
    if tok.vocab_size != loaded.config.vocab_size:
        raise ValueError(f"The tokenizer has {tok.vocab_size} pieces, the model {loaded.config.vocab_size}; "
                         "use the tokenizer that matches the model")
    check_prompt_lengths(prompts, loaded.config.max_seq_len)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for text, ids in zip(texts, prompts, strict=True):
        if args.mode == "completion":
            print(text, end="", flush=True)
        out: list[int] = []
        shown, start = "", time.perf_counter()
        stream = loaded.model.generate_stream(
            ids, args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
            top_p=args.top_p, eos_id=tok.eos_id, generator=generator)
        for token in stream:
            out.append(token)
            decoded = tok.decode(out)  # decode the whole reply: SentencePiece spaces depend on the neighbours
            print(decoded[len(shown):], end="", flush=True)
            shown = decoded
        seconds = time.perf_counter() - start
        print(flush=True)
        print(f"[{len(out)} tokens, {len(out) / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr, flush=True)


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
