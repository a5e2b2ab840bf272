"""The LightningModule: builds the hand-written Llama (+ LoRA), computes a token-weighted loss, keeps checkpoints
adapter-only. Every default lives in ``LlamaLoRAModule.__init__``; YAML and the CLI only override."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from . import run_checkpoint
from .config import LlamaConfig
from .data.batches import BatchItem
from .lora import (
    LoRASettings,
    apply_lora,
    lora_layers,
    mark_only_lora_as_trainable,
    reference_model,
    row_norms,
    set_reference_adapter,
    trainable_summary,
)
from .loss import sequence_logps, token_loss_sum
from .model import Llama, check_checkpoint_layers
from .plan import BaseDtypeName, RunPlan, make_plan
from .preference import METRICS, PairScores, PreferenceSettings, pair_metrics, score_pairs
from .quant import NF4Weight, map_large_buffers
from .resilience import GracefulStop, NumericsGuard
from .trained_run import TrainedRun, open_run
from .weights import (
    WEIGHTS_HELP,
    build_model,
    check_state_dict,
    checkpoint_config,
    detect_format,
    fill_shards,
    gather_rows,
    load_rows,
    local_rows,
    meta_model,
    open_checkpoint,
)

log = logging.getLogger(__name__)


class WarmupCosineLR(LambdaLR):
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` of the peak, per optimizer step.

    ``max_steps=None`` takes the run's optimizer steps from the Trainer (``estimated_stepping_batches``: max_steps, or
    what max_epochs makes of the data), set by the module once the Trainer is known.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 100, max_steps: int | None = None,
                 min_lr_ratio: float = 0.1) -> None:
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        total = max(self.max_steps or step + 1, self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LlamaLoRAModule(L.LightningModule):
    def __init__(
        self,
        model: str | None = "llama2-7b",
        checkpoint_dir: str | None = None,
        base_dtype: BaseDtypeName = "auto",
        lora: LoRASettings | None = LoRASettings(),
        gradient_checkpointing: bool = False,
        checkpoint_layers: int | None = None,
        max_seq_len: int = 512,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable = WarmupCosineLR,
        loss_chunk_size: int | None = None,
        init_seed: int = 0,
        init_adapter: str | None = None,
        compile: bool = False,
        max_nonfinite_steps: int = 3,
        preference: PreferenceSettings | None = None,
    ) -> None:
        """
        Args:
            model: preset name (llama2-7b, llama2-13b, llama2-70b, small, demo, tiny); the checkpoint must match it.
                null: the checkpoint's own config (its params.json or config.json).
            checkpoint_dir: Meta or HF checkpoint dir (or llama2.c .bin); None for random init (demo, benchmarks).
            base_dtype: dtype of the frozen base weights; auto: the dtype the compute runs in (bf16 under bf16-mixed,
                fp16 under 16-mixed, fp32 under 32-true), and fp32 for full fine-tuning, whose weights are trained.
                nf4: QLoRA: the blocks' linear weights in 4-bit NormalFloat, dequantized to the compute dtype only
                while used. The run plan (plan.py) decides every dtype from this and trainer.precision.
            lora: LoRA settings; null means full fine-tuning.
            gradient_checkpointing: recompute each block's activations in backward (use_reentrant=False).
            checkpoint_layers: with gradient_checkpointing, recompute only the first this many blocks (None: all):
                the rest keep their activations, trading memory for less recomputation.
            max_seq_len: longest training sequence (linked from data.max_seq_len).
            loss_chunk_size: target positions per output-layer chunk of the loss (None: 128 on CPU, 1024 on GPU).
            init_seed: seed of the random init when there is no checkpoint.
            init_adapter: start a new run from an adapter's LoRA weights (a fit.py .ckpt or a PEFT folder with the
                same targets and rank): new data, batch size and schedule, from step 0. To continue a run, use
                --ckpt_path instead.
            compile: torch.compile each transformer block (fuses norms, RoPE, SwiGLU; pays on GPU for long runs).
            max_nonfinite_steps: stop the run when the loss is inf/NaN for this many optimizer steps in a row.
            preference: preference tuning on chosen/rejected pairs (data.format preference): the objective (dpo, ipo,
                simpo) and its beta. The reference model is the one training starts from: init_adapter, or the
                base with the adapters off. null: supervised fine-tuning.
        """
        super().__init__()
        if checkpoint_dir is not None:
            path = Path(checkpoint_dir)
            if not path.exists():
                raise FileNotFoundError(f"model.checkpoint_dir {path} does not exist. {WEIGHTS_HELP}. "
                                        "Or set model.checkpoint_dir: null for random init")
            detect_format(path)  # fails now, before anything is allocated, if no weights are there
        if model is None and checkpoint_dir is None:
            raise ValueError("model.model: give a preset name, or model.checkpoint_dir to take the model's own config "
                             "from its params.json / config.json")
        self.config = LlamaConfig.from_name(model, max_seq_len=max_seq_len) if model is not None else (
            dataclasses.replace(checkpoint_config(checkpoint_dir), max_seq_len=max_seq_len))
        if init_adapter is not None and not Path(init_adapter).exists():
            raise FileNotFoundError(f"model.init_adapter {init_adapter} does not exist; give a fit.py .ckpt or a "
                                    "PEFT adapter folder")
        if init_adapter is not None and lora is None:
            raise ValueError("model.init_adapter starts from an adapter's LoRA weights: it needs model.lora")
        if preference is not None and lora is None:
            raise ValueError("model.preference with model.lora null: the reference model is the base with the "
                             "adapters off, so preference tuning trains an adapter; set model.lora")
        self.lora, self.preference = lora, preference
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "lora", "preference"])
        self.hparams["lora"] = asdict(lora) if lora is not None else None  # plain types: weights_only loading
        self.hparams["preference"] = asdict(preference) if preference is not None else None
        self.checkpoint_dir, self.base_dtype_name, self.init_adapter = checkpoint_dir, base_dtype, init_adapter
        self.gradient_checkpointing, self.loss_chunk_size, self.init_seed = (
            gradient_checkpointing, loss_chunk_size, init_seed)
        check_checkpoint_layers(checkpoint_layers, self.config.n_layers, key="model.checkpoint_layers")
        self.checkpoint_layers = checkpoint_layers
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.compile_blocks = compile
        if max_nonfinite_steps < 1:
            raise ValueError(f"model.max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.model: Llama | None = None
        self.plan: RunPlan | None = None  # decided at start-up (plan_for), before anything is built
        # Checkpoints hold the trainable weights only; the frozen base comes from checkpoint_dir. Lightning's strict
        # check would reject that, so on_load_checkpoint checks the keys itself (misspelled keys still fail). The
        # module's state_dict leaves the base out, so no strategy gathers it to save it (FSDP2 gathered a sharded
        # base whole onto rank 0, and cannot gather an NF4 one).
        self.strict_loading = False
        self._register_state_dict_hook(run_checkpoint.leave_out_frozen)
        self.val_loss = MeanMetric()
        # Preference runs: TRL's metrics over the validation pairs, each weighted by pair (and synced over ranks)
        self.val_pairs = torch.nn.ModuleDict({m.replace("/", "_"): MeanMetric() for m in METRICS}) if (
            preference is not None) else None
        self._rng_to_restore: dict[str, Any] | None = None
        self._resumed = False
        self._configured_schedule: dict[str, Any] = {}
        self._base_released = False

    @classmethod
    def validating(cls, run: TrainedRun, plan: RunPlan, device: torch.device) -> LlamaLoRAModule:
        """A module around a trained run's model, built as ``plan`` says (evaluate.py validates it): configure_model
        keeps it. A preference run is validated on its pairs with its objective and reference."""
        preference = PreferenceSettings(**run.preference) if run.preference and run.lora is not None else None
        module = cls(model=run.preset, checkpoint_dir=run.checkpoint_dir, lora=run.lora if preference else None,
                     preference=preference)
        module.model = run.build(plan, device)
        module.config, module.plan = module.model.config, plan
        if preference is not None and preference.needs_reference and run.init_adapter is not None:
            # a preference run's reference: the adapter it started from, as in training
            if not Path(run.init_adapter).exists():
                raise FileNotFoundError(f"{run.source} was trained from model.init_adapter {run.init_adapter}, its "
                                        "reference model, which no longer exists; put it back to evaluate the pairs")
            module.init_adapter = run.init_adapter
            set_reference_adapter(module.model, module._init_adapter_tensors())
        return module

    # ----- the run plan -----

    def plan_for(self, trainer: L.Trainer | None) -> RunPlan:
        """The run plan of this module's settings under ``trainer`` (its device, precision and strategy). Without a
        Trainer, the module builds on the CPU: the plan of "auto" there."""
        if trainer is None:
            return make_plan("cpu", "auto", self.base_dtype_name, lora=self.lora is not None,
                             compile=self.compile_blocks)
        plan = make_plan(trainer.strategy.root_device, trainer.precision, self.base_dtype_name,
                         lora=self.lora is not None, strategy=trainer.strategy, compile=self.compile_blocks)
        if plan.quantization and isinstance(trainer.strategy, ModelParallelStrategy):
            meta_model(self.config, plan)  # refuses, before any rank starts, an NF4 weight FSDP2 cannot split
        why = getattr(trainer, "precision_reason", "")  # Trainer(precision="auto") says why it chose
        return dataclasses.replace(plan, reason=why) if why else plan

    # ----- building -----

    def configure_model(self) -> None:
        """Build on the meta device, fill from the checkpoint (mmap, assign) or init randomly, then add LoRA.

        After ``release_base`` (the end of fit), the base is built again and the trained weights are kept."""
        if self.model is not None and not self._base_released:
            return
        trained = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad} if self.model else {}
        if self.plan is None:
            self.plan = self.plan_for(self._trainer)
        self._build()
        if trained:
            self.model.load_state_dict(trained, strict=False)
            self._base_released = False

    def _build(self) -> None:
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        mesh = self.device_mesh  # set by ModelParallelStrategy only
        plan = self.plan
        if mesh is None:
            self.model = build_model(self.config, self.checkpoint_dir, plan, device, seed=self.init_seed,
                                     gradient_checkpointing=self.gradient_checkpointing,
                                     checkpoint_layers=self.checkpoint_layers)
        else:  # built on the meta device, sharded, then each rank fills its own shards (below)
            sd, sources, _ = open_checkpoint(self.checkpoint_dir, self.config) if self.checkpoint_dir else (None,) * 3
            self.model = meta_model(self.config, plan, self.gradient_checkpointing, self.checkpoint_layers)
            if sd is not None:
                check_state_dict(self.model, sd, sources, what=f"model {self.hparams.model or self.checkpoint_dir!r}")
        if self.lora is not None:
            apply_lora(self.model, self.lora, plan.lora_dtype)
            mark_only_lora_as_trainable(self.model)
            if mesh is None:
                self._start_from_adapter()
        log.info(trainable_summary(self.model))
        if plan.quantization:  # each DDP rank quantizes its own identical copy: nothing to broadcast (or with)
            self._ddp_params_and_buffers_to_ignore = [n for n, p in self.named_parameters() if isinstance(p, NF4Weight)]
        if self.compile_blocks:
            self.model.compile_blocks()
        if mesh is not None:
            # FSDP2 over the data-parallel ranks: each block, the output layer (gathered on its own by the loss),
            # then the root (embeddings, final norm; a tied output layer with the embedding it shares).
            data_parallel = mesh["data_parallel"]
            if device.type == "cpu":
                map_large_buffers()  # the gathered blocks, freed and gathered again, fragmented the heap
            for layer in self.model.layers:
                fully_shard(layer, mesh=data_parallel)
            if not self.config.tie_embeddings:
                fully_shard(self.model.output, mesh=data_parallel)
            fully_shard(self.model, mesh=data_parallel)
            self.model.to_empty(device=device)
            fill_shards(self.model, sd, seed=self.init_seed)
            if self.lora is not None:  # each rank copies its rows of the adapter into its shards
                self._start_from_adapter()

    def _init_adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA weights (model.init_adapter) this run starts from, by the model's parameter names, on its device
        in its LoRA dtype. Same targets and rank; another alpha is absorbed into B; a LoRA adapter under DoRA gets the
        magnitudes m = ||W + s B A||, so that they make exactly the adapter's model."""
        adapter = open_run(self.init_adapter, self.checkpoint_dir, self.hparams.model)
        if adapter.lora is None:
            raise ValueError(f"model.init_adapter {self.init_adapter} holds no LoRA weights (trained with lora: null)")
        if adapter.lora.use_dora and not self.lora.use_dora:
            raise ValueError(f"model.init_adapter {self.init_adapter} is a DoRA adapter; set model.lora.use_dora: true")
        for key in ("targets", "r"):
            ours, theirs = getattr(self.lora, key), getattr(adapter.lora, key)
            if (sorted(ours) if key == "targets" else ours) != (sorted(theirs) if key == "targets" else theirs):
                raise ValueError(f"model.init_adapter {self.init_adapter} has lora.{key} {theirs}, this run "
                                 f"{ours}; set model.lora.{key} to the adapter's")
        rescale = adapter.lora.scale / self.lora.scale
        own = dict(self.model.named_parameters())
        tensors = {name: (t * rescale if name.endswith("lora_b") else t).to(own[name].device, own[name].dtype)
                   for name, t in adapter.tensors.items()}
        if self.lora.use_dora and not adapter.lora.use_dora:  # DoRA from a LoRA adapter: m = ||W + s B A||
            for name, layer in lora_layers(self.model):  # under FSDP2 each rank its own rows, then gathered
                w, start = local_rows(layer.weight)
                b = tensors[f"{name}.lora_b"][start : start + w.shape[0]]
                norms = row_norms(w, tensors[f"{name}.lora_a"], b, layer.scaling).to(layer.lora_a.dtype)
                tensors[f"{name}.lora_magnitude"] = gather_rows(norms, layer.weight)
        return tensors

    def _start_from_adapter(self) -> None:
        """model.init_adapter: copy its LoRA weights into this new run's (not on a resume: the checkpoint has them),
        so that it starts from exactly the adapter's model; a preference run keeps them as its reference, also after
        a resume (SFT, then DPO from the SFT adapter)."""
        if self.init_adapter is None:
            return
        resuming = self._trainer is not None and self.trainer.ckpt_path
        reference = self.preference is not None and self.preference.needs_reference
        if resuming and not reference:
            return
        tensors = self._init_adapter_tensors()
        if not resuming:
            load_rows(self.model, tensors)
            log.info("Started from the LoRA weights of %s (a new run: step 0, this run's data and schedule)",
                     self.init_adapter)
        if reference:
            set_reference_adapter(self.model, tensors)

    def setup(self, stage: str) -> None:
        if self.plan is None:
            self.plan = self.plan_for(self.trainer)
            self.plan.log()
        interval, accumulate = self.trainer.val_check_interval, self.trainer.accumulate_grad_batches
        if stage == "fit" and isinstance(interval, int) and interval % accumulate:
            log.warning("trainer.val_check_interval counts micro-batches: %d with accumulate_grad_batches %d "
                        "validates every %.1f optimizer steps", interval, accumulate, interval / accumulate)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "load_tokenizer"):
            datamodule.load_tokenizer().check_fits(self.config.vocab_size)
        pairs = getattr(datamodule, "format", None) == "preference"
        if datamodule is not None and pairs != (self.preference is not None):
            raise ValueError("data.format preference goes with model.preference (the objective: dpo, ipo or simpo)"
                             if pairs else "model.preference trains on chosen/rejected pairs: set data.format: "
                             "preference")

    def on_train_end(self) -> None:
        # Called after every callback's on_train_end (checkpoints written, summary printed) and before Lightning's
        # teardown, which moves the module to the CPU: a 7B GPU run would copy its 13 GB base into host RAM.
        self.release_base()

    def release_base(self) -> None:
        """Free the frozen base weights (the trained ones stay). The next ``configure_model`` builds the base again."""
        released = 0
        for module in self.model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and not p.requires_grad and not isinstance(p, DTensor):  # FSDP2 shards: kept
                    released += p.numel()
                    module._parameters[name] = torch.nn.Parameter(torch.empty(0, dtype=p.dtype, device=p.device),
                                                                  requires_grad=False)
        self._base_released = released > 0
        log.debug("Released %d frozen base parameters before teardown", released)

    def configure_callbacks(self) -> list[L.Callback]:
        # Always on, whatever the config's callback list: save-and-stop on SIGTERM/SIGINT, and the numerics guard.
        return [GracefulStop(), NumericsGuard(patience=self.max_nonfinite_steps)]

    # ----- training -----

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return token_loss_sum(self.model, batch["input_ids"], batch["labels"], self.loss_chunk_size,
                              batch.get("segment_ids"))

    def _pair_scores(self, batch: dict[str, torch.Tensor]) -> PairScores:
        reference = batch.get("reference_logps")  # precomputed before training (precompute_reference): (P, 2)
        if reference is not None:
            reference = torch.cat([reference[:, 0], reference[:, 1]])
        return score_pairs(self.model, batch["input_ids"], batch["labels"], self.preference, self.loss_chunk_size,
                           reference)

    def _preference_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores, weight = self._pair_scores(batch), batch["pair_weight"]
        n = weight.sum()
        self.log("train/loss", (scores.losses.detach() * weight).sum() / n.clamp(min=1), prog_bar=True, on_step=True,
                 on_epoch=True, batch_size=int(n))
        for name, values in pair_metrics(scores).items():  # TRL's names, under train/ as TensorBoard shows TRL's
            self.log(f"train/{name}", (values * weight).sum() / n.clamp(min=1), on_step=True, on_epoch=True,
                     batch_size=int(n))
        # The mean over the pairs of the whole accumulation window on all devices, as SFT's over its tokens.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        return (scores.losses * weight).sum() * scale / batch["n_targets_window"].clamp(min=1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.preference is not None:
            return self._preference_step(batch)
        loss_sum, n = self._loss(batch)
        # Average over the target tokens of the whole accumulation window on all devices. Lightning divides by
        # accumulate_grad_batches and DDP averages over ranks; multiplying by both undoes that exactly.
        window = batch["n_targets_window"].clamp(min=1)
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        self.log("train/loss", loss_sum.detach() / n.clamp(min=1), prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=int(n))
        return loss_sum * scale / window

    def on_fit_start(self) -> None:
        if self.preference is not None and self.preference.precompute_reference:
            datamodule = self.trainer.datamodule
            for dataset in (datamodule.train_set, datamodule.val_set):
                if dataset is not None:
                    dataset.reference = self._reference_logps(dataset, datamodule.collator(),
                                                              datamodule.micro_batch_size)

    @torch.no_grad()
    def _reference_logps(self, dataset: Any, collate: Any, batch_size: int) -> torch.Tensor:
        """(n, 2) the reference's log-probabilities of chosen and rejected for every pair of ``dataset``, in one pass
        before training (TRL's precompute_ref_log_probs): each rank computes its share, in the training precision,
        and all ranks gather the whole."""
        world, rank, n = self.trainer.world_size, self.trainer.global_rank, len(dataset)
        share = -(-n // world)
        mine = range(rank * share, min(n, (rank + 1) * share))
        out = torch.zeros(share, 2, dtype=torch.float32, device=self.device)
        with self.trainer.precision_plugin.forward_context(), reference_model(self.model):
            for start in range(0, len(mine), batch_size):
                batch = collate([dataset[BatchItem(i)] for i in mine[start : start + batch_size]])
                logps, _ = sequence_logps(self.model, batch["input_ids"].to(self.device),
                                          batch["labels"].to(self.device), self.loss_chunk_size)
                pairs = batch["pair_weight"].shape[0]
                out[start : start + pairs] = torch.stack([logps[:pairs], logps[pairs:]], dim=1).float()
        whole = self.all_gather(out).reshape(-1, 2) if world > 1 else out
        log.info("Reference log-probabilities of %d pairs computed before training", n)
        return whole[:n].cpu()

    def on_train_start(self) -> None:
        if self._resumed:
            self._apply_configured_schedule()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The RNG state is restored here, at the first batch after resuming, not in on_train_start: Lightning and
        # the DataLoader draw random numbers in between, which the uninterrupted run drew before saving.
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.preference is not None:
            scores, weight = self._pair_scores(batch), batch["pair_weight"]
            self.val_loss.update(scores.losses, weight=weight)  # pair-weighted over batches and ranks
            for name, values in pair_metrics(scores).items():
                self.val_pairs[name.replace("/", "_")].update(values, weight=weight)
            return
        loss_sum, n = self._loss(batch)
        self.val_loss.update(loss_sum / n.clamp(min=1), weight=n)  # token-weighted over batches and ranks

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        self.val_loss.reset()
        if self.preference is None:
            self.log("val/ppl", loss.exp())  # perplexity of the same target tokens: exp of their mean loss
            return
        for name in METRICS:
            metric = self.val_pairs[name.replace("/", "_")]
            self.log(f"val/{name}", metric.compute())
            metric.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if self.lora is not None and self.lora.lr_ratio is not None:
            # LoRA+: the B matrices in a group of their own, at lr x lr_ratio (the scheduler scales both groups)
            optimizer = self.optimizer_factory([{"params": [p for n, p in named if not n.endswith("lora_b")]},
                                                {"params": [p for n, p in named if n.endswith("lora_b")]}])
            optimizer.param_groups[1]["lr"] = optimizer.defaults["lr"] * self.lora.lr_ratio
        else:
            optimizer = self.optimizer_factory([p for _, p in named])
        scheduler = self.scheduler_factory(optimizer)
        if getattr(scheduler, "max_steps", 0) is None:
            # The optimizer steps of the whole run, also when it is set by max_epochs (max_steps -1).
            total = self.trainer.estimated_stepping_batches
            scheduler.max_steps = int(total) if math.isfinite(total) else None
        # What this run's config asks for; a resumed checkpoint overwrites it in both objects (on_train_start).
        self._configured_schedule = {
            "groups": [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups],
            "scheduler": _schedule_settings(scheduler)}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _apply_configured_schedule(self) -> None:
        """After a resume: the restored optimizer and scheduler carry the old run's peak lr, warmup, length and floor.
        This run's settings replace them from the restored step, with the restored AdamW moments, in one log line."""
        optimizer, scheduler = self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler
        changes: dict[str, str] = {}  # setting -> "old -> new"
        for group, wanted in zip(optimizer.param_groups, self._configured_schedule["groups"]):
            for key, value in wanted.items():
                if group.get(key) != value:
                    changes.setdefault("lr" if key == "initial_lr" else key, f"{_g(group.get(key))} -> {_g(value)}")
                    group[key] = value
        for key, value in self._configured_schedule["scheduler"].items():
            if getattr(scheduler, key) != value:
                changes[key] = f"{_g(getattr(scheduler, key))} -> {_g(value)}"
                setattr(scheduler, key, value)
        if not changes:
            return
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        with warnings.catch_warnings():  # get_lr outside step() warns; a closed-form schedule is what is wanted
            warnings.simplefilter("ignore")
            lrs = (scheduler._get_closed_form_lr() if hasattr(scheduler, "_get_closed_form_lr")
                   else scheduler.get_lr())
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)
        end = getattr(scheduler, "max_steps", None)
        log.info("Resumed with this run's schedule: %s from step %d%s",
                 ", ".join(f"{k} {v}" for k, v in changes.items()), self.trainer.global_step,
                 f"; the schedule now ends at step {end}" if end else "")

    # ----- adapter-only checkpoints (run_checkpoint.py says what they hold) -----

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        run_checkpoint.save(checkpoint, self, rng=_get_rng_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model is None:  # loading outside a Trainer (e.g. for generation): build first
            self.configure_model()
        # ModelParallelStrategy loads and removes "state_dict" before this hook; the key list is kept beside it.
        expected = run_checkpoint.trained_names(self)
        got = set(run_checkpoint.trainable_keys(checkpoint))
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        if missing or unexpected:
            raise ValueError(
                f"Checkpoint does not match this model's trainable weights: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); resume with the "
                "same model preset and LoRA settings it was trained with")
        self._rng_to_restore = run_checkpoint.rng_state(checkpoint)
        self._resumed = True


def _g(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _schedule_settings(scheduler: Any) -> dict[str, Any]:
    """A scheduler's own settings (WarmupCosineLR: warmup_steps, max_steps, min_lr_ratio), not its position."""
    position = {"base_lrs", "last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "lr_lambdas",
                "_is_initial", "verbose"}
    return {k: v for k, v in scheduler.state_dict().items() if k not in position and not k.startswith("_")}


def _get_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
