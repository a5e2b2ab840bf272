"""Lightning's Trainer, with ``precision: auto``: mixed precision in the dtype the hardware computes natively."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT

from .config import native_dtype, resolve_precision

log = logging.getLogger(__name__)


def accelerator_device(accelerator: Any) -> torch.device:
    """The device type an accelerator setting trains on (cuda, cpu, ...)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower().replace("accelerator",
                                                                                                      "")
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu" if name in ("auto", "cpu") else name)


class Trainer(L.Trainer):
    def __init__(self, *args: Any, precision: Literal["auto"] | _PRECISION_INPUT | None = "auto",
                 accelerator: Any = "auto", **kwargs: Any) -> None:
        """Lightning's Trainer; ``precision: auto`` is bf16-mixed where the hardware computes bf16 natively (Ampere
        or newer GPUs, CPUs with AVX-512 BF16 or AMX), 16-mixed on older GPUs and 32-true on AVX2-only CPUs, where
        bf16 matmuls are emulated about 150x slower than fp32. The choice and its reason are logged."""
        if precision == "auto":
            device = accelerator_device(accelerator)
            precision = resolve_precision("auto", device)
            log.info("trainer.precision auto: %s, because %s", precision, native_dtype(device)[1])
        super().__init__(*args, precision=precision, accelerator=accelerator, **kwargs)
