"""Lightning's Trainer, with ``precision: auto`` (resolved by the run plan) and the settings this project requires."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT

from .plan import resolve_device, resolve_precision


def accelerator_device(accelerator: Any) -> torch.device:
    """The device type an accelerator setting trains on (cuda, cpu, ...)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower().replace("accelerator",
                                                                                                      "")
    return resolve_device("cuda" if name == "gpu" else name)


class Trainer(L.Trainer):
    def __init__(self, *args: Any, precision: Literal["auto"] | _PRECISION_INPUT | None = "auto",
                 accelerator: Any = "auto", use_distributed_sampler: bool = False, **kwargs: Any) -> None:
        """Lightning's Trainer.

        ``precision: auto`` is bf16-mixed where the hardware computes bf16 natively (Ampere or newer GPUs, CPUs with
        AVX-512 BF16 or AMX), 16-mixed on older GPUs and 32-true on AVX2-only CPUs, where bf16 matmuls are emulated
        about 150x slower than fp32 (``plan.resolve_precision``; the run plan logs the choice and its reason).
        ``use_distributed_sampler`` must stay false: the data module shards batches across ranks itself (an exact,
        resumable split of each global batch), which Lightning's DistributedSampler would replace.
        """
        if use_distributed_sampler:
            raise ValueError("trainer.use_distributed_sampler must be false: the data module shards each global batch "
                             "across ranks itself (exact and resumable); remove the setting")
        precision, self.precision_reason = resolve_precision(precision, accelerator_device(accelerator))
        super().__init__(*args, precision=precision, accelerator=accelerator, use_distributed_sampler=False, **kwargs)
