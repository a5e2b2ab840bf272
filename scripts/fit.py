"""Fine-tune LLaMA-2 with LoRA on Alpaca: `python scripts/fit.py --config configs/lora_amp.yaml`.

With no --config, runs the embedded default, configs/demo.yaml (offline, CPU, a few minutes). Resume with
`--ckpt_path last` (the newest intact checkpoint) or a checkpoint path. `--print_config` prints a config that runs
as it is. A ModelCheckpoint without a dirpath writes into the run's own folder,
<logger save_dir>/<logger name>/version_N/checkpoints (Lightning's default): `--ckpt_path last` takes the newest intact
checkpoint of every version of that name, and `--adapter lightning_logs/<name>` in the other scripts the newest one.
SIGTERM or Ctrl-C saves last.ckpt at the end of the current optimizer step and exits with 128 + the signal number
(docs/robustness.md).
"""

import ast
import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import yaml
from lightning.pytorch.cli import LightningCLI

import llama_lora
from llama_lora import run_checkpoint
from llama_lora.cache import default_cache_dir
from llama_lora.cli import check_config_files, configure_logging, main_guard
from llama_lora.data import AlpacaDataModule
from llama_lora.module import LlamaLoRAModule
from llama_lora.plan import make_plan
from llama_lora.resilience import GracefulStop, OutOfMemory, oom_advice, resolve_resume_checkpoint
from llama_lora.trained_run import base_tokenizer
from llama_lora.trainer import Trainer
from llama_lora.weights import save_meta
from llama_lora.weights.tensors import check_output_dir

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO, DEMO_BASE = CONFIGS / "demo.yaml", CONFIGS / "demo_base.yaml"
log = logging.getLogger("fit")


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.max_seq_len", "model.max_seq_len")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume: a path, or 'last' for the newest intact one")
        parser.add_argument("--extends", type=str | None, default=None,
                            help="in a config file: the config it overlays (a path relative to it), read before it")

    def before_instantiate_classes(self) -> None:
        if self.config.model.checkpoint_dir == "demo":  # the demo's base, from the cache or pretrained now
            self.config.model.checkpoint_dir = str(demo_base(self.config.data.cache_dir))
            self._set_seed()  # as if the base had come from the cache: the same LoRA init on every run
        base, data = self.config.model.checkpoint_dir, self.config.data
        if data.tokenizer_path is None and data.data_path != "demo" and base is not None:
            data.tokenizer_path = str(base_tokenizer(Path(base)))  # the base's own: a GGUF's, tokenizer.json, ...


# The package's code that decides the demo base's weights: its model, data, loss, training step and plan.
DEMO_BASE_CODE = ("config", "plan", "layout", "model", "lora", "loss", "module", "trainer", "resilience", "demo",
                  "tokenizer", "prompts", "data", "weights")


def demo_base_key(package: Path = Path(llama_lora.__file__).parent) -> str:
    """What makes the demo base: its config, torch's version, the plan it trains with on this CPU, and the code of
    ``DEMO_BASE_CODE`` as syntax trees without docstrings, so that editing a comment or a docstring keeps the cache."""
    plan = make_plan("cpu", "auto", "auto", lora=False).to_dict()
    key = hashlib.sha256(DEMO_BASE.read_bytes() + torch.__version__.encode() + str(sorted(plan.items())).encode())
    for name in DEMO_BASE_CODE:
        for source in sorted(package.glob(f"{name}.py")) + sorted((package / name).glob("*.py")):
            tree = ast.parse(source.read_text())
            for node in ast.walk(tree):
                body = getattr(node, "body", None)
                if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                        getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
            key.update(source.relative_to(package).as_posix().encode() + ast.dump(tree).encode())
    return key.hexdigest()[:12]


