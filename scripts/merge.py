"""Merge a LoRA adapter into its base and write a plain checkpoint:
`python scripts/merge.py --adapter lightning_logs/lora_amp --out_dir merged --format hf`.
`--format gguf` writes one GGUF for llama.cpp and Ollama (`--gguf_type f16`, or f32, bf16, q8_0, ...) and a Modelfile;
with `--checkpoint_dir` and no `--adapter`, the base alone is converted.

Tensor by tensor from the memory-mapped base: each update in fp32, folded into its weight and cast once. The peak is
the base in its dtype plus one layer.
"""

import sys

from llama_lora.cli import configure_logging, main_guard, script_arguments
from llama_lora.export import merge_adapter


def main(argv: list[str]) -> None:
    args = script_arguments(merge_adapter, argv, __doc__)
    out = merge_adapter(**args)
    print(f"wrote a {args['format']} checkpoint to {out}")


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
