"""The run plan: a run's settings turned, once, into every dtype and path it computes with.

The settings are the device, ``trainer.precision``, ``model.base_dtype`` (``nf4`` included: QLoRA's quantized base),
LoRA or full fine-tuning, packing and the strategy. ``make_plan`` turns them into a frozen ``RunPlan`` at start-up,
which says how each kind of tensor is stored, what the matmuls compute in, whether autocast is on, what the KV cache
holds and how packed rows attend. This module is the only place where "auto" is resolved and the only caller of the
CPU-capability probe; the Trainer, the module, generation, the callbacks, the scripts and the benchmarks read the plan.
It is logged in one line (``RunPlan.describe``) and saved in every checkpoint (``RunPlan.to_dict``).

The rules, measured on 2 CPU cores (README): bf16 is the fast path only where the hardware computes it natively
(Ampere or newer GPUs, CPUs with AVX-512 BF16 or AMX); an AVX2-only CPU emulates a bf16 matmul at about 1 GFLOP/s
against 147 for fp32, so "auto" is fp32 there. fp16 is never a CPU choice.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from .layout import linear_of

try:  # torch's variable-length flash attention, which model.py calls for packed rows on a GPU
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    VARLEN = True
except ImportError:
    VARLEN = False

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DtypeName = Literal["bf16", "fp16", "fp32"]
BaseDtypeName = Literal["auto", "bf16", "fp16", "fp32", "nf4"]  # nf4: QLoRA's 4-bit base (quant.py)
PrecisionName = Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
# Lightning's own short names for the precisions above.
_ALIASES = {"32": "32-true", 32: "32-true", "16": "16-mixed", 16: "16-mixed", "bf16": "bf16-mixed"}
_HALF = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16,
         "16-true": torch.float16}
_MIXED_OF = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}  # Lightning's name for compute in a dtype
# Measured on 2 cores with 1024 x 1024 matmuls (README): AVX2-only CPUs emulate bf16 and fp16.
AVX2_GFLOPS = {"bf16": 1.0, "fp16": 0.9, "fp32": 147.0}


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX); AVX2-only CPUs emulate them."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _native(device: torch.device) -> tuple[str, str]:
    """The fastest correct compute dtype on ``device`` ("bf16", "fp16" or "fp32"), and why, in words for the log."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"{name} computes bf16 natively"
        return "fp16", f"{name} has no native bf16 (before Ampere): fp16 with a loss scaler"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return "bf16", "this CPU computes bf16 natively (AVX-512 BF16 / AMX)"
        return "fp32", (f"this CPU has no native bf16 (AVX2 only): bf16 matmuls are emulated at about "
                        f"{AVX2_GFLOPS['bf16']:.0f} GFLOP/s, fp32 runs at about {AVX2_GFLOPS['fp32']:.0f}")
    return "fp32", f"{device.type}: fp32"


def native_precision(device: str | torch.device) -> tuple[str, str]:
    """Lightning's precision for compute in the device's native dtype (32-true where that is fp32), and why."""
    dtype, why = _native(torch.device(device))
    return _MIXED_OF[dtype], why


def resolve_precision(precision: Any, device: str | torch.device) -> tuple[str, str]:
    """A Lightning precision in its full name, and why it was chosen ("" when it was given). "auto" is mixed precision
    in the device's native dtype; on a CPU, 16-mixed runs as bf16-mixed (Lightning does the same)."""
    device = torch.device(device)
    if precision in (None, "auto"):
        precision, why = native_precision(device)
        return precision, f"auto: {why}"
    precision = _ALIASES.get(precision, precision)
    if precision not in ("32-true", *_HALF):
        raise ValueError(f"trainer.precision {precision!r} is not supported; use auto, 32-true, bf16-mixed, 16-mixed, "
                         "bf16-true or 16-true")
    if precision == "16-mixed" and device.type == "cpu":
        return "bf16-mixed", "16-mixed on a CPU runs as bf16-mixed (no fp16 autocast on CPUs)"
    return precision, ""


