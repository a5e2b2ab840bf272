"""Merge a LoRA adapter into its base and write a plain checkpoint:
`python scripts/merge.py --adapter lightning_logs/lora_amp/checkpoints/last.ckpt --out merged --format hf`.

Tensor by tensor from the memory-mapped base: each update in fp32, folded into its weight and cast once. The peak is
the base in its dtype plus one layer. --dtype (default: the base's own) sets the written dtype.
"""

import argparse
import sys

from llama_lora.adapters import merge_adapter
from llama_lora.cli import configure_logging, main_guard
from llama_lora.module import DTYPES


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="fit.py .ckpt or PEFT adapter folder")
    p.add_argument("--checkpoint_dir", help="base weights (default: the one the adapter was trained on)")
    p.add_argument("--model", help="preset (default: the adapter's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["meta", "hf"], default="hf",
                   help="meta: consolidated.00.pth + params.json; hf: safetensors + config.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the base's dtype")
    args = p.parse_args(argv)
    merge_adapter(args.adapter, args.out, args.format, args.checkpoint_dir, args.model,
                  DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote {args.format} checkpoint to {args.out}")


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
