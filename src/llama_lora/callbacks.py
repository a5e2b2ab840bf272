"""Callbacks: peak memory (the seed experiment's measurement), token throughput, sample generations."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from .data import PreferenceCollator, load_records, preference_record, preprocess_pairs
from .demo import heldout_preference_records, heldout_records
from .lora import trainable_summary
from .loss import IGNORE_INDEX, sequence_logps, token_loss_sum
from .memory import peak_rss_bytes, reset_peak_rss

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
    """Tokens per second of training: all non-pad tokens, and target (loss) tokens, per step and per epoch, and the
    run's figure printed at the end (this process's batches; time in the training batches only)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.epoch_tokens = self.epoch_targets = 0
        self.epoch_time = 0.0
        self.run = [0, 0, 0.0]  # tokens, targets, seconds

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
        self.run = [self.run[0] + tokens, self.run[1] + targets, self.run[2] + dt]
        pl_module.log_dict({"throughput/tokens_per_s": tokens / dt, "throughput/target_tokens_per_s": targets / dt},
                           on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epoch_time > 0:
            pl_module.log_dict({"throughput/tokens_per_s_epoch": self.epoch_tokens / self.epoch_time,
                                "throughput/target_tokens_per_s_epoch": self.epoch_targets / self.epoch_time},
                               on_epoch=True)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokens, targets, seconds = self.run
        if seconds > 0:
            print(f"Throughput: {tokens / seconds:,.0f} tokens/s, {targets / seconds:,.0f} target tokens/s "
                  f"({tokens:,} tokens in {seconds:.1f} s of training batches)", flush=True)


class SampleGenerations(L.Callback):
    """Greedy responses to fixed instructions after each validation, in the run's prompt format, logged as TensorBoard
    text."""

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
        tok, fmt = datamodule.load_tokenizer(), datamodule.prompt_format
        val_loss = trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            log.info("step %d | val/loss %.4f", trainer.global_step, float(val_loss))
        texts = []
        for instruction in prompts:
            ids = fmt.prompt({"instruction": instruction, "input": ""}, tok)
            out = pl_module.model.generate(ids, self.max_new_tokens, temperature=0.0, eos_id=fmt.stop_id(tok))
            response = tok.decode(out)
            texts.append(f"**{instruction}**  \n→ {response}")
            log.info("step %d | %s -> %s", trainer.global_step, instruction, response)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("samples", "\n\n".join(texts), global_step=trainer.global_step)


class InstructionAccuracy(L.Callback):
    """Exact-match accuracy on held-out instructions, in the run's prompt format, before training and after: the base
    model's answers, then the tuned model's, to the same instructions. Greedy decoding; a response counts when it equals
    the expected output (stripped). Logged as ``heldout/exact_match`` and ``heldout/loss`` (token-weighted over the
    expected outputs).

    ``records``: a JSON file of Alpaca records, or ``demo`` for the demo's held-out facts. ``show`` answers of each
    model are printed.
    """

    def __init__(self, records: str = "demo", max_new_tokens: int = 8, show: int = 6) -> None:
        self.records, self.max_new_tokens, self.show = records, max_new_tokens, show
        self.before: dict[str, Any] | None = None
        self.after: dict[str, Any] | None = None

    def _records(self) -> list[dict[str, str]]:
        if self.records == "demo":
            return heldout_records()
        return load_records(self.records)

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        tok, fmt = trainer.datamodule.load_tokenizer(), trainer.datamodule.prompt_format
        records, answers, loss_sum, n = self._records(), [], 0.0, 0
        was_training = pl_module.model.training
        pl_module.model.eval()
        with pl_module.plan.autocast_context():  # the numerics training uses
            for r in records:
                prompt = fmt.prompt(r, tok)
                out = pl_module.model.generate(prompt, self.max_new_tokens, temperature=0.0, eos_id=fmt.stop_id(tok))
                answers.append(tok.decode(out).strip())
                rendered, trained = fmt.render(r, tok)  # the loss falls where training's does
                ids = torch.tensor([rendered], device=pl_module.device)
                labels = torch.tensor([[i if t else IGNORE_INDEX for i, t in zip(rendered, trained)]],
                                      device=pl_module.device)
                s, k = token_loss_sum(pl_module.model, ids, labels)
                loss_sum, n = loss_sum + float(s), n + int(k)
        pl_module.model.train(was_training)
        right = sum(a == r["output"].strip() for a, r in zip(answers, records))
        result = {"exact_match": right / len(records), "loss": loss_sum / max(n, 1), "answers": answers,
                  "records": records}
        if trainer.logger is not None:
            trainer.logger.log_metrics({"heldout/exact_match": result["exact_match"], "heldout/loss": result["loss"]},
                                       step=trainer.global_step)
        return result

    def _print(self, title: str, result: dict[str, Any]) -> None:
        lines = [f"{title}: exact match {result['exact_match']:.0%} on {len(result['records'])} held-out instructions, "
                 f"loss {result['loss']:.3f}"]
        for r, answer in list(zip(result["records"], result["answers"]))[: self.show]:
            prompt = f"{r['instruction']} {r['input']}".strip()
            lines.append(f"  {prompt!r:58} -> {answer!r} (expected {r['output']!r})")
        print("\n".join(lines), flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # not after a resume: "before" is the base model
            self.before = self._evaluate(trainer, pl_module)
            if trainer.is_global_zero:
                self._print("Base model (before)", self.before)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.after = self._evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            self._print("Tuned model (after)", self.after)
            if self.before is not None:
                drop = 1 - self.after["loss"] / self.before["loss"]
                change = f"{drop:.0%} lower" if drop >= 0 else f"{-drop:.0%} higher"
                print(f"Held-out exact match {self.before['exact_match']:.0%} -> {self.after['exact_match']:.0%}, "
                      f"loss {self.before['loss']:.3f} -> {self.after['loss']:.3f} ({change})", flush=True)



class PreferenceAccuracy(L.Callback):
    """Held-out preference accuracy, before training and after: the share of held-out pairs whose chosen completion
    the model itself finds more likely than the rejected one (summed log-probabilities given the prompt, in the run's
    prompt format). Logged as ``heldout/preference_accuracy`` and ``heldout/margin`` (the mean log-probability
    difference, chosen minus rejected).

    ``records``: a JSON file of preference pairs (any form ``data.format: preference`` reads), or ``demo`` for the
    demo's held-out facts, each against a plausible wrong answer."""

    def __init__(self, records: str = "demo") -> None:
        self.records = records
        self.before: dict[str, float] | None = None

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        datamodule = trainer.datamodule
        tok, fmt = datamodule.load_tokenizer(), datamodule.prompt_format
        records = ([preference_record(r, i, "demo") for i, r in enumerate(heldout_preference_records())]
                   if self.records == "demo" else load_records(self.records, format="preference"))
        pairs, _ = preprocess_pairs(records, tok, datamodule.max_seq_len, prompt_format=fmt)
        collate, margins = PreferenceCollator(tok.pad_id), []
        was_training = pl_module.model.training
        pl_module.model.eval()
        with pl_module.plan.autocast_context():
            for start in range(0, len(pairs), 16):
                batch = collate(pairs[start : start + 16])
                logps, _ = sequence_logps(pl_module.model, batch["input_ids"].to(pl_module.device),
                                          batch["labels"].to(pl_module.device))
                n = len(batch["pair_weight"])
                margins += (logps[:n] - logps[n:]).tolist()
        pl_module.model.train(was_training)
        result = {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
                  "margin": sum(margins) / len(margins), "pairs": len(margins)}
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"heldout/{k}": v for k, v in result.items() if k != "pairs"},
                                       step=trainer.global_step)
        return result

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self.before = self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        after = self._evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            before = (f"{self.before['preference_accuracy']:.0%} (margin {self.before['margin']:+.2f}) -> "
                      if self.before is not None else "")
            print(f"Held-out preference accuracy on {after['pairs']:.0f} pairs: {before}"
                  f"{after['preference_accuracy']:.0%} (margin {after['margin']:+.2f})", flush=True)