@dataclass(frozen=True)
class RunPlan:
    """How a run stores and computes each kind of tensor. Build it with ``make_plan`` (or ``RunPlan.uniform``)."""

    device: str = "cpu"  # the device type: cpu, cuda
    precision: str = "32-true"  # Lightning's precision, resolved
    compute_dtype: torch.dtype = torch.float32  # what the matmuls compute in (autocast's dtype when it is on)
    autocast: bool = False  # torch.autocast(device, compute_dtype) around forward, loss and generation
    linear_dtype: torch.dtype = torch.float32  # the blocks' linear weights: storage, or the dtype NF4 dequantizes to
    quantization: str | None = None  # "nf4": the blocks' linear weights in 4-bit NormalFloat (quant.py)
    embedding_dtype: torch.dtype = torch.float32
    norm_dtype: torch.dtype = torch.float32  # the norms and the output layer
    lora_dtype: torch.dtype = torch.float32  # LoRA weights (and so their gradients and AdamW state)
    activation_dtype: torch.dtype = torch.float32  # the residual stream: what looked-up embeddings are cast to
    kv_cache_dtype: torch.dtype = torch.float32  # what keys and values come out in, so what generation caches
    packed_attention: str = "spans"  # packed rows: spans (CPU), varlen (CUDA flash, half precision), mask
    full_finetune: bool = False  # every weight trained (model.lora null)
    reason: str = ""  # why "auto" chose what it chose
    warnings: tuple[str, ...] = ()

    @classmethod
    def uniform(cls, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> RunPlan:
        """Every base tensor stored and computed in ``dtype``, no autocast, LoRA in fp32: a plain model (tests,
        conversions). The plan of 32-true with that base dtype."""
        return dataclasses.replace(make_plan(device, "32-true", DTYPE_NAMES[dtype]), warnings=())

    def dtype_of(self, name: str, tied: bool = False) -> torch.dtype:
        """The storage dtype of a base tensor by its Meta name (``tied``: the output layer is the embedding, which
        then computes as the output layer does)."""
        if name.endswith("tok_embeddings.weight"):
            return self.norm_dtype if tied else self.embedding_dtype
        # a block linear's bias (Qwen2's q/k/v) as its weight computes: an NF4 weight's compute dtype
        layer = linear_of(name)
        return self.linear_dtype if layer is not None and layer.quantized else self.norm_dtype

    def autocast_context(self) -> torch.autocast:
        """Autocast as the plan says (off: a no-op context), as Lightning's precision plugin enters it."""
        return torch.autocast(self.device, dtype=self.compute_dtype, enabled=self.autocast, cache_enabled=False)

    def describe(self) -> str:
        """The plan in one line, for the log."""
        n = DTYPE_NAMES.get
        linears = f"nf4 -> {n(self.linear_dtype)}" if self.quantization else n(self.linear_dtype)
        why = f" ({self.reason})" if self.reason else ""
        trained = "all weights (full fine-tuning)" if self.full_finetune else f"LoRA {n(self.lora_dtype)}"
        return (f"Plan: {self.device}, {self.precision}{why}; compute {n(self.compute_dtype)}"
                f"{' (autocast)' if self.autocast else ''}, block linears {linears}, embedding "
                f"{n(self.embedding_dtype)}, norms and output {n(self.norm_dtype)}, trained {trained}, KV cache "
                f"{n(self.kv_cache_dtype)}, packed rows {self.packed_attention}")

    def log(self) -> None:
        """The plan line and its warnings, once per run (rank 0)."""
        if getattr(rank_zero_only, "rank", 0) != 0:
            return
        for warning in self.warnings:
            log.warning(warning)
        log.info(self.describe())

    def to_dict(self) -> dict[str, Any]:
        """Plain types only: checkpoints load with weights_only=True."""
        return {f.name: DTYPE_NAMES.get(v, v) if isinstance(v, torch.dtype) else list(v) if isinstance(v, tuple)
                else v for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: DTYPES[v] if kinds[k] == "torch.dtype" else tuple(v) if kinds[k].startswith("tuple")
                      else v for k, v in data.items() if k in kinds})


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device ``auto`` (or None) means: CUDA where there is a GPU, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _packed_attention(device: str, compute: torch.dtype) -> str:
    if device == "cpu":
        return "spans"  # one causal attention per example: the cost of the examples alone
    if device == "cuda" and VARLEN and compute in (torch.float16, torch.bfloat16):
        return "varlen"
    return "mask"


