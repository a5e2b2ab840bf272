"""Memory: the analytic model of a training step (the ablation tables, the OOM advice, the 13B/70B and QLoRA
figures), and the measured peak of this process (RSS, resettable on Linux so that a step's own peak can be read)."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import LlamaConfig
from .layout import BY_TARGET
from .plan import RunPlan
from .quant import BLOCK, CHUNK_VALUES, KEEP_DTYPES, SCALE_GROUP

GIB = 2**30
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def peak_rss_bytes() -> int:
    """The resident-set high-water mark since the process started or since ``reset_peak_rss``."""
    try:
        line = next(line for line in _STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):  # not Linux: getrusage's maximum (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``); False elsewhere."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


# ----- the analytic model: where a training step's memory goes -----

def _bytes(dtype: torch.dtype) -> int:
    return dtype.itemsize
NF4_BITS = 4 + 8 / BLOCK + 32 / (BLOCK * SCALE_GROUP)  # codes, int8 block scales, an fp32 factor per group


def lora_param_count(config: LlamaConfig, targets: Sequence[str], r: int, dora: bool = False) -> int:
    """A and B of every targeted layer: r x (in + out) each, in every block (or once, for the output layer); with
    DoRA, one magnitude per output row too."""
    per = {t: r * sum(BY_TARGET[t].shape(config)) + dora * BY_TARGET[t].shape(config)[0] for t in targets}
    return sum(n * (config.n_layers if BY_TARGET[t].in_block else 1) for t, n in per.items())


def matmul_params(config: LlamaConfig) -> int:
    """Parameters of the transformer blocks' linear layers and the output layer (not embeddings, not norms). A tied
    output layer (Llama 3.2 1B/3B) is the embedding, stored once and multiplied all the same."""
    embedding = 0 if config.tie_embeddings else config.vocab_size * config.dim
    return config.n_params - embedding - config.dim * (2 * config.n_layers + 1)


def activation_bytes_per_token_per_layer(config: LlamaConfig, act_bytes: int, lora_targets: Sequence[str],
                                         autocast: bool, dora: bool = False) -> int:
    """Bytes autograd keeps per token and block in this implementation (no checkpointing).

    RMSNorm keeps its input in fp32 (x2 norms); the block keeps the normalised inputs, q, k, v, the attention
    output and its reshaped copy, and four SwiGLU tensors of the hidden width. Under autocast, each LoRA branch also
    keeps an fp32 and a half copy of its input. RoPE keeps nothing (its backward is the inverse rotation). DoRA's
    correction keeps the base output and the LoRA output of each target for the magnitudes' gradient (fp32 under
    autocast: the magnitude's dtype).
    """
    d, q, kv, hidden = config.dim, config.q_dim, config.n_kv_heads * config.head_dim, config.hidden_dim
    norms = 2 * 4 * d + 4 * (q + kv) * config.qk_norm  # Qwen3's per-head q/k norms keep their inputs in fp32 too
    attention = act_bytes * (d + q + 2 * kv + q + q)  # normed input, q, k and v, SDPA output, wo input
    ffn = act_bytes * (d + 4 * hidden)  # normed input, w1 out, w3 out, silu out, w2 input
    widths = {t: BY_TARGET[t].shape(config)[1] for t in lora_targets if BY_TARGET[t].in_block}  # each input's width
    lora = sum((4 + 2) * w for w in widths.values()) if autocast else 0
    outs = [BY_TARGET[t].shape(config)[0] for t in lora_targets if BY_TARGET[t].in_block]
    magnitude = 2 * 4 * sum(outs) if dora else 0
    return norms + attention + ffn + lora + magnitude


def memory_breakdown(config: LlamaConfig, *, plan: RunPlan, lora_targets: Sequence[str] | None, lora_r: int,
                     micro_batch: int, seq_len: int, gradient_checkpointing: bool, loss_chunk: int = 1024,
                     dora: bool = False, pairs: bool = False) -> dict[str, int]:
    """Analytic peak memory of one training step, in bytes, by component, for full-length sequences, with each tensor
    stored as the run ``plan`` says.

    ``lora_targets`` None means full fine-tuning (all weights trained, fp32). The plan's autocast is mixed precision:
    half precision activations, and a half copy of every fp32 matmul weight that autocast casts and caches. An NF4
    plan: the blocks' linear weights at 4.127 bits, the embedding, norms and output in the plan's dtypes, and one chunk
    of a weight dequantized at a time (``dequantized``). ``dora``: DoRA's magnitudes, what its correction keeps, and the
    fp32 row chunk its weight norm is taken over (also counted under ``dequantized``: a transient weight copy).
    ``pairs``: a preference step (DPO, IPO, SimPO) on ``micro_batch`` pairs: the policy's forward and backward over
    2 x ``micro_batch`` sequences, an SFT step on the same tokens. The reference pass runs before it, without
    autograd, and is gone by the policy's peak; the per-position log-probabilities are 4 bytes a token.
    """
    n = config.n_params
    dora = dora and lora_targets is not None
    n_lora = lora_param_count(config, lora_targets, lora_r, dora) if lora_targets is not None else 0
    trainable = n_lora if lora_targets is not None else n
    dequantized = 0
    autocast, compute = plan.autocast, _bytes(plan.compute_dtype)
    if plan.quantization == "nf4":
        blocks = matmul_params(config) - config.vocab_size * config.dim  # the quantized linear weights
        embedding = config.vocab_size * config.dim
        params = (int(blocks * NF4_BITS / 8) + embedding * _bytes(plan.embedding_dtype)
                  + (n - blocks - embedding) * _bytes(plan.norm_dtype) + n_lora * 4)
        # one row chunk of a weight at a time (quant.CHUNK_VALUES values) and, on a GPU, the fp32 products the torch
        # ops make of it (a CPU's kernel writes the chunk alone); under checkpointing, one block's weights, dequantized
        # by its recomputation and kept for its backward (quant.keep_dequantized, the dtypes of quant.KEEP_DTYPES)
        dequantized = min(CHUNK_VALUES, config.hidden_dim * config.dim) * (compute + 4)
        if gradient_checkpointing and plan.compute_dtype in KEEP_DTYPES:
            dequantized += blocks // config.n_layers * compute
        base_bytes = compute
    else:
        base_bytes = _bytes(plan.linear_dtype)
        params = n * base_bytes + n_lora * 4
    if dora:  # the norm's row chunk: the weight's rows in fp32 plus W + s B A, beside a dequantized chunk if any
        widest = max(BY_TARGET[t].shape(config)[0] * BY_TARGET[t].shape(config)[1] for t in lora_targets)
        dequantized += 2 * 4 * min(CHUNK_VALUES, widest)
    grads = trainable * 4  # trainable weights are fp32
    optimizer = trainable * 8  # AdamW: exp_avg and exp_avg_sq, fp32
    # Autocast casts each fp32 weight it multiplies to half precision and caches the copy for the whole forward
    # (and backward): the seed experiment's "MP raises memory". A half-precision base has nothing to cast.
    autocast_cache = matmul_params(config) * 2 if autocast and base_bytes == 4 else 0
    act_bytes = 2 if autocast else compute
    tokens = micro_batch * seq_len * (2 if pairs else 1)
    per_layer = activation_bytes_per_token_per_layer(config, act_bytes, lora_targets or (), autocast, dora)
    if gradient_checkpointing:  # each block's input is kept, plus one block's activations while it is recomputed
        activations = tokens * (config.n_layers * act_bytes * config.dim + per_layer)
    else:
        activations = tokens * config.n_layers * per_layer
    # Fused loss: one chunk of fp32 logits and their gradient, plus grad of the hidden states.
    loss = min(tokens, loss_chunk) * config.vocab_size * 8 + tokens * config.dim * act_bytes + pairs * tokens * 4
    total = params + grads + optimizer + autocast_cache + dequantized + activations + loss
    return {"params": params, "grads": grads, "optimizer": optimizer, "autocast_cache": autocast_cache,
            "dequantized": dequantized, "activations": activations, "loss": loss, "total": total}


def sharded_breakdown(config: LlamaConfig, world: int, **settings) -> dict[str, int]:
    """``memory_breakdown`` per rank under FSDP2 over ``world`` ranks: parameters, gradients and optimizer state are
    split W ways. Each rank also holds what is all-gathered (``gathered``): the root's parameters (the embedding and
    the final norm) for the whole step (FSDP2 does not reshard its root after the forward, as the backward would
    gather it at once), and at most two more groups at a time: two blocks (the one computing and the one prefetched),
    or the output layer while the loss computes. An NF4 base is gathered as it is stored, 4-bit codes and int8
    scales (quant.NF4Weight's FSDP2 extension), so two gathered blocks of 70B weigh 0.4 GiB, not 3.2. Activations
    and the loss are each rank's own micro-batch."""
    b = memory_breakdown(config, **settings)
    plan = settings["plan"]
    gathered = 0
    if world > 1:
        linears = (matmul_params(config) - config.vocab_size * config.dim) // config.n_layers
        block = (int(linears * NF4_BITS / 8) if plan.quantization else linears * _bytes(plan.linear_dtype)) + (
            2 * config.dim * _bytes(plan.norm_dtype))
        table = config.vocab_size * config.dim
        root = table * _bytes(plan.dtype_of("tok_embeddings.weight", config.tie_embeddings))
        output = 0 if config.tie_embeddings else table * _bytes(plan.norm_dtype)
        gathered = root + max(2 * block, output)
    shared = {k: b[k] // world for k in ("params", "grads", "optimizer")}
    out = {**b, **shared, "gathered": gathered}
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out
