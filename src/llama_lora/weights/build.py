"""A ready model from a checkpoint (or a seeded random init), stored as the run plan says: built on the meta device,
each tensor placed with no second copy, NF4 blocks quantized as they are read; and, under FSDP2, each rank's shards
filled from its own rows of the checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ..config import LlamaConfig
from ..layout import is_block_linear
from ..lora import init_lora_a, row_norms
from ..model import Llama, init_base_tensor
from ..plan import RunPlan
from ..quant import BLOCK, NF4Weight, empty, quantize
from .source import check_state_dict, open_checkpoint
from .tensors import LazyStateDict


def build_model(
    config: LlamaConfig | None = None,
    checkpoint: str | Path | None = None,
    plan: RunPlan | torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    gradient_checkpointing: bool = False,
    checkpoint_layers: int | None = None,
) -> Llama:
    """A ready Llama: random (seeded) when ``checkpoint`` is None, else filled from the checkpoint with no copy.

    Each tensor is stored as ``plan`` says (a dtype: every tensor in it, ``RunPlan.uniform``). Under an NF4 plan the
    blocks' linear weights are quantized as they are read, and their pages of the memory-mapped checkpoint are
    dropped, so the half-precision model never exists in memory; so are the pages of any tensor cast to another
    dtype (an fp32 or f16 base in a bf16 plan), so that the file and the model are not both resident. With both
    ``config`` and ``checkpoint`` given, the checkpoint must match the config's shapes.
    """
    plan = plan if isinstance(plan, RunPlan) else RunPlan.uniform(plan, device)
    sd = sources = None
    if checkpoint is not None:
        sd, sources, config = open_checkpoint(checkpoint, config)
    if config is None:
        raise ValueError("build_model needs a config (preset) or a checkpoint")
    with torch.device("meta"):
        model = Llama(config, gradient_checkpointing=gradient_checkpointing, checkpoint_layers=checkpoint_layers,
                      plan=plan)
    tied = config.tie_embeddings
    quantized = plan.quantization == "nf4"
    tensors = {}
    if sd is None:  # random init, tensor by tensor in the order init_weights draws them
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        for name, p in model.named_parameters():
            t = torch.empty(p.shape, dtype=plan.dtype_of(name, tied), device=device)
            init_base_tensor(name, t, generator=generator)
            tensors[name] = quantize(t, dtype=plan.linear_dtype) if quantized and is_block_linear(name) else t
    else:
        check_state_dict(model, sd, sources, what=f"a {config.n_layers}-layer, dim-{config.dim} LLaMA")
        for k in sd:  # one tensor at a time: an mmapped tensor already in its dtype on CPU is placed as is
            if quantized and is_block_linear(k):
                tensors[k] = quantize(sd[k].to(device), dtype=plan.linear_dtype)
                sd.release(k)
            else:
                stored = sd[k]
                tensors[k] = stored.to(device=device, dtype=plan.dtype_of(k, tied))
                if tensors[k].data_ptr() != stored.data_ptr():  # a copy (cast or moved): the file's pages can go
                    sd.release(k)
    model.load_state_dict(tensors, assign=True, strict=sd is not None)
    model.tie_weights()  # assign=True placed the shared tensor as two parameters
    return model


def meta_model(config: LlamaConfig, plan: RunPlan, gradient_checkpointing: bool = False,
               checkpoint_layers: int | None = None) -> Llama:
    """The model on the meta device, each base tensor as ``plan`` stores it (an NF4 plan's block linears as NF4
    weights), for ``fully_shard`` to split before ``fill_shards`` fills each rank's rows. An NF4 weight is split by
    rows in whole blocks: its rows must hold whole blocks."""
    with torch.device("meta"):
        model = Llama(config, gradient_checkpointing, checkpoint_layers, plan)
    quantized = plan.quantization == "nf4"
    for name, p in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        nf4 = quantized and is_block_linear(name)  # frozen: an NF4 weight has no gradient
        if nf4:
            if p.shape[-1] % BLOCK:
                raise ValueError(f"FSDP2 with model.base_dtype nf4 splits each NF4 weight by rows in whole blocks of "
                                 f"{BLOCK} values, and {name}'s rows are {p.shape[-1]} wide; use ddp, where each "
                                 "rank quantizes its own whole copy")
            t = empty(p.shape, plan.linear_dtype, device="meta")
        else:
            t = torch.empty(p.shape, dtype=plan.dtype_of(name, config.tie_embeddings), device="meta")
        setattr(module, attr, torch.nn.Parameter(t, requires_grad=not nf4))  # the module freezes the base for LoRA
    model.tie_weights()
    return model


@torch.no_grad()
def fill_shards(model: torch.nn.Module, sd: LazyStateDict | None, seed: int | None = None) -> None:
    """Fill the local shards of a model that ``fully_shard`` split on dim 0 after it was built on the meta device
    (and ``to_empty``-ed): each rank reads only its own rows of the memory-mapped checkpoint, or, without one, draws
    the single-process random init (every full tensor in turn, same generator) and keeps its rows. LoRA weights are
    drawn as LoRALinear draws them. Device memory per rank is about 1/W of the base; no rank holds a whole tensor
    read from the checkpoint. An NF4 weight's rows are quantized by the rank that holds them, to the bits one process
    gives them (``quantize`` reduces the two statistics of the whole weight over the ranks)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if sd is None and seed is not None else None
    base = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    lora = [(n, p) for n, m in model.named_modules() if hasattr(m, "lora_a") for n, p in
            ((f"{n}.lora_a", m.lora_a), (f"{n}.lora_b", m.lora_b))]  # in the order LoRALinear draws them
    for name, p in base + lora:
        local, start = local_rows(p)
        stop = start + local.shape[0]
        nf4 = isinstance(local, NF4Weight)
        if name.endswith("lora_b"):
            local.zero_()
        elif sd is not None and "lora_" not in name:
            rows = sd.rows(name, start, stop)
            if nf4:
                blocks_per_row = p.shape[-1] // BLOCK
                group = p.device_mesh.get_group() if isinstance(p, DTensor) else None
                local.copy_(quantize(rows.to(device), local.dtype, first_block=start * blocks_per_row,
                                     total_blocks=p.shape[0] * blocks_per_row, group=group))
            else:
                local.copy_(rows)
            sd.release(name)  # the mapped pages this rank read: else each rank's RSS grows by its share of the file
        else:
            full = torch.empty(p.shape, dtype=p.dtype, device=device)
            init_lora_a(full) if name.endswith("lora_a") else init_base_tensor(name, full, generator=generator)
            local.copy_(quantize(full).rows(start, stop) if nf4 else full[start:stop])
    for _, m in model.named_modules():  # DoRA: each rank's magnitudes are the norms of its own rows of W (B = 0)
        if getattr(m, "lora_magnitude", None) is not None:
            local_rows(m.lora_magnitude)[0].copy_(row_norms(local_rows(m.weight)[0]))


@torch.no_grad()
def load_rows(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (an adapter's, by the model's parameter names) into the model: into each rank's own rows of
    a parameter that ``fully_shard`` split on dim 0, whole into a plain one."""
    own = dict(model.named_parameters())
    for name, t in tensors.items():
        local, start = local_rows(own[name])
        local.copy_(t[start : start + local.shape[0]])


def local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's rows of a parameter and the first one's index: the local shard of a DTensor that ``fully_shard``
    split on dim 0 over a 1-D mesh (torch.chunk's split), or a plain tensor whole (from row 0)."""
    if not isinstance(p, DTensor):
        return p, 0
    (placement,) = p.placements
    assert placement.is_shard(0), f"expected a dim-0 shard, got {placement}"
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    # the local tensor itself, not to_local()'s alias: filling an NF4 shard also sets where its blocks start
    return p._local_tensor, min(rank * -(-p.shape[0] // world), p.shape[0])


def gather_rows(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor, on every rank, of rows each rank computed for its own shard of ``like`` (a parameter split on
    dim 0 by ``fully_shard``, or a plain one: ``local`` is then the whole already)."""
    if not isinstance(like, DTensor):
        return local
    shape = (like.shape[0], *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=shape,
                              stride=stride).full_tensor()
