"""The ablation study: gradient accumulation (GA) x mixed precision (MP) x LoRA x gradient checkpointing (GC).

``memory_breakdown`` is the analytic model of where a cell's memory goes (parameters, gradients, optimizer state,
autocast's weight copies, activations, loss); ``run_cell`` measures one cell through the real Lightning pipeline.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

from .config import LlamaConfig

GIB = 2**30


@dataclass(frozen=True)
class Cell:
    ga: bool
    mp: bool
    lora: bool
    gc: bool

    @property
    def name(self) -> str:
        return " ".join(f"{k.upper()}{'+' if v else '-'}" for k, v in asdict(self).items())


def grid() -> list[Cell]:
    return [Cell(*bits) for bits in itertools.product((False, True), repeat=4)]


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

    def micro_batch(self, cell: Cell) -> int:
        return self.global_batch // self.accumulate if cell.ga else self.global_batch

    def precision(self, cell: Cell) -> str:
        if not cell.mp:
            return "32-true"
        return "16-mixed" if self.device == "cuda" else "bf16-mixed"

    def base_dtype(self, cell: Cell) -> str:
        # MP with LoRA: the frozen base in half precision (fp16 on GPU, bf16 on CPU). Full fine-tuning keeps fp32
        # master weights: the GradScaler cannot unscale half-precision gradients.
        if cell.mp and cell.lora:
            return "fp16" if self.device == "cuda" else "bf16"
        return "fp32"


def lora_param_count(config: LlamaConfig, targets: tuple[str, ...], r: int) -> int:
    kv = config.n_kv_heads * config.head_dim
    shapes = {"wq": (config.dim, config.dim), "wk": (config.dim, kv), "wv": (config.dim, kv),
              "wo": (config.dim, config.dim), "w1": (config.dim, config.hidden_dim),
              "w2": (config.hidden_dim, config.dim), "w3": (config.dim, config.hidden_dim)}
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t != "output")
    output = r * (config.dim + config.vocab_size) if "output" in targets else 0
    return config.n_layers * per_layer + output


def activation_bytes_per_token_per_layer(config: LlamaConfig, act_bytes: int, lora_targets: tuple[str, ...],
                                         mp: bool) -> int:
    """Bytes autograd keeps per token and block in this implementation (no checkpointing).

    RMSNorm keeps its input in fp32 (x2 norms); the block keeps the normalised inputs, q, k, v, the attention
    output and its reshaped copy, and four SwiGLU tensors of the hidden width. Under MP, each LoRA branch also keeps
    an fp32 and a half copy of its input. RoPE keeps nothing (its backward is the inverse rotation).
    """
    d, kv, hidden = config.dim, config.n_kv_heads * config.head_dim, config.hidden_dim
    norms = 2 * 4 * d
    attention = act_bytes * (d + d + 2 * kv + d + d)  # normed input, q, k and v, SDPA output, wo input
    ffn = act_bytes * (d + 4 * hidden)  # normed input, w1 out, w3 out, silu out, w2 input
    widths = {"wq": d, "wk": d, "wv": d, "wo": d, "w1": d, "w3": d, "w2": hidden}
    lora = sum((4 + 2) * widths[t] for t in lora_targets if t in widths) if mp else 0
    return norms + attention + ffn + lora


def memory_breakdown(config: LlamaConfig, cell: Cell, settings: StudySettings, loss_chunk: int = 1024) -> dict[str,
                                                                                                             int]:
    """Analytic peak memory of one training step, in bytes, by component."""
    n = config.n_params
    base_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[settings.base_dtype(cell)]
    n_lora = lora_param_count(config, settings.lora_targets, settings.lora_r) if cell.lora else 0
    trainable = n_lora if cell.lora else n
    params = n * base_bytes + n_lora * 4
    grads = trainable * 4  # trainable weights are fp32 in every cell
    optimizer = trainable * 8  # AdamW: exp_avg and exp_avg_sq, fp32
    # Autocast casts each fp32 weight it multiplies to half precision and caches the copy for the whole forward
    # (and backward): the seed experiment's "MP raises memory". A half-precision base has nothing to cast.
    matmul_params = n - config.vocab_size * config.dim - config.dim * (2 * config.n_layers + 1)
    autocast_cache = matmul_params * 2 if cell.mp and base_bytes == 4 else 0
    act_bytes = 2 if cell.mp else 4
    tokens = settings.micro_batch(cell) * settings.seq_len
    per_layer = activation_bytes_per_token_per_layer(config, act_bytes, settings.lora_targets if cell.lora else (),
                                                     cell.mp)
    if cell.gc:  # only each block's input is kept, plus one block's activations while it is recomputed
        activations = tokens * (config.n_layers * act_bytes * config.dim + per_layer)
    else:
        activations = tokens * config.n_layers * per_layer
    # Fused loss: one chunk of fp32 logits and their gradient, plus grad of the hidden states.
    loss = min(tokens, loss_chunk) * config.vocab_size * 8 + tokens * config.dim * act_bytes
    total = params + grads + optimizer + autocast_cache + activations + loss
    return {"params": params, "grads": grads, "optimizer": optimizer, "autocast_cache": autocast_cache,
            "activations": activations, "loss": loss, "total": total}


# ----- measuring one cell -----

def run_cell(cell: Cell, settings: StudySettings, data_path: str, tokenizer_path: str | None,
             num_samples: int = 64, val_size: int = 8, exit_on_train_end: bool = False) -> dict[str, Any]:
    """Train one cell for ``settings.steps`` optimizer steps through Lightning; call in a fresh process.

    With ``exit_on_train_end`` the process prints the result as JSON and exits at the end of training."""
    import lightning as L
    import torch

    from .data import AlpacaDataModule
    from .module import LlamaLoRAModule, LoRASettings

    torch.manual_seed(0)
    device = settings.device
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the runtime, before the model
    lora = LoRASettings(targets=list(settings.lora_targets), r=settings.lora_r, alpha=2 * settings.lora_r,
                        dropout=0.0) if cell.lora else None
    module = LlamaLoRAModule(model=settings.model, base_dtype=settings.base_dtype(cell), lora=lora,
                             gradient_checkpointing=cell.gc, max_seq_len=settings.seq_len)
    data = AlpacaDataModule(data_path=data_path, tokenizer_path=tokenizer_path, num_samples=num_samples,
                            val_size=val_size, max_seq_len=settings.seq_len,
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
            # Here, before Lightning's teardown moves the model (and, for full fine-tuning, 50+ GB of optimizer
            # state) to host memory, which is not part of the step being measured.
            seconds = time.perf_counter() - start
            metrics = trainer.callback_metrics
            result.update(oom=False, wall_s=seconds, tokens_per_s=tokens["n"] / seconds,
                          train_loss=tokens["loss_sum"] / max(tokens["targets"], 1),
                          val_loss=float(metrics.get("val/loss", math.nan)),
                          peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                          baseline_rss_gib=baseline_rss)
            if device == "cuda":
                result["max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
                result["max_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            if exit_on_train_end:  # a one-cell worker: report and leave without the teardown
                print(json.dumps(result), flush=True)
                os._exit(0)

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
    mp = "16-mixed" if device == "cuda" else "bf16-mixed"
    lines = [f"| GA | MP ({mp}) | LoRA | GC | peak ({what}) | time | tokens/s | train loss | val loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        flags = " | ".join("on" if r[k] else "off" for k in ("ga", "mp", "lora", "gc"))
        if r.get("oom") or "wall_s" not in r:
            lines.append(f"| {flags} | {'OOM' if r.get('oom') else 'failed'} | | | | |")
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
    parts = ("params", "grads", "optimizer", "autocast_cache", "activations", "loss", "total")
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
    for tech in ("ga", "mp", "lora", "gc"):
        arrows = []
        for comp in ("params", "grads", "optimizer"):
            arrows.append(_direction(config, settings, tech, (comp,)))
        arrows.append(_direction(config, settings, tech, ("activations", "autocast_cache", "loss")))
        compute = {"ga": "= (same FLOPs, more steps of smaller matmuls)",
                   "mp": "↓ (half-precision tensor cores)", "lora": "↓ (no weight gradients: ~4N instead of 6N)",
                   "gc": "↑ (one extra forward: ~+2N per token)"}[tech]
        lines.append(f"| {tech.upper()} | " + " | ".join(arrows) + f" | {compute} |")
    return "\n".join(lines)


def _direction(config: LlamaConfig, settings: StudySettings, tech: str, comps: tuple[str, ...]) -> str:
    """↑, ↓ or = for a component when ``tech`` is switched on, over every setting of the other three."""
    signs = set()
    for cell in grid():
        if getattr(cell, tech):
            continue
        off = memory_breakdown(config, cell, settings)
        on = memory_breakdown(config, Cell(**{**asdict(cell), tech: True}), settings)
        delta = sum(on[c] for c in comps) - sum(off[c] for c in comps)
        signs.add("↑" if delta > 0 else "↓" if delta < 0 else "=")
    return "/".join(s for s in ("↓", "=", "↑") if s in signs)
