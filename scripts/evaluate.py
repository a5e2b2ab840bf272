"""Validation loss and perplexity of a base + adapter on the held-out Alpaca split, through Trainer.validate:
`python scripts/evaluate.py --adapter lightning_logs/demo`. Prints a table, writes JSON.

With a fit.py checkpoint the data settings (file, tokenizer, seed, split) default to those of its training run,
so the held-out records are the ones training never saw.
"""

import inspect
import json
import sys
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from llama_lora.cli import configure_logging, main_guard, script_arguments
from llama_lora.data import AlpacaDataModule
from llama_lora.module import LlamaLoRAModule
from llama_lora.plan import BaseDtypeName, PrecisionName
from llama_lora.prompts import ChatTemplateName
from llama_lora.trained_run import open_run
from llama_lora.trainer import Trainer
from llama_lora.weights.tensors import check_output_file


def evaluate(adapter: str | None = None, checkpoint_dir: str | None = None, model: str | None = None,
             data_path: str | None = None, data_format: Literal["alpaca", "chat", "text"] | None = None,
             chat_template: ChatTemplateName | None = None, tokenizer_path: str | None = None,
             val_size: int | None = None, precision: PrecisionName = "auto", base_dtype: BaseDtypeName = "auto",
             out: str = "evaluation.json") -> dict:
    """Validate the model on held-out records and write the figures.

    Args:
        adapter: a fit.py .ckpt or a PEFT adapter folder; none: the base alone.
        checkpoint_dir: base weights (default: the ones the adapter was trained on).
        model: preset (default: the adapter's).
        data_path: Alpaca .json/.jsonl/URL (default: the adapter's training data).
        data_format: alpaca, chat or text records (default: the adapter's; alpaca for a base alone).
        chat_template: the chat template to render them in (default: the adapter's; for chat data on a base alone,
            the model's own where its tokenizer carries one): llama3, llama2, chatml or model.
        tokenizer_path: tokenizer.model (default: the adapter's, or the one beside the base weights).
        val_size: held-out records (default: the adapter's).
        precision: Lightning precision; auto: mixed precision where the hardware computes it natively.
        base_dtype: dtype of the base weights; auto: the dtype the compute runs in (on an NF4 base if the adapter
            was trained on one); nf4: 4-bit blocks, the rest in the compute dtype.
        out: the JSON results file.
    """
    check_output_file(out, "evaluate --out")  # before the work: a result that cannot be written is lost
    run = open_run(adapter, checkpoint_dir, model, tokenizer_path)
    data = {k: v for k, v in run.data.items() if k in inspect.signature(AlpacaDataModule).parameters}  # LightningCLI
    # saves keys of its own beside the data module's
    given = (("data_path", data_path), ("val_size", val_size), ("format", data_format),
             ("chat_template", chat_template))
    data.update({k: v for k, v in given if v is not None})
    data["tokenizer_path"] = str(run.tokenizer().path)
    datamodule = AlpacaDataModule(**data)
    trainer = Trainer(precision=precision, logger=False, enable_checkpointing=False, devices=1,
                      enable_progress_bar=False, enable_model_summary=False)
    device = trainer.strategy.root_device
    plan = run.plan_for(device, precision, base_dtype)
    plan.log()
    module = LlamaLoRAModule.validating(run, plan, device)
    results = trainer.validate(module, datamodule, verbose=False)[0]
    record = {"adapter": adapter, "data": str(datamodule.data_path), "val_examples": len(datamodule.val_set or []),
              "val_loss": results["val/loss"], "val_ppl": results["val/ppl"], "precision": str(trainer.precision)}
    table = Table(title="Held-out evaluation")
    for key in record:
        table.add_column(key)
    table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in record.values()))
    Console().print(table)
    Path(out).write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str]) -> None:
    evaluate(**script_arguments(evaluate, argv, __doc__))


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