def make_plan(device: str | torch.device = "cpu", precision: Any = "auto", base_dtype: str = "auto",
              lora: bool = True, strategy: Any = None, trained_base: str | None = None,
              compile: bool = False) -> RunPlan:
    """The plan for these settings (see the module docstring); refuses, in one line, what cannot run.

    ``base_dtype`` auto stores the frozen base in the dtype the compute runs in (fp32 masters for full fine-tuning);
    ``trained_base`` is the quantization an adapter was trained on ("nf4"): auto then quantizes the base the same way,
    so the adapter computes on the 4-bit weights it learned on.
    """
    device = torch.device(device)
    precision, why = resolve_precision(precision, device)
    half = _HALF.get(precision)
    autocast, true_half = precision.endswith("-mixed"), precision.endswith("-true") and half is not None
    notes = []
    quantization = "nf4" if base_dtype == "nf4" or (base_dtype == "auto" and trained_base == "nf4") else None
    if quantization and not lora:
        raise ValueError("model.base_dtype nf4 quantizes a frozen base: it needs model.lora (QLoRA); full fine-tuning "
                         "trains every weight, in fp32")
    if true_half:  # Lightning's HalfPrecision converts every weight, LoRA's too, to the half dtype
        storage = half
    elif base_dtype in ("auto", "nf4"):
        storage = half if half is not None and lora else torch.float32
    else:
        storage = DTYPES[base_dtype]
    if not lora and precision == "16-mixed" and storage != torch.float32:
        raise ValueError("Full fine-tuning (lora: null) under 16-mixed needs base_dtype: fp32, since the GradScaler "
                         "cannot unscale half-precision gradients")
    compute = half if half is not None else storage if not quantization else torch.float32
    norm = compute if quantization else storage
    # An NF4 base keeps its embedding in half precision: only the rows looked up are cast (activation_dtype).
    embedding = (compute if compute != torch.float32 else torch.bfloat16) if quantization else storage
    activation = norm if autocast else compute
    if device.type == "cpu" and compute != torch.float32:
        native = cpu_has_native_bf16()
        if compute == torch.float16 or not native:
            reason = "fp16 matmuls are emulated on every CPU" if native else _native(device)[1]
            notes.append(f"{precision} with model.base_dtype {base_dtype} on this CPU: {reason}, so a run can take "
                         f"100x longer. Use trainer.precision auto and model.base_dtype auto ({_native(device)[0]} "
                         "here)")
    _check_strategy(strategy)
    if compile and quantization:
        raise ValueError("model.compile with model.base_dtype nf4 (an NF4 base) is not supported; set model.compile: "
                         "false")
    return RunPlan(device=device.type, precision=precision, compute_dtype=compute, autocast=autocast,
                   linear_dtype=compute if quantization else storage, quantization=quantization,
                   embedding_dtype=embedding, norm_dtype=norm, lora_dtype=half if true_half else torch.float32,
                   activation_dtype=activation, kv_cache_dtype=compute,
                   packed_attention=_packed_attention(device.type, compute), full_finetune=not lora, reason=why,
                   warnings=tuple(notes))


def _check_strategy(strategy: Any) -> None:
    """Refuse, before anything is built, the strategies that cannot train this module to the end.

    - FSDP1 (``strategy: fsdp``): Lightning's FSDPPrecision refuses gradient clipping by norm, which every config uses.
    - ModelParallelStrategy with ``save_distributed_checkpoint: true`` (its default): torch.distributed.checkpoint
      reloads only the keys a checkpoint holds when told to, and Lightning does not tell it, so an adapter-only
      checkpoint cannot be resumed. An adapter is a few MB: one gathered file is the right form anyway.
    """
    if strategy is None:
        return
    if isinstance(strategy, FSDPStrategy):
        raise ValueError("trainer.strategy: FSDP1 (fsdp) is not supported, it cannot clip gradients by norm; use "
                         "ModelParallelStrategy (FSDP2) with save_distributed_checkpoint: false, or ddp")
    if isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint:
        raise ValueError("trainer.strategy: ModelParallelStrategy needs save_distributed_checkpoint: false (its "
                         "sharded checkpoints of an adapter-only state cannot be resumed); the adapter is gathered "
                         "into one small file")
