"""Validation loss and perplexity of a base + adapter on the held-out Alpaca split, through Trainer.validate:
`python scripts/evaluate.py --adapter lightning_logs/demo/checkpoints/last.ckpt`. Prints a table, writes JSON.

With a fit.py checkpoint the data settings (file, tokenizer, seed, split) default to those of its training run,
so the held-out records are the ones training never saw.
"""

import argparse
import inspect
import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from llama_lora.adapters import import_peft
from llama_lora.cli import configure_logging, main_guard
from llama_lora.config import LlamaConfig
from llama_lora.data import AlpacaDataModule
from llama_lora.module import LlamaLoRAModule, LoRASettings


def _known(cls, values: dict) -> dict:
    params = inspect.signature(cls).parameters  # LightningCLI saves keys of its own beside the arguments
    return {k: v for k, v in values.items() if k in params}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="fit.py .ckpt or PEFT adapter folder; none: the base alone")
    p.add_argument("--checkpoint_dir", help="base weights (default: the one the adapter was trained on)")
    p.add_argument("--model", help="preset (default: the adapter's)")
    p.add_argument("--data_path", help="Alpaca .json/.jsonl/URL (default: the adapter's training data)")
    p.add_argument("--tokenizer_path", help="tokenizer.model (default: the adapter's)")
    p.add_argument("--val_size", type=int, help="held-out records (default: the adapter's)")
    p.add_argument("--precision", default="bf16-mixed" if not torch.cuda.is_available() else "16-mixed")
    p.add_argument("--out", default="evaluation.json", help="JSON results file")
    args = p.parse_args(argv)
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None and not adapter.exists():
        raise FileNotFoundError(f"Adapter not found: {adapter}")
    ckpt = torch.load(adapter, map_location="cpu", weights_only=True) if adapter and adapter.is_file() else {}
    model_hp = _known(LlamaLoRAModule, ckpt.get("hyper_parameters", {}))
    data_hp = _known(AlpacaDataModule, ckpt.get("datamodule_hyper_parameters", {}))
    overrides = {"data_path": args.data_path, "tokenizer_path": args.tokenizer_path, "val_size": args.val_size}
    data_hp.update({k: v for k, v in overrides.items() if v is not None})
    if args.checkpoint_dir:
        model_hp["checkpoint_dir"] = args.checkpoint_dir
    if args.model:
        model_hp["model"] = args.model
    lora, peft = model_hp.pop("lora", None), None
    if adapter is not None and adapter.is_dir():  # a PEFT folder: its settings and weights, imported
        peft, lora = import_peft(adapter, LlamaConfig.from_name(model_hp.get("model", "llama2-7b")))
    module = LlamaLoRAModule(**model_hp, lora=LoRASettings(**lora) if lora else None)
    if peft is not None:
        module.configure_model()
        module.model.load_state_dict(peft, strict=False)
    datamodule = AlpacaDataModule(**data_hp)
    trainer = L.Trainer(precision=args.precision, logger=False, enable_checkpointing=False, devices=1,
                        enable_progress_bar=False, enable_model_summary=False)
    results = trainer.validate(module, datamodule, ckpt_path=str(adapter) if ckpt else None, verbose=False)[0]
    record = {"adapter": str(adapter) if adapter else None, "data": str(datamodule.data_path),
              "val_examples": len(datamodule.val_set or []), "val_loss": results["val/loss"],
              "val_ppl": results["val/ppl"], "precision": str(trainer.precision)}
    table = Table(title="Held-out evaluation")
    for key in record:
        table.add_column(key)
    table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in record.values()))
    Console().print(table)
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
    configure_logging()
    main_guard(main, sys.argv[1:])
