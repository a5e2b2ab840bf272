"""What happens when things go wrong: signals, non-finite losses, fp16 overflow, corrupt checkpoints, out of memory.

- ``GracefulStop``: SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) ends the run at the next optimizer-step
  boundary with a checkpoint, then the process exits with 128 + the signal number.
- ``NumericsGuard``: an optimizer step whose gradients are not finite is skipped (the GradScaler does this itself
  under 16-mixed, where the loss scale is logged); a loss that stays non-finite for ``patience`` optimizer steps
  stops the run without writing another checkpoint.
- ``resolve_resume_checkpoint``: ``--ckpt_path last`` takes the newest *intact* checkpoint; a named checkpoint that
  is truncated or corrupt is refused with one line.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from . import run_checkpoint
from .plan import DTYPE_NAMES, RunPlan

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """A run that started but cannot go on (diverged, out of memory); its message says what to change. The scripts
    print it in one line and exit with code 1."""


class TrainingDiverged(RunFailed):
    """The loss stayed non-finite; the message names the steps and likely causes."""


# ----- signals -----


class GracefulStop(L.Callback):
    """SIGTERM and SIGINT save ``last.ckpt`` at the end of the current optimizer step and stop the run.

    Saving waits for the step boundary so that no half-accumulated gradient is lost: the checkpoint resumes exactly.
    Across processes (DDP) the ranks agree at each boundary, so one signalled rank stops them all. A second Ctrl-C
    stops at once, without saving. ``stopped_by`` holds the signal number once the run was stopped this way.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self.stopped_by: int | None = None
        self._previous: dict[int, Any] = {}
        self._step = 0

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.requested is None:
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            log.warning("Received %s: saving a checkpoint at the end of this optimizer step, then stopping%s",
                        signal.Signals(signum).name, again)
        self.requested = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step:
            return  # mid-accumulation: the optimizer has not stepped yet
        self._step = trainer.global_step
        stop = self.requested is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.requested or signal.SIGTERM
        path = last_checkpoint_path(trainer)
        if path is None:
            log.warning("No ModelCheckpoint callback is configured: stopping at step %d without saving",
                        trainer.global_step)
        else:
            trainer.save_checkpoint(path, weights_only=False)  # the full training state, to resume from
            log.warning("Stopped by %s at step %d; saved %s. Resume with --ckpt_path last",
                        signal.Signals(signum).name, trainer.global_step, path)
        self.stopped_by = signum
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning validates when a run stops early; a preempted job has no time


