"""Callbacks: peak memory (the seed experiment's measurement), token throughput, sample generations."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from .lora import trainable_summary
from .memory import peak_rss_bytes, reset_peak_rss
from .prompts import format_prompt

log = logging.getLogger(__name__)


class PeakMemoryMonitor(L.Callback):
    """Peak memory of each optimizer step, and the maximum over the run: CUDA max allocated/reserved on GPU, peak RSS
    on CPU. The peak is reset at each step's first micro-batch, so validation and sample generation in between do
    not count. Under several devices, the logged and printed figures are the maximum over ranks.

    At the end of fit it prints the seed experiment's summary: the trainable-params line, peak memory, computation
    time and the average training loss.
    """

    def __init__(self) -> None:
        self.fit_start: float | None = None
        self.losses: list[float] = []
        self.run_max: dict[str, float] = {}
        self._step = 0
        self._reset_pending = True

    def _reset(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()

    def _peaks(self, device: torch.device) -> dict[str, float]:
        if device.type == "cuda":
            return {"memory/max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                    "memory/max_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
        return {"memory/peak_rss_mb": peak_rss_bytes() / 2**20}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_start, self.losses, self.run_max = time.perf_counter(), [], {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step, self._reset_pending = trainer.global_step, True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._reset_pending:  # the first micro-batch of an optimizer step
            self._reset(pl_module.device)
            self._reset_pending = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = trainer.callback_metrics.get("train/loss_step")
        if loss is not None:
            self.losses.append(float(loss))
        if trainer.global_step == self._step:
            return  # mid-accumulation: the step goes on
        self._step, self._reset_pending = trainer.global_step, True
        peaks = self._peaks(pl_module.device)
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(torch.tensor(list(peaks.values()), device=pl_module.device),
                                             reduce_op="max")
            peaks = dict(zip(peaks, values.tolist()))
        self.run_max = {k: max(v, self.run_max.get(k, 0.0)) for k, v in peaks.items()}
        pl_module.log_dict(peaks, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_max:
            pl_module.log_dict({f"{k}_run_max": v for k, v in self.run_max.items()}, on_epoch=True)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end, not on_fit_end: Lightning's teardown moves the module to the CPU in between.
        mem = self.run_max or self._peaks(pl_module.device)
        seconds = time.perf_counter() - (self.fit_start or time.perf_counter())
        ranks = f", maximum over {trainer.world_size} ranks" if trainer.world_size > 1 else ""
        lines = [trainable_summary(pl_module)]
        if "memory/max_allocated_mb" in mem:
            lines.append(f"Peak GPU memory: {mem['memory/max_allocated_mb']:.2f} MB "
                         f"(reserved {mem['memory/max_reserved_mb']:.2f} MB; of a training step{ranks})")
        else:
            lines.append(f"Peak RSS: {mem['memory/peak_rss_mb']:.2f} MB (of a training step{ranks})")
        lines.append(f"Computation time: {seconds:.2f} s")
        if self.losses:
            lines.append(f"Average loss: {sum(self.losses) / len(self.losses):.4f}")
        print("\n".join(lines), flush=True)


class TokenThroughput(L.Callback):
    """Tokens per second of training: all non-pad tokens, and target (loss) tokens, per step and per epoch."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.epoch_tokens = self.epoch_targets = 0
        self.epoch_time = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_tokens = self.epoch_targets = 0
        self.epoch_time = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = max(time.perf_counter() - self.start, 1e-9)
        tokens, targets = int(batch["n_tokens"]), int(batch["n_targets"])
        self.epoch_tokens += tokens
        self.epoch_targets += targets
        self.epoch_time += dt
        pl_module.log_dict({"throughput/tokens_per_s": tokens / dt, "throughput/target_tokens_per_s": targets / dt},
                           on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epoch_time > 0:
            pl_module.log_dict({"throughput/tokens_per_s_epoch": self.epoch_tokens / self.epoch_time,
                                "throughput/target_tokens_per_s_epoch": self.epoch_targets / self.epoch_time},
                               on_epoch=True)


class SampleGenerations(L.Callback):
    """Greedy responses to fixed instructions after each validation, logged as TensorBoard text."""

    def __init__(self, prompts: list[str] | None = None, max_new_tokens: int = 32) -> None:
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end, not on_validation_epoch_end: only then does callback_metrics hold this validation's loss.
        if trainer.sanity_checking:
            return
        datamodule = getattr(trainer, "datamodule", None)
        prompts = self.prompts
        if not prompts or datamodule is None:
            return
        if pl_module.device_mesh is not None:
            # A sharded (FSDP2) forward needs every rank; generating on rank 0 alone would wait forever.
            log.info("SampleGenerations: skipped, the model is sharded across ranks")
            return
        tok = datamodule.load_tokenizer()
        val_loss = trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            log.info("step %d | val/loss %.4f", trainer.global_step, float(val_loss))
        texts = []
        for instruction in prompts:
            ids = tok.encode(format_prompt({"instruction": instruction, "input": ""}), bos=True)
            out = pl_module.model.generate(ids, self.max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
            response = tok.decode(out)
            texts.append(f"**{instruction}**  \n→ {response}")
            log.info("step %d | %s -> %s", trainer.global_step, instruction, response)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("samples", "\n\n".join(texts), global_step=trainer.global_step)
