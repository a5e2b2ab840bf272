"""Fine-tune LLaMA-2 with LoRA on Alpaca: `python scripts/fit.py --config configs/lora_amp.yaml`.

With no --config, runs the embedded default, configs/demo.yaml (offline, CPU, a few minutes). Resume with
`--ckpt_path last` (the newest intact checkpoint) or a checkpoint path. `--print_config` prints a config that runs
as it is. A ModelCheckpoint without a dirpath writes into <logger save_dir>/<logger name>/checkpoints, the same
folder every run of that name, so that `--ckpt_path last` finds it. SIGTERM or Ctrl-C saves last.ckpt at the end of
the current optimizer step and exits with 128 + the signal number (docs/robustness.md).
"""

import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from llama_lora.cli import configure_logging, main_guard
from llama_lora.data import AlpacaDataModule
from llama_lora.module import LlamaLoRAModule, check_strategy
from llama_lora.resilience import GracefulStop, OutOfMemory, oom_advice, resolve_resume_checkpoint
from llama_lora.trainer import Trainer

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.max_seq_len", "model.max_seq_len")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume: a path, or 'last' for the newest intact one")


def checkpoint_folders(trainer: Trainer) -> None:
    """Give each ModelCheckpoint without a dirpath the run name's folder (Lightning's own default holds a new
    version number each run, where `--ckpt_path last` would never look)."""
    logger = trainer.logger
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None and logger is not None and logger.save_dir:
            cb.dirpath = str(Path(logger.save_dir) / logger.name / "checkpoints")


def main(argv: list[str]) -> None:
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEMO), *argv]
    # The data module restores the sampler's exact mid-epoch position itself (see AlpacaDataModule.state_dict).
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python.*")
    cli = FitCLI(LlamaLoRAModule, AlpacaDataModule, trainer_class=Trainer, run=False, auto_configure_optimizers=False,
                 args=argv, save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    trainer, model = cli.trainer, cli.model
    check_strategy(trainer.strategy)  # here, in one process, before any rank is started
    checkpoint_folders(trainer)
    ckpt_path = resolve_resume_checkpoint(trainer, cli.config.ckpt_path)  # before anything large is allocated
    try:
        trainer.fit(model, cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    except torch.OutOfMemoryError as e:
        data = cli.datamodule
        advice = oom_advice(gradient_checkpointing=model.gradient_checkpointing,
                            checkpoint_layers=model.checkpoint_layers,
                            micro_batch_size=data.micro_batch_size, precision=str(trainer.precision),
                            base_dtype=cli.config.model.base_dtype,
                            lora_targets=model.lora.targets if model.lora is not None else None,
                            max_seq_len=data.max_seq_len)
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        raise OutOfMemory(f"out of memory at step {trainer.global_step + 1} ({first[:200]})\n{advice}") from None
    stop = next((cb for cb in trainer.callbacks if isinstance(cb, GracefulStop)), None)
    if stop is not None and stop.stopped_by is not None:
        sys.exit(128 + stop.stopped_by)


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