def last_checkpoint_path(trainer: L.Trainer) -> str | None:
    """Where ModelCheckpoint keeps ``last.ckpt`` (what ``--ckpt_path last`` finds), or None without one."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
            return str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
    return None


# ----- numerics -----


class NumericsGuard(L.Callback):
    """Skips updates with non-finite gradients, logs fp16 overflow, and stops a run whose loss stays non-finite.

    - Without a GradScaler, an optimizer step whose gradients hold inf/NaN is skipped (the gradients are dropped,
      so AdamW leaves the weights and its moments untouched) and logged.
    - Under 16-mixed the GradScaler already skips overflowing steps and halves the scale; each skip is logged, and
      ``amp/loss_scale`` and ``amp/skipped_steps`` go to the logger (TensorBoard).
    - When the training loss is non-finite in ``patience`` consecutive optimizer steps, the run stops with
      ``TrainingDiverged``. While a non-finite streak lasts, no checkpoint is written, so the newest one on disk is
      the last good one.
    """

    def __init__(self, patience: int) -> None:
        assert patience >= 1, "validated by the module (model.max_nonfinite_steps)"
        self.patience = patience
        self.streak = 0
        self.first_bad_step: int | None = None
        self.skipped_steps = 0
        self._window_bad = False
        self._step = 0
        self._scale: float | None = None

    @staticmethod
    def _scaler(trainer: L.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        scaler = self._scaler(trainer)
        self._scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._scaler(trainer) is not None:
            return  # the GradScaler checks the unscaled gradients and skips the step itself
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.nn.utils.get_total_norm(grads).isfinite())
        if trainer.world_size > 1:  # sharded gradients (FSDP2): every rank skips, or none does
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # AdamW skips parameters without a gradient: weights and moments stay as they were
        self.skipped_steps += 1
        log.warning("Step %d: non-finite gradients, the update was skipped", trainer.global_step + 1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            self._window_bad = True
        if trainer.global_step == self._step:
            return  # mid-accumulation
        step, self._step = trainer.global_step, trainer.global_step
        bad, self._window_bad = self._window_bad, False
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._log_scale(trainer, pl_module, step)
        if not bad:
            self.streak, self.first_bad_step = 0, None
            return
        self.streak += 1
        self.first_bad_step = self.first_bad_step or step
        log.warning("Step %d: the training loss is not finite (%d of %d allowed in a row)", step, self.streak,
                    self.patience)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb._last_global_step_saved = step  # ModelCheckpoint skips a step it believes saved: keep the good one
        if self.streak >= self.patience:
            raise TrainingDiverged(self._diverged_message(trainer, step))

    def _log_scale(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        scaler = self._scaler(trainer)
        if scaler is None or not scaler.is_enabled():
            return
        scale = float(scaler.get_scale())
        if self._scale is not None and scale < self._scale:
            self.skipped_steps += 1
            log.info("Step %d: fp16 gradients overflowed; the GradScaler skipped the update, loss scale %g -> %g",
                     step, self._scale, scale)
        self._scale = scale
        pl_module.log_dict({"amp/loss_scale": scale, "amp/skipped_steps": float(self.skipped_steps)}, on_step=True,
                           on_epoch=False)

    def _diverged_message(self, trainer: L.Trainer, step: int) -> str:
        lr = next((g["lr"] for opt in trainer.optimizers for g in opt.param_groups), math.nan)
        precision = str(trainer.precision)
        causes = [f"a learning rate too high for this run (lr now {lr:.3g})"]
        if precision.startswith("16"):
            causes.append("fp16 overflow in the frozen base's activations (try trainer.precision: bf16-mixed with "
                          "model.base_dtype: bf16 where the GPU supports it)")
        causes.append("bad data records (check the examples of these steps)")
        saved = [cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint)]
        kept = f"; the newest good checkpoint is kept: {saved[0]}" if saved and saved[0] else ""
        return (f"The training loss was not finite for {self.streak} optimizer steps in a row (steps "
                f"{self.first_bad_step}-{step}); likely causes: {'; '.join(causes)}{kept}")


# ----- resuming -----


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from (missing, empty, truncated, not a training checkpoint), or None if fine.

    Loads with ``weights_only=True`` and ``mmap=True``: no pickled code runs and tensor data is not read. A file cut
    short fails here (the zip's directory is at its end); a bit flip inside tensor data is not detected.
    """
    path = Path(path)
    if path.is_dir():
        return None  # a distributed (sharded) checkpoint folder: Lightning checks it when it loads it
    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        ckpt = run_checkpoint.load(path)
    except ValueError as e:  # any failure to read means: not usable
        first = str(e).split(" (", 1)[-1].rstrip(")").split(". ")[0]
        return f"truncated or corrupt ({first[:160]})"
    if not isinstance(ckpt, dict) or "loops" not in ckpt or "global_step" not in ckpt:
        return "not a training checkpoint of fit.py (no loop state)"
    try:
        run_checkpoint.read(path, ckpt)  # this project's part: the trained weights, a version it can read
    except ValueError as e:
        return str(e).split(": ", 1)[-1]
    return None