def demo_base(cache_dir: str | None) -> Path:
    """The demo's base model as a Meta checkpoint (consolidated.00.pth, params.json, tokenizer.model): pretrained
    with configs/demo_base.yaml on first use, then taken from the cache folder, keyed by what makes it
    (``demo_base_key``)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache / f"demo-base-{demo_base_key()}"
    if (folder / "consolidated.00.pth").is_file():
        log.info("Demo base model: %s (cached)", folder)
        return folder
    log.info("Pretraining the demo base model on the synthetic world's prose (once; cached in %s)", folder)
    cli = run(["--config", str(DEMO_BASE), *(["--data.cache_dir", str(cache)] if cache_dir else [])])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_meta(cli.model.model.state_dict(), cli.model.config, tmp)
    cli.datamodule.load_tokenizer().save_to(tmp)
    os.replace(tmp, folder)  # complete or absent: an interrupted pretraining leaves no half-written base
    log.info("Demo base model: %s", folder)
    return folder


def with_bases(argv: list[str]) -> list[str]:
    """Put the config each overlay ``extends`` (recursively) before it, so that an overlay runs alone:
    ``--config configs/qlora.yaml`` reads lora_amp.yaml, then qlora.yaml. ``--extends null`` after it keeps the
    printed and saved configs complete and free of the reference."""
    out: list[str] = []
    args = iter(argv)
    for a in args:
        if a != "--config" and not a.startswith("--config="):
            out.append(a)
            continue
        path = Path(a.split("=", 1)[1] if "=" in a else next(args, ""))
        chain = [path]
        while chain[0].is_file():
            check_config_files(["--config", str(chain[0])])
            content = yaml.safe_load(chain[0].read_text(encoding="utf-8"))
            parent = content.get("extends") if isinstance(content, dict) else None
            if not parent:
                break
            base = chain[0].parent / parent
            if not base.is_file():
                raise FileNotFoundError(f"{chain[0]}: extends {parent}, which is not at {base}; fix the path")
            if any(base.resolve() == c.resolve() for c in chain):
                raise ValueError(f"{chain[0]}: extends {parent}, which is already in its chain "
                                 f"({' <- '.join(str(c) for c in chain)}); a config cannot extend itself")
            chain.insert(0, base)
        out += [x for c in chain for x in ("--config", str(c))] + (["--extends", "null"] if len(chain) > 1 else [])
    return out


def main(argv: list[str]) -> None:
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEMO), *argv]
    cli = run(with_bases(argv))
    stop = next((cb for cb in cli.trainer.callbacks if isinstance(cb, GracefulStop)), None)
    if stop is not None and stop.stopped_by is not None:
        sys.exit(128 + stop.stopped_by)


def run(argv: list[str]) -> FitCLI:
    """Parse, build and fit; the CLI holds the trained module and the data module."""
    # The data module restores the sampler's exact mid-epoch position itself (see AlpacaDataModule.state_dict).
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python.*")
    cli = FitCLI(LlamaLoRAModule, AlpacaDataModule, trainer_class=Trainer, run=False, auto_configure_optimizers=False,
                 args=argv, save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})
    trainer, model = cli.trainer, cli.model
    # Every dtype decided, and what cannot run refused, here: in one process, before any rank is started.
    model.plan = model.plan_for(trainer)
    ckpt_path = resolve_resume_checkpoint(trainer, cli.config.ckpt_path)  # before anything large is allocated
    start = 0
    if ckpt_path is not None and Path(ckpt_path).is_file():  # what a resume must match (docs/robustness.md)
        now = run_checkpoint.run_settings(model, cli.datamodule, trainer)
        saved = run_checkpoint.read(ckpt_path)
        run_checkpoint.check_resume(saved, now)
        start = saved.global_step
        if 0 <= trainer.max_steps <= saved.global_step:
            raise ValueError(f"--ckpt_path {ckpt_path} is at step {saved.global_step} and trainer.max_steps is "
                             f"{trainer.max_steps}: nothing is left to train; raise trainer.max_steps to go on")
    check_outputs(trainer)
    model.plan.log()
    try:
        trainer.fit(model, cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (ValueError, OSError):
        if trainer.global_step == start:  # refused at set-up: no empty version_N is left behind
            remove_unused(trainer.log_dir)
        raise
    except torch.OutOfMemoryError as e:
        data = cli.datamodule
        advice = oom_advice(model.plan, gradient_checkpointing=model.gradient_checkpointing,
                            checkpoint_layers=model.checkpoint_layers, micro_batch_size=data.micro_batch_size,
                            lora_targets=model.lora.targets if model.lora is not None else None,
                            max_seq_len=data.max_seq_len)
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        raise OutOfMemory(f"out of memory at step {trainer.global_step + 1} ({first[:200]})\n{advice}") from None
    return cli


def check_outputs(trainer) -> None:
    """The folders a run writes (the logger's, the checkpoints'), checked before it starts."""
    for logger in trainer.loggers:
        if getattr(logger, "save_dir", None):
            check_output_dir(logger.save_dir, "trainer.logger's save_dir")
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None):
            check_output_dir(callback.dirpath, "ModelCheckpoint's dirpath")


def remove_unused(folder: str | None) -> None:
    """Remove the log folder of a run that trained nothing: its saved config and an empty event file, no checkpoint."""
    path = Path(folder) if folder else None
    if path is not None and path.is_dir() and not list(path.rglob("*.ckpt")):
        shutil.rmtree(path)


if __name__ == "__main__":
    configure_logging()
    main_guard(main, sys.argv[1:])
