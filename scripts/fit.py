"""Fine-tune LLaMA-2 with LoRA on Alpaca: `python scripts/fit.py --config configs/lora_amp.yaml`.

With no --config, runs the embedded default, configs/demo.yaml (offline, CPU, a few minutes).
Resume with `--ckpt_path last` (or a checkpoint path). `--print_config` prints a config that runs as it is.
"""

import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from llama_lora.cli import configure_logging, main_guard
from llama_lora.data import AlpacaDataModule
from llama_lora.module import LlamaLoRAModule

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.max_seq_len", "model.max_seq_len")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint to resume: a path or 'last'")


def main(argv: list[str]) -> None:
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEMO), *argv]
    # The data module restores the sampler's exact mid-epoch position itself (see AlpacaDataModule.state_dict).
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python.*")
    cli = FitCLI(LlamaLoRAModule, AlpacaDataModule, run=False, auto_configure_optimizers=False, args=argv,
                 save_config_kwargs={"overwrite": True})
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=cli.config.ckpt_path)


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
