"""The ablation study: gradient accumulation (GA) x mixed precision (MP) x LoRA x gradient checkpointing (GC).

``memory_breakdown`` applies the library's analytic model (llama_lora.memory: parameters, gradients, optimizer
state, autocast's weight copies, activations, loss) to a cell; ``run_cell`` measures one cell through the real
Lightning pipeline. ablate.py runs the grid, each cell in its own process.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from llama_lora import memory
from llama_lora.config import LlamaConfig
from llama_lora.memory import GIB
from llama_lora.plan import make_plan, native_precision


@dataclass(frozen=True)
class Cell:
    ga: bool
    mp: bool
    lora: bool
    gc: bool
    nf4: bool = False  # QLoRA: the frozen base in 4-bit NormalFloat (with LoRA only)
    dora: bool = False  # DoRA instead of LoRA, at the same rank (with LoRA only)

    @property
    def name(self) -> str:
        flags = asdict(self)
        for extra in ("nf4", "dora"):
            if not flags[extra]:
                del flags[extra]  # the 16 cells of the original grid keep their names
        return " ".join(f"{k.upper()}{'+' if v else '-'}" for k, v in flags.items())


def grid() -> list[Cell]:
    """The 16 GA x MP x LoRA x GC cells, then the 8 LoRA cells again on an NF4 base, then again as DoRA."""
    cells = [Cell(*bits) for bits in itertools.product((False, True), repeat=4)]
    return (cells + [Cell(c.ga, c.mp, True, c.gc, nf4=True) for c in cells if c.lora]
            + [Cell(c.ga, c.mp, True, c.gc, dora=True) for c in cells if c.lora])


@dataclass
class StudySettings:
    """What every cell shares: the same examples and optimizer steps. GA on keeps the global batch with a smaller
    micro-batch (global_batch / accumulate)."""

    model: str = "small"
    global_batch: int = 4
    accumulate: int = 4
    seq_len: int = 512  # max_seq_len of the data; the analytic model assumes full-length sequences
    steps: int = 8
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv")
    lora_r: int = 16
    device: str = "cpu"
    num_samples: int = 64  # training records (each cell sees the same ones)
    val_size: int = 8
    half: Literal["auto", "bf16", "fp16"] = "auto"  # MP's dtype; auto: see half_dtype()

    def micro_batch(self, cell: Cell) -> int:
        return self.global_batch // self.accumulate if cell.ga else self.global_batch

    def half_dtype(self) -> str | None:
        """MP's half precision: fp16 on a GPU (the seed's 16-mixed), bf16 on a CPU that computes it natively, none on
        an AVX2-only CPU (bf16 emulated at about 1 GFLOP/s: its MP cells are skipped), unless ``half`` says."""
        if self.half != "auto":
            return self.half
        if self.device == "cuda":
            return "fp16"
        return "bf16" if native_precision("cpu")[0] == "bf16-mixed" else None

    def precision(self, cell: Cell) -> str:
        return {"bf16": "bf16-mixed", "fp16": "16-mixed"}[self.half_dtype()] if cell.mp else "32-true"

    def base_dtype(self, cell: Cell) -> str:
        # MP with LoRA: the frozen base in the half precision. Full fine-tuning keeps fp32 master weights: the
        # GradScaler cannot unscale half-precision gradients.
        if cell.nf4:
            return "nf4"
        return self.half_dtype() if cell.mp and cell.lora else "fp32"


def memory_breakdown(config: LlamaConfig, cell: Cell, settings: StudySettings, loss_chunk: int = 1024
                     ) -> dict[str, int]:
    """The library's analytic model (llama_lora.memory) for one cell of the grid, at full-length sequences."""
    plan = make_plan(settings.device, settings.precision(cell), settings.base_dtype(cell), lora=cell.lora)
    return memory.memory_breakdown(
        config, plan=plan, lora_targets=settings.lora_targets if cell.lora else None, lora_r=settings.lora_r,
        micro_batch=settings.micro_batch(cell), seq_len=settings.seq_len, gradient_checkpointing=cell.gc,
        loss_chunk=loss_chunk, dora=cell.dora)


