"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a drop-in ``nn.Linear``.

``LoRALinear`` keeps the frozen ``weight`` (and ``bias``) under their ``nn.Linear`` names, so base checkpoints
load unchanged, and adds ``lora_a`` (r, in) and ``lora_b`` (out, r):

    y = x W^T + (alpha / r) * dropout(x) A^T B^T

With ``use_dora`` (DoRA, Liu et al. 2024, arXiv:2402.09353) the adapted weight is split into a magnitude and a
direction: W' = m * (W + s B A) / ||W + s B A||, the norm taken per output row (PEFT's ``use_dora``). ``lora_magnitude``
(out,) is trainable and starts at ||W||, so training starts at the base model; the norm is a constant in backward
(the paper's section 4.3, as PEFT does), and is computed a row chunk at a time, also on an NF4 base (QDoRA).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layout import LORA_TARGETS
from .quant import CHUNK_VALUES, NF4Weight


@dataclass
class LoRASettings:
    """The LoRA settings of a run (``model.lora``), their defaults and their one check."""

    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    use_rslora: bool = False  # rsLoRA (Kalajdzievski 2023): the update scaled by alpha / sqrt(r), PEFT's use_rslora
    lr_ratio: float | None = None  # LoRA+ (Hayou et al. 2024): the B matrices learn at lr x lr_ratio
    use_dora: bool = False  # DoRA (Liu et al. 2024): a trainable magnitude per output row, PEFT's use_dora

    def __post_init__(self) -> None:
        check_lora_settings(self.targets, self.r, self.dropout, key="model.lora")
        if self.lr_ratio is not None and not self.lr_ratio > 0:
            raise ValueError(f"model.lora.lr_ratio must be > 0 (LoRA+ suggests 16), or null; got {self.lr_ratio}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.use_rslora)


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """What the update B A is multiplied by: LoRA's alpha / r (Hu et al., section 4.1), or rsLoRA's alpha / sqrt(r),
    under which the update's size no longer shrinks as r grows (Kalajdzievski 2023). Every place that scales,
    merges or exports an update reads it here."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float,
        bias: bool = False,
        device=None,
        dtype=None,
        lora_dtype: torch.dtype = torch.float32,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        check_lora_settings(None, r, dropout)
        self.r, self.alpha = r, alpha
        self.scaling = lora_scale(alpha, r, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Trainable weights in fp32 even when the frozen base is half precision: optimizer state and updates
        # stay exact, and the GradScaler sees only fp32 gradients.
        self.lora_a = nn.Parameter(torch.empty(r, in_features, device=device, dtype=lora_dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, r, device=device, dtype=lora_dtype))
        # DoRA's magnitude, one per output row (None: plain LoRA, and no key in the state dict)
        self.lora_magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=lora_dtype)) if (
            use_dora) else None
        self.merged = False
        # DPO's reference pass (``reference_model``): the base alone, or with ``reference_adapter``'s (lora_a,
        # lora_b, magnitude) instead of the trained weights. Plain attributes: in no state dict, not sharded.
        self.use_reference = False
        self.reference_adapter: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float,
                    lora_dtype: torch.dtype = torch.float32, use_rslora: bool = False, use_dora: bool = False
                    ) -> LoRALinear:
        """Wrap an existing layer, sharing (not copying) its weight and bias tensors."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, r, alpha, dropout, bias=linear.bias is not None,
                  device="meta", lora_dtype=lora_dtype, use_rslora=use_rslora, use_dora=use_dora)
        new.weight = linear.weight
        new.bias = linear.bias
        for name in ("lora_a", "lora_b", "lora_magnitude"):
            if getattr(new, name) is not None:
                setattr(new, name, nn.Parameter(torch.empty_like(getattr(new, name), device=w.device)))
        new.reset_lora_parameters()
        return new

    def reset_lora_parameters(self) -> None:
        # Section 4.1: A random (Kaiming-uniform, as nn.Linear), B = 0, so training starts exactly at the base model.
        init_lora_a(self.lora_a)
        nn.init.zeros_(self.lora_b)
        if self.lora_magnitude is not None and self.weight.device.type != "meta":  # DoRA: m = ||W||, as B A = 0
            with torch.no_grad():
                self.lora_magnitude.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        a, b, magnitude = self.lora_a, self.lora_b, self.lora_magnitude
        if self.use_reference:
            if self.reference_adapter is None:
                return out  # the reference is the base
            a, b, magnitude = self.reference_adapter
        # (B, T, in) -> (B, T, r) -> (B, T, out). Without autocast the branch runs in the LoRA dtype (fp32). The
        # reference is computed without dropout, as a frozen model in eval mode would be (and draws no random number).
        dropout_on = self.training and isinstance(self.lora_dropout, nn.Dropout) and not self.use_reference
        dropped = self.lora_dropout(x) if dropout_on else x
        lora = F.linear(F.linear(dropped.to(a.dtype), a), b) * self.scaling
        if magnitude is None:
            return out + lora.to(out.dtype)
        # DoRA, as PEFT computes it: W' x = (m / ||W + s B A||) (W x + s B A x), added to W x as a correction, with
        # the norm a constant. Under dropout, the correction's W x is of the dropped input too.
        scale = magnitude / self.weight_norm(a, b)
        base = F.linear(dropped, self.weight) if dropout_on else out if self.bias is None else out - self.bias
        return out + ((scale - 1) * base + scale * lora).to(out.dtype)

    def weight_norm(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        """DoRA's ||W + s B A|| per output row (``row_norms``) of this layer; ``a`` and ``b``: another adapter's (DPO's
        reference) instead of this layer's."""
        return row_norms(self.weight, self.lora_a if a is None else a, self.lora_b if b is None else b, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The LoRA update (alpha / r) B A, (out, in), in fp32 (for DoRA, the direction's update, before m)."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (computed in fp32, cast once). Calling it again does nothing."""
        if self.merged:
            return
        nf4 = isinstance(self.weight, NF4Weight)
        merged = merged_weight(self.weight.dequantize(torch.float32) if nf4 else self.weight.float(), self.lora_a,
                               self.lora_b, self.scaling, self.lora_magnitude)
        if nf4:  # QLoRA: the merged weight is a plain one, from the dequantized base
            self.weight = nn.Parameter(merged.to(self.weight.dtype), requires_grad=False)
        else:
            self.weight.copy_(merged)
        self.merged = True

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}{dora}, merged={self.merged}"


@torch.no_grad()
def row_norms(weight: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
              scaling: float = 1.0) -> torch.Tensor:
    """DoRA's ||W + s B A|| per row of ``weight`` (a layer's, or some of its rows with ``b``'s same rows: an FSDP2
    shard), (rows,), in fp32, a row chunk at a time: no full-precision copy of the whole weight (an NF4 base is
    dequantized in the chunks its matmul uses). Without ``a`` and ``b``: ||W||, DoRA's initial magnitude (the same
    bits as with B = 0). A constant for autograd."""
    if isinstance(weight, NF4Weight):
        chunks = weight.row_chunks(torch.float32, "scratch")
    else:
        step = max(1, CHUNK_VALUES // weight.shape[1])
        chunks = (weight[r : r + step] for r in range(0, weight.shape[0], step))
    norms, start = [], 0
    with torch.autocast(weight.device.type, enabled=False):  # in fp32 under mixed precision too
        for w in chunks:
            rows = w.shape[0]
            w = w.float() if a is None else torch.addmm(w.float(), b[start : start + rows].float(), a.float(),
                                                        alpha=scaling)
            norms.append(torch.linalg.vector_norm(w, dim=1))
            start += rows
    return torch.cat(norms)


def merged_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """The weight an adapter's layer computes with, in fp32, from its fp32 base ``w``: W + s B A, or for DoRA
    m * (W + s B A) / ||W + s B A|| per output row. ``LoRALinear.merge`` and the checkpoint merges both read it."""
    merged = torch.addmm(w.float(), b.float(), a.float(), alpha=scaling)
    if magnitude is not None:
        merged.mul_((magnitude.float() / torch.linalg.vector_norm(merged, dim=1))[:, None])
    return merged


def check_lora_settings(targets: Sequence[str] | None, r: int, dropout: float, key: str | None = None) -> None:
    """The one check of LoRA settings; ``key`` (e.g. "model.lora") names the config section in the messages."""
    names = (f"{key}.targets: unknown", f"{key}.r", f"{key}.dropout") if key else (
        "Unknown LoRA targets", "LoRA rank r", "LoRA dropout")
    if targets is not None:
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown or not targets:
            raise ValueError(f"{names[0]} {unknown}; use a non-empty subset of {list(LORA_TARGETS)}")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"{names[1]} must be a positive integer, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{names[2]} must be in [0, 1), got {dropout}")


def init_lora_a(t: torch.Tensor) -> torch.Tensor:
    """LoRA's A at init: Kaiming-uniform as nn.Linear's weight, drawn from the global RNG of t's device."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def apply_lora(model: nn.Module, settings: LoRASettings, lora_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every ``nn.Linear`` whose attribute name is in ``settings.targets`` by a ``LoRALinear`` sharing its
    weight (LoRA weights in ``lora_dtype``: the run plan's)."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in settings.targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear.from_linear(child, settings.r, settings.alpha, settings.dropout,
                                                             lora_dtype, settings.use_rslora, settings.use_dora))
                replaced += 1
    if replaced == 0:
        raise ValueError(f"apply_lora: no nn.Linear named {list(settings.targets)} found in {type(model).__name__}")
    return model


def lora_layers(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


@contextmanager
def reference_model(model: nn.Module) -> Iterator[None]:
    """Within: every LoRA layer computes as the model training started from (DPO's reference), the base alone or
    the reference adapter ``set_reference_adapter`` gave, in place: no second copy of the weights exists."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.use_reference = True
    try:
        yield
    finally:
        for layer in layers:
            layer.use_reference = False


def set_reference_adapter(model: nn.Module, tensors: dict[str, torch.Tensor] | None) -> None:
    """The adapter ``reference_model`` computes with, by the model's own parameter names (lora_a, lora_b and, for
    DoRA, lora_magnitude); None: the base alone."""
    for name, layer in lora_layers(model):
        layer.reference_adapter = None if tensors is None else (
            tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"], tensors.get(f"{name}.lora_magnitude"))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Merge every LoRA layer. With ``unload``, replace each by a plain ``nn.Linear`` holding the merged weight."""
    for name, layer in list(lora_layers(model)):
        layer.merge()
        if unload:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight, plain.bias = layer.weight, layer.bias
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain)
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; works on the meta device."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """The seed experiment's line (PEFT's print_trainable_parameters format)."""
    trainable, total = count_params(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.2f}"
