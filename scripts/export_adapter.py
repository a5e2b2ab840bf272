"""Export a fit.py LoRA checkpoint in HF PEFT's format (adapter_config.json + adapter_model.safetensors), which
`PeftModel.from_pretrained` loads onto the HF-format base:
`python scripts/export_adapter.py --adapter lightning_logs/lora_amp/checkpoints/last.ckpt --out adapter`.
Reads the adapter only, no base weight.
"""

import argparse
import sys

from llama_lora.adapters import export_peft, read_adapter
from llama_lora.cli import configure_logging, main_guard
from llama_lora.config import LlamaConfig


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="fit.py .ckpt trained with LoRA")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--base_model", default="meta-llama/Llama-2-7b-hf", help="base_model_name_or_path in the config")
    args = p.parse_args(argv)
    adapter = read_adapter(args.adapter)
    if not adapter.lora:
        raise ValueError(f"{args.adapter} was trained without LoRA (lora: null); use merge.py for full weights")
    # The preset gives the head counts that HF's q/k permutation needs; no base weight is read.
    export_peft(adapter.tensors, LlamaConfig.from_name(adapter.preset), adapter.lora, args.out, args.base_model)
    print(f"wrote PEFT adapter (r={adapter.lora['r']}, targets {adapter.lora['targets']}) to {args.out}")


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
