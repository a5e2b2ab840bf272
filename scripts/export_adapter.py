"""Export a fit.py LoRA checkpoint in HF PEFT's format (adapter_config.json + adapter_model.safetensors), which
`PeftModel.from_pretrained` loads onto the HF-format base:
`python scripts/export_adapter.py --adapter lightning_logs/lora_amp --out_dir adapter`.
Reads the adapter only, no base weight. `--format gguf` writes adapter.gguf, a llama.cpp LoRA adapter instead.
"""

import sys

from llama_lora.cli import configure_logging, main_guard, script_arguments
from llama_lora.export import export_adapter


def main(argv: list[str]) -> None:
    args = script_arguments(export_adapter, argv, __doc__)
    out = export_adapter(**args)
    print(f"wrote a {'llama.cpp LoRA GGUF' if args['format'] == 'gguf' else 'PEFT adapter'} to {out}")


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
