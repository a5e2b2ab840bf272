"""The training loss: next-token cross-entropy over target positions only, the output layer fused into it.

Prompt and padding positions (label -100) never reach the vocabulary-wide matmul, and the fp32 logits of a whole
batch never exist: the output layer and the cross-entropy run chunk by chunk, with their gradients in the same pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .model import Llama

IGNORE_INDEX = -100  # labels that the loss skips: the prompt, padding, the first position


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, t_i), or with ``per_position`` the (N,) CE_i, computed chunk by chunk with its gradients in
    the same pass (per position only for a frozen W: its gradient would need each position's weight up front).

    Each chunk's logits (chunk, vocab) live in fp32 only while that chunk is processed; what is kept for backward
    is grad_h (N, dim) and, when W is trained, grad_W. No recomputation, and the full fp32 logits never exist.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                compute_dtype: torch.dtype, need_grad: bool, per_position: bool = False) -> torch.Tensor:
        w = weight.to(compute_dtype)
        # Under no_grad (validation) only the loss is computed: no grad_h, no grad_W.
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad and weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device) if per_position else None
        assert not (per_position and grad_w is not None), "per-position losses need a frozen output layer"
        for i in range(0, h.shape[0], chunk_size):
            h_c, t_c = h[i : i + chunk_size].to(compute_dtype), targets[i : i + chunk_size]
            logits = (h_c @ w.T).float()  # (chunk, vocab)
            # loss = logsumexp - target logit; d(loss)/d(logits) = softmax - one_hot. One exp pass, all in place
            # over this chunk's buffer (no temporaries of the chunk's size).
            row_max = logits.amax(dim=-1, keepdim=True)
            target_logit = logits.gather(1, t_c[:, None])
            exp_sum = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
            if losses is not None:
                losses[i : i + chunk_size] = (row_max + exp_sum.log() - target_logit)[:, 0]
            else:
                total += (row_max + exp_sum.log() - target_logit).sum()
            if grad_h is None:
                continue
            dlogits = logits.div_(exp_sum)
            dlogits[torch.arange(t_c.shape[0], device=t_c.device), t_c] -= 1
            dlogits = dlogits.to(compute_dtype)
            grad_h[i : i + chunk_size] = (dlogits @ w).to(h.dtype)
            if grad_w is not None:
                grad_w += (dlogits.T @ h_c).float()
        if grad_h is not None:
            ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.weight_dtype, ctx.has_grad_w = weight.dtype, grad_w is not None
        return losses if losses is not None else total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        grad_weight = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.has_grad_w else None
        scale = grad_out[:, None] if grad_out.dim() else grad_out  # per position: each row by its own
        return grad_h * scale.to(grad_h.dtype), grad_weight, None, None, None, None, None


def default_loss_chunk(device: torch.device) -> int:
    """Target positions per output-layer chunk: 128 on CPU, where a (128, 32000) fp32 chunk stays in cache and is
    reused by the allocator (larger ones are fresh page-faulted memory each time: 1024 made the CPU step 20% slower),
    1024 on GPU, where larger matmuls pay."""
    return 128 if device.type == "cpu" else 1024


def token_loss_sum(model: Llama, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None,
                   segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over target positions, and their count.

    The output layer runs only where labels are not -100 (prompt and padding cost nothing there), in chunks, so the
    fp32 logits of all positions never exist at once.
    """
    total, keep = _target_losses(model, input_ids, labels, chunk_size, segment_ids, per_position=False)
    return total, keep.sum()


def sequence_logps(model: Llama, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the log-probability of its target tokens, summed (B,), and their count (B,). What preference
    objectives compare: a completion's log-probability given its prompt, the prompt and padding masked (-100)."""
    losses, keep = _target_losses(model, input_ids, labels, chunk_size, None, per_position=True)
    rows = keep.nonzero()[:, 0]  # the row of each kept position, in the order the losses come
    logps = torch.zeros(input_ids.shape[0], dtype=losses.dtype, device=losses.device).index_add(0, rows, -losses)
    return logps, keep.sum(dim=1)


def _target_losses(model: Llama, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int | None,
                   segment_ids: torch.Tensor | None, per_position: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of the target positions, summed or (N,) per position in row-major order, and the (B, T-1)
    mask of the positions kept."""
    chunk_size = chunk_size or default_loss_chunk(input_ids.device)
    h = model(input_ids, return_hidden=True, segment_ids=segment_ids)  # (B, T, dim); forward runs FSDP2's hooks
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h, targets = h[:, :-1][keep], targets[keep]  # (N, dim), (N,)
    output = model.output
    sharded = isinstance(output, FSDPModule)
    cls = type(output).__bases__[-1] if sharded else type(output)  # fully_shard's class is (FSDPModule, Linear)
    # A trained FSDP2-sharded output layer's gradient must go through FSDP2's reduce-scatter hooks: the module path,
    # as for a trained output layer whose loss is wanted per position.
    if (cls is not torch.nn.Linear or output.bias is not None or (sharded and output.weight.requires_grad)
            or (per_position and output.weight.requires_grad)):
        return _module_losses(output, h, targets, chunk_size, per_position), keep
    # A frozen FSDP2-sharded output layer is gathered for the forward only (its backward needs no weight): the same
    # fused loss, with the same rounding, as one process or DDP computes.
    if sharded:
        output.unshard()
    try:
        dtype = model.plan.compute_dtype
        need_grad = torch.is_grad_enabled() and (h.requires_grad or output.weight.requires_grad)
        return _FusedLinearCrossEntropy.apply(h, output.weight, targets, chunk_size, dtype, need_grad,
                                              per_position), keep
    finally:
        if sharded:
            output.reshard()


def _module_losses(output: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                   per_position: bool) -> torch.Tensor:
    """A LoRA (or trained) output layer: call the module per chunk, recomputed in backward."""
    def chunk_loss(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output(h_chunk).float(), t_chunk, reduction="none" if per_position else "sum")

    parts = []
    for i in range(0, h.shape[0], chunk_size):
        h_c, t_c = h[i : i + chunk_size], targets[i : i + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(activation_checkpoint(chunk_loss, h_c, t_c, use_reentrant=False))
        else:
            parts.append(chunk_loss(h_c, t_c))
    if per_position:
        return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    total = h.new_zeros((), dtype=torch.float32)
    for part in parts:
        total = total + part
    return total
