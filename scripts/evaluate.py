"""Validation loss and perplexity of a base + adapter on the held-out Alpaca split, through Trainer.validate:
`python scripts/evaluate.py --adapter lightning_logs/demo`. Prints a table, writes JSON.

With a fit.py checkpoint the data settings (file, tokenizer, seed, split) default to those of its training run,
so the held-out records are the ones training never saw.

With --tasks, standard benchmarks instead, through EleutherAI's lm-evaluation-harness (the `eval` extra):
`python scripts/evaluate.py --adapter lightning_logs/demo --tasks hellaswag,arc_easy --num_fewshot 0 --limit 100`.
The model is the one that trained (its base dtype, NF4 included, and its prompt format with --apply_chat_template);
the harness's results JSON goes to --out and the scores to TensorBoard.
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
             data_path: str | None = None, data_format: Literal["alpaca", "chat", "text", "preference"] | None = None,
             chat_template: ChatTemplateName | None = None, tokenizer_path: str | None = None,
             val_size: int | None = None, precision: PrecisionName = "auto", base_dtype: BaseDtypeName = "auto",
             out: str = "evaluation.json", tasks: str | None = None, num_fewshot: int | None = None,
             limit: float | None = None, batch_size: int = 8, include_path: str | None = None,
             apply_chat_template: bool = False, log_dir: str | None = None) -> dict:
    """Validate the model on held-out records and write the figures.

    Args:
        adapter: a fit.py .ckpt or a PEFT adapter folder; none: the base alone.
        checkpoint_dir: base weights (default: the ones the adapter was trained on).
        model: preset (default: the adapter's).
        data_path: Alpaca .json/.jsonl/URL (default: the adapter's training data).
        data_format: alpaca, chat, text or preference records (default: the adapter's; alpaca for a base alone). A
            preference run is validated on its pairs: its objective's loss and TRL's rewards and log-probabilities.
        chat_template: the chat template to render them in (default: the adapter's; for chat data on a base alone,
            the model's own where its tokenizer carries one): llama3, llama2, chatml or model.
        tokenizer_path: tokenizer.model (default: the adapter's, or the one beside the base weights).
        val_size: held-out records (default: the adapter's).
        precision: Lightning precision; auto: mixed precision where the hardware computes it natively.
        base_dtype: dtype of the base weights; auto: the dtype the compute runs in (on an NF4 base if the adapter
            was trained on one); nf4: 4-bit blocks, the rest in the compute dtype.
        out: the JSON results file.
        tasks: lm-evaluation-harness tasks, comma-separated (hellaswag,arc_easy,...): benchmarks instead of the
            held-out loss. The harness downloads each task's data; offline, give local task YAMLs (--include_path).
        num_fewshot: examples in each prompt (default: each task's own).
        limit: examples per task (a count, or below 1 a fraction); none: all.
        batch_size: log-likelihood requests per forward, grouped by length.
        include_path: a folder of your own task YAMLs.
        apply_chat_template: render each prompt in the run's prompt format (Alpaca's, or its chat template).
        log_dir: where the scores go as TensorBoard scalars (default: the fit.py run's own log folder, beside its
            training curves; else lightning_logs/lm_eval).
    """
    check_output_file(out, "evaluate --out")  # before the work: a result that cannot be written is lost
    run = open_run(adapter, checkpoint_dir, model, tokenizer_path)
    if tasks is not None:
        return _benchmarks(run, [t.strip() for t in tasks.split(",") if t.strip()], precision, base_dtype, out,
                           num_fewshot, limit, batch_size, include_path, apply_chat_template, log_dir)
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
              **{k.replace("/", "_", 1): v for k, v in results.items()}, "precision": str(trainer.precision)}
    table = Table(title="Held-out evaluation")
    for key in record:
        table.add_column(key)
    table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in record.values()))
    Console().print(table)
    Path(out).write_text(json.dumps(record, indent=2))
    return record


def _benchmarks(run, tasks: list[str], precision: str, base_dtype: str, out: str, num_fewshot: int | None,
                limit: float | None, batch_size: int, include_path: str | None, apply_chat_template: bool,
                log_dir: str | None) -> dict:
    from llama_lora import harness  # lm-eval: the optional extra, one line without it

    if not tasks:
        raise ValueError("--tasks names no task; give e.g. --tasks hellaswag,arc_easy")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    plan = run.plan_for(None, precision, base_dtype)
    plan.log()
    lm = harness.LlamaLoRALM(run.build(plan, plan.device), run.tokenizer(), run.prompt_format, batch_size)
    results = harness.run_tasks(lm, tasks, num_fewshot, limit, include_path, apply_chat_template)
    harness.write_results(results, out)
    print(harness.table(results))
    from torch.utils.tensorboard import SummaryWriter

    folder = log_dir or (str(run.source.parent.parent) if run.source is not None and run.source.suffix == ".ckpt"
                         and run.source.parent.name == "checkpoints" else "lightning_logs/lm_eval")
    with SummaryWriter(folder) as writer:
        for tag, value in harness.scores(results).items():
            writer.add_scalar(f"lm_eval/{tag}", value, 0)
    return results


def main(argv: list[str]) -> None:
    evaluate(**script_arguments(evaluate, argv, __doc__))


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