# ----- measuring one cell -----

def run_cell(cell: Cell, settings: StudySettings, data_path: str, tokenizer_path: str | None) -> dict[str, Any]:
    """Train one cell for ``settings.steps`` optimizer steps through Lightning; call in a fresh process, so that the
    peak memory is the cell's own."""
    import lightning as L
    import torch

    from llama_lora.data import AlpacaDataModule
    from llama_lora.memory import peak_rss_bytes
    from llama_lora.module import LlamaLoRAModule, LoRASettings

    torch.manual_seed(0)
    device = settings.device
    baseline_rss = peak_rss_bytes() / GIB  # the runtime, before the model
    lora = LoRASettings(targets=list(settings.lora_targets), r=settings.lora_r, alpha=2 * settings.lora_r,
                        dropout=0.0, use_dora=cell.dora) if cell.lora else None
    module = LlamaLoRAModule(model=settings.model, base_dtype=settings.base_dtype(cell), lora=lora,
                             gradient_checkpointing=cell.gc, max_seq_len=settings.seq_len)
    data = AlpacaDataModule(data_path=data_path, tokenizer_path=tokenizer_path, num_samples=settings.num_samples,
                            val_size=settings.val_size, max_seq_len=settings.seq_len,
                            micro_batch_size=settings.micro_batch(cell), seed=0,
                            demo_vocab_size=module.config.vocab_size)
    accumulate = settings.accumulate if cell.ga else 1
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision=settings.precision(cell), max_steps=settings.steps,
                        accumulate_grad_batches=accumulate, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, val_check_interval=settings.steps * accumulate,
                        check_val_every_n_epoch=None, use_distributed_sampler=False)  # every held-out record
    result: dict[str, Any] = {"cell": cell.name, **asdict(cell), "precision": settings.precision(cell),
                              "base_dtype": settings.base_dtype(cell), "micro_batch": settings.micro_batch(cell),
                              "accumulate": accumulate}
    tokens = {"n": 0, "targets": 0, "loss_sum": 0.0}
    start = time.perf_counter()

    class Measure(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tokens["n"] += int(batch["n_tokens"])
            # Token-weighted over every micro-batch: the same number whatever the micro-batch size.
            tokens["targets"] += int(batch["n_targets"])
            tokens["loss_sum"] += float(trainer.callback_metrics["train/loss_step"]) * int(batch["n_targets"])

        def on_train_end(self, trainer, pl_module):
            # Here, at the end of the steps being measured. The optimizer state is dropped below and the module then
            # releases the frozen base, so that Lightning's teardown copies only the trained weights to the host.
            seconds = time.perf_counter() - start
            metrics = trainer.callback_metrics
            result.update(oom=False, wall_s=seconds, tokens_per_s=tokens["n"] / seconds,
                          train_loss=tokens["loss_sum"] / max(tokens["targets"], 1),
                          val_loss=float(metrics.get("val/loss", math.nan)),
                          peak_rss_gib=peak_rss_bytes() / GIB, baseline_rss_gib=baseline_rss)
            if device == "cuda":
                result["max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
                result["max_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            for optimizer in trainer.optimizers:  # full fine-tuning's 54 GB of AdamW moments: not to the host
                optimizer.state.clear()

    trainer.callbacks.append(Measure())
    try:
        trainer.fit(module, data)
    except torch.cuda.OutOfMemoryError:
        return {**result, "oom": True}
    return result


# ----- tables -----

def _peak(r: dict[str, Any]) -> float | None:
    return r.get("max_allocated_gib", r.get("peak_rss_gib"))


def table2(results: list[dict[str, Any]], device: str) -> str:
    """The seed's TABLE2 (peak memory / time per cell), with the LoRA and GC dimensions."""
    what = "CUDA max allocated" if device == "cuda" else "peak RSS"
    mp = "16-mixed" if device == "cuda" else "bf16-mixed"  # the half precision of the MP cells
    lines = [f"| GA | MP ({mp}) | LoRA | GC | NF4 | DoRA | peak ({what}) | time | tokens/s | train loss | val loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        flags = " | ".join("on" if r.get(k) else "off" for k in ("ga", "mp", "lora", "gc", "nf4", "dora"))
        if r.get("oom") or "wall_s" not in r:
            lines.append(f"| {flags} | {'OOM' if r.get('oom') else r.get('skipped', 'failed')} | | | | |")
            continue
        lines.append(f"| {flags} | {_peak(r):.2f} GiB | {r['wall_s']:.1f} s | {r['tokens_per_s']:,.0f} | "
                     f"{r['train_loss']:.3f} | {r['val_loss']:.3f} |")
    return "\n".join(lines)


def table1(config: LlamaConfig, settings: StudySettings, results: list[dict[str, Any]] | None = None) -> str:
    """Analytic memory per component for every cell (GiB), the measured peak beside it, and the corrected TABLE1:
    what turning each technique on does to each component, read off the analytic model."""
    # On CPU the RSS includes the runtime (torch, Lightning) that the model does not count: compare the increase.
    measured = {r["cell"]: _peak(r) - r.get("baseline_rss_gib", 0.0) * ("max_allocated_gib" not in r)
                for r in results or [] if not r.get("oom") and "wall_s" in r}
    parts = ("params", "grads", "optimizer", "autocast_cache", "dequantized", "activations", "loss", "total")
    lines = ["| cell | " + " | ".join(parts) + " | measured | fits 40 GB | fits 80 GB |",
             "|---" * (len(parts) + 4) + "|"]  # GiB
    for cell in grid():
        b = memory_breakdown(config, cell, settings)
        m = measured.get(cell.name)
        # 10% headroom for the allocator's fragmentation and the CUDA context, which the model does not count.
        fits = ["yes" if b["total"] * 1.1 <= gb * 1e9 else "no" for gb in (40, 80)]
        lines.append(f"| {cell.name} | " + " | ".join(f"{b[p] / GIB:.2f}" for p in parts) +
                     f" | {'' if m is None else f'{m:.2f}'} | " + " | ".join(fits) + " |")
    lines += ["", "| technique | params | grads | optimizer | activations | compute |", "|---|---|---|---|---|---|"]
    for tech in ("ga", "mp", "lora", "gc", "nf4", "dora"):
        arrows = []
        for comp in ("params", "grads", "optimizer"):
            arrows.append(_direction(config, settings, tech, (comp,)))
        arrows.append(_direction(config, settings, tech, ("activations", "autocast_cache", "dequantized", "loss")))
        compute = {"ga": "= (same FLOPs, more steps of smaller matmuls)",
                   "mp": "↓ (half-precision tensor cores)", "lora": "↓ (no weight gradients: ~4N instead of 6N)",
                   "gc": "↑ (one extra forward: ~+2N per token)",
                   "nf4": "↑ (each weight dequantized in forward and backward; recomputation keeps a half copy)",
                   "dora": "↑ (each adapted weight's row norms of W + s B A every forward, and the correction)"}[tech]
        lines.append(f"| {tech.upper()} | " + " | ".join(arrows) + f" | {compute} |")
    return "\n".join(lines)


def _direction(config: LlamaConfig, settings: StudySettings, tech: str, comps: tuple[str, ...]) -> str:
    """↑, ↓ or = for a component when ``tech`` is switched on, over every setting of the others (NF4: with LoRA)."""
    signs = set()
    for cell in grid():
        if getattr(cell, tech) or cell.nf4 or cell.dora or (tech in ("nf4", "dora") and not cell.lora):
            continue
        off = memory_breakdown(config, cell, settings)
        on = memory_breakdown(config, Cell(**{**asdict(cell), tech: True}), settings)
        delta = sum(on[c] for c in comps) - sum(off[c] for c in comps)
        signs.add("↑" if delta > 0 else "↓" if delta < 0 else "=")
    return "/".join(s for s in ("↓", "=", "↑") if s in signs)
