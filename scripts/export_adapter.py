"""Export a fit.py LoRA checkpoint in HF PEFT's format (adapter_config.json + adapter_model.safetensors), which
`PeftModel.from_pretrained` loads onto the HF-format base:
`python scripts/export_adapter.py --adapter lightning_logs/lora_amp/checkpoints/last.ckpt --out adapter`.
"""

import argparse
import sys

import torch

from llama_lora.adapters import export_peft, load_model
from llama_lora.cli import configure_logging, main_guard


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="fit.py .ckpt trained with LoRA")
    p.add_argument("--checkpoint_dir", help="base weights (default: the one the adapter was trained on)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--base_model", default="meta-llama/Llama-2-7b-hf", help="base_model_name_or_path in the config")
    args = p.parse_args(argv)
    loaded = load_model(args.checkpoint_dir, args.adapter, base_dtype=torch.float32)
    if not loaded.lora:
        raise ValueError(f"{args.adapter} was trained without LoRA (lora: null); use merge.py for full weights")
    export_peft(loaded.model, loaded.lora, args.out, args.base_model)
    print(f"wrote PEFT adapter (r={loaded.lora['r']}, targets {loaded.lora['targets']}) to {args.out}")


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