def checkpoint_folders(trainer: L.Trainer) -> list[Path]:
    """Where a run's checkpoints are: each ModelCheckpoint's dirpath, or, without one, the run's folder
    ``<save_dir>/<name>``, whose versions each keep their own (``version_N/checkpoints``, Lightning's default: a new
    run never mixes its files with an earlier run's)."""
    folders = []
    logger = trainer.logger
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
            folders.append(Path(cb.dirpath))
        elif isinstance(cb, ModelCheckpoint) and logger is not None and logger.save_dir:
            folders.append(Path(logger.save_dir) / str(logger.name))
    return folders


def resolve_resume_checkpoint(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """The checkpoint ``trainer.fit`` should resume from.

    ``last`` means the newest intact ``*.ckpt`` of the run (``checkpoint_folders``: last.ckpt or a step file); damaged
    ones are skipped with a warning. None when there is nothing to resume from yet (a first run with ``last`` set).
    A named path that is missing or damaged raises ValueError naming an intact alternative, if any.
    """
    if ckpt_path is None or ckpt_path in ("best", "hpc"):
        return ckpt_path  # Lightning's other names: resolved by Lightning itself
    folders = checkpoint_folders(trainer)
    candidates = run_checkpoint.newest_first(folders)
    if ckpt_path == "last":
        for path in candidates:
            problem = checkpoint_problem(path)
            if problem is None:
                return str(path)
            log.warning("Skipping %s: %s", path, problem)
        if candidates:
            raise ValueError(f"--ckpt_path last: none of the {len(candidates)} checkpoints in "
                             f"{', '.join(map(str, folders))} is intact; remove them to start over")
        log.warning("--ckpt_path last: no checkpoint in %s yet, starting from the beginning",
                    ", ".join(map(str, folders)) or "(no ModelCheckpoint folder)")
        return None
    problem = checkpoint_problem(ckpt_path)
    if problem is not None:
        intact = next((p for p in candidates if Path(p).resolve() != Path(ckpt_path).resolve()
                       and checkpoint_problem(p) is None), None)
        hint = f"; the newest intact one is {intact}" if intact else "; pass another checkpoint or 'last'"
        raise ValueError(f"--ckpt_path {ckpt_path}: {problem}{hint}")
    return str(ckpt_path)


# ----- out of memory -----


class OutOfMemory(RunFailed):
    """CUDA ran out of memory; the message lists the memory levers with this run's settings."""


def oom_advice(plan: RunPlan, *, gradient_checkpointing: bool, micro_batch_size: int, lora_targets: list[str] | None,
               max_seq_len: int, checkpoint_layers: int | None = None) -> str:
    """The memory levers, each with this run's setting (its dtypes as the run plan decided them): printed when CUDA
    runs out of memory."""
    lines = ["Ways to fit in memory (this run's setting in brackets):"]
    if not gradient_checkpointing:
        lines.append("  - model.gradient_checkpointing: true (recompute activations) [false]")
    elif checkpoint_layers is not None:
        lines.append(f"  - model.checkpoint_layers: null (recompute every block) [{checkpoint_layers}]")
    if micro_batch_size > 1:
        lines.append(f"  - a smaller data.micro_batch_size with a larger trainer.accumulate_grad_batches, same "
                     f"global batch [{micro_batch_size}]")
    base = "nf4" if plan.quantization else DTYPE_NAMES[plan.linear_dtype]
    if plan.compute_dtype == torch.float32 or base == "fp32":
        lines.append(f"  - trainer.precision: 16-mixed (bf16-mixed) with model.base_dtype: fp16 (bf16) "
                     f"[{plan.precision}, {base}]")
    if lora_targets is None:
        lines.append("  - LoRA instead of full fine-tuning: model.lora [null]")
    elif len(lora_targets) > 2:
        lines.append(f"  - fewer model.lora.targets, e.g. [wq, wv] [{', '.join(lora_targets)}]")
    lines.append(f"  - a shorter data.max_seq_len (longer examples are truncated) [{max_seq_len}]")
    return "\n".join(lines)
