"""Merge a LoRA adapter into its base and write a plain checkpoint:
`python scripts/merge.py --adapter lightning_logs/lora_amp/checkpoints/last.ckpt --out merged --format hf`.

The merge runs in fp32 (the base is loaded in fp32), then the result is cast to --dtype.
"""

import argparse
import sys

import torch

from llama_lora.adapters import load_model, merged_state_dict
from llama_lora.cli import configure_logging, main_guard
from llama_lora.module import DTYPES
from llama_lora.weights import save_hf, save_meta


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="fit.py .ckpt or PEFT adapter folder")
    p.add_argument("--checkpoint_dir", help="base weights (default: the one the adapter was trained on)")
    p.add_argument("--model", help="preset (default: the adapter's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["meta", "hf"], default="hf",
                   help="meta: consolidated.00.pth + params.json; hf: safetensors + config.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = p.parse_args(argv)
    loaded = load_model(args.checkpoint_dir, args.adapter, args.model, torch.float32)
    sd = merged_state_dict(loaded.model, DTYPES[args.dtype])
    (save_meta if args.format == "meta" else save_hf)(sd, loaded.config, args.out)
    print(f"wrote {args.format} checkpoint ({args.dtype}) to {args.out}")


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
