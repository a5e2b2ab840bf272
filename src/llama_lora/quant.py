"""4-bit NormalFloat (NF4) frozen base weights: QLoRA (Dettmers et al. 2023, arXiv:2305.14314).

A weight is split into blocks of 64 values; each block keeps one absmax scale and each value the nearest of 16
NormalFloat levels (Section 3, "4-bit NormalFloat"), packed two to a byte. The block scales are quantized again
("Double Quantization"): centred on their mean, to int8 in groups of 256 with one fp32 factor per group. That is
4 + 8/64 + 32/(64*256) = 4.127 bits per weight.

``NF4Weight`` is such a weight as a tensor: it reports the shape and dtype of the original, and ``F.linear`` on it
dequantizes into the dtype the input computes in (bf16 or fp16 under autocast or on a half-precision model, fp32 on an
AVX2-only CPU), only for that matmul, in forward and again in backward: nothing but the 4-bit weight is kept between
them. So an ``nn.Linear`` or a ``LoRALinear`` holds one as its ``weight`` unchanged; the quantized base is a property
of the weight. Under gradient checkpointing the recomputed forward keeps its dequantized chunks for the backward that
follows at once (``keep_dequantized``): two dequantizations a step instead of three, for one block's weights held.

Hand-written rather than torchao's ``NF4Tensor``: on 2 CPU cores, quantizing a 4096 x 4096 bf16 matrix took 2.1 s
with torchao 0.11 and 0.33 s here, with the same round-trip error; and no optional dependency is needed. On a CPU,
dequantization is a small C kernel (``nf4_kernel.c``, built once by the system's C compiler, as torch.compile would
need one too) that writes into buffers reused from weight to weight, so no page is freed and faulted in again.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cache import default_cache_dir

log = logging.getLogger(__name__)

BLOCK, SCALE_GROUP = 64, 256
# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (the QLoRA paper, Appendix E).
LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)
_MIDPOINTS = (LEVELS[1:] + LEVELS[:-1]) / 2
# Nearest level by a 4096-bin grid over [-1, 1]: each bin's code at its left edge, plus one comparison with the one
# midpoint a bin can hold (equal to torch.bucketize against the midpoints, with a third of the memory traffic).
_BINS = 4096
_BIN_CODE = torch.bucketize(-1 + torch.arange(_BINS, dtype=torch.float32) * (2 / _BINS), _MIDPOINTS).to(torch.uint8)
_BIN_MIDPOINT = torch.full((_BINS,), float("inf"), dtype=torch.float32).index_put_(
    (((_MIDPOINTS + 1) * (_BINS / 2)).long(),), _MIDPOINTS)
# Eager dequantization reads a byte (two codes) at once: its two fp32 levels as one 64-bit word.
_PAIRS = torch.stack([LEVELS.repeat_interleave(16), LEVELS.repeat(16)], dim=1)  # byte b -> (LEVELS[b>>4], [b&15])
_WORDS = _PAIRS.contiguous().view(torch.int64).flatten()  # fp32 pairs as 64-bit words


def _codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest-level codes (uint8) of x in [-1, 1] (index_select: 1.5x faster than indexing with [])."""
    b = (x + 1).mul_(_BINS / 2).to(torch.int32).clamp_(0, _BINS - 1).flatten()
    above = x.flatten() > _BIN_MIDPOINT.to(x.device).index_select(0, b)
    return (_BIN_CODE.to(x.device).index_select(0, b) + above.to(torch.uint8)).view(x.shape)


@torch.no_grad()
def quantize(w: torch.Tensor, dtype: torch.dtype | None = None, chunk_blocks: int = 4096, *, first_block: int = 0,
             total_blocks: int | None = None, group: Any = None) -> NF4Weight:
    """w (any float dtype) as an NF4Weight of the same shape, labelled ``dtype`` (default: w's), the dtype it
    dequantizes to by default. Deterministic: the same weight gives the same bits, so a resumed run quantizes its base
    again to exactly what it trained on.

    Under FSDP2 a rank quantizes only its own rows: ``w`` is then blocks ``first_block`` on of a weight of
    ``total_blocks``, and the double quantization's two statistics over the whole weight (the mean of the block
    scales, each group's largest deviation from it) are reduced over the ranks' process ``group``: each rank's blocks
    get the bits one process gives them (the mean is a float64 sum either way: the ranks' summation order stays far
    below the fp32 mean's last bit)."""
    if w.numel() % BLOCK:
        raise ValueError(f"NF4 needs a multiple of {BLOCK} values per weight, got shape {tuple(w.shape)}")
    blocks = w.detach().reshape(-1, BLOCK)
    n = blocks.shape[0]
    total = n if total_blocks is None else total_blocks
    packed = torch.empty(n, BLOCK // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n, dtype=torch.float32, device=w.device)
    for i in range(0, n, chunk_blocks):  # chunks that stay in cache: several passes over each
        x = blocks[i : i + chunk_blocks].to(torch.float32, copy=True)  # normalised in place below: never w itself
        a = x.abs().amax(dim=1)
        absmax[i : i + chunk_blocks] = a
        codes = _codes(x.div_(a.clamp(min=torch.finfo(torch.float32).tiny)[:, None]))
        packed[i : i + chunk_blocks] = codes[:, 0::2] << 4 | codes[:, 1::2]
    # Double quantization of the block scales: centred on their mean, int8 in groups of SCALE_GROUP blocks.
    total_sum = absmax.double().sum()
    if group is not None:
        torch.distributed.all_reduce(total_sum, group=group)
    mean = (total_sum / total).float()
    centred = absmax - mean
    # the groups this rank's blocks fall in (a group at a shard's edge is shared: its maximum is reduced)
    g0, offset = divmod(first_block, SCALE_GROUP)
    local = F.pad(centred, (offset, -(-(offset + n) // SCALE_GROUP) * SCALE_GROUP - offset - n))
    largest = torch.zeros(-(-total // SCALE_GROUP), dtype=torch.float32, device=w.device)
    largest[g0 : g0 + local.numel() // SCALE_GROUP] = local.view(-1, SCALE_GROUP).abs().amax(dim=1)
    if group is not None:
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX, group=group)
    factor = largest / 127
    step = _group_factors(factor, first_block, n).clamp(min=torch.finfo(torch.float32).tiny)
    scales = torch.round(centred / step).to(torch.int8)
    return NF4Weight(packed.flatten(), scales, factor, mean.reshape(1), w.shape, dtype or w.dtype, first_block)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> NF4Weight:
    """An NF4 weight of ``shape`` whose data are not set (on the meta device: a model to shard, then fill)."""
    numel = torch.Size(shape).numel()
    if numel % BLOCK:
        raise ValueError(f"NF4 needs a multiple of {BLOCK} values per weight, got shape {tuple(shape)}")
    blocks = numel // BLOCK
    return NF4Weight(torch.empty(blocks * BLOCK // 2, dtype=torch.uint8, device=device),
                     torch.empty(blocks, dtype=torch.int8, device=device),
                     torch.empty(-(-blocks // SCALE_GROUP), dtype=torch.float32, device=device),
                     torch.empty(1, dtype=torch.float32, device=device), torch.Size(shape), dtype)


def _group_factors(factor: torch.Tensor, first_block: int, n_blocks: int) -> torch.Tensor:
    """Each of blocks first_block .. first_block + n_blocks its group's factor (n_blocks,)."""
    g0, offset = divmod(first_block, SCALE_GROUP)
    g1 = -(-(first_block + n_blocks) // SCALE_GROUP)
    return factor[g0:g1].repeat_interleave(SCALE_GROUP)[offset : offset + n_blocks]


def _block_scales(scales: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor, first_block: int,
                  n_blocks: int) -> torch.Tensor:
    """The fp32 scales of blocks first_block .. first_block + n_blocks of a weight, ``scales`` holding theirs."""
    return scales[:n_blocks].float() * _group_factors(factor, first_block, n_blocks) + mean


def _dequantize_eager(packed: torch.Tensor, block_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    words = _WORDS.to(packed.device)
    values = words.index_select(0, packed.to(torch.int32)).view(torch.float32).view(-1, BLOCK)
    values = values.mul_(block_scale[:, None])
    return values if dtype == torch.float32 else values.to(dtype)


# The C kernel (nf4_kernel.c), built for the instruction set torch itself dispatches to on this CPU: an AVX2-only
# CPU (or torch told so by ATEN_CPU_CAPABILITY=avx2) gets the AVX2 build, whatever the compiler could target.
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
              "AVX2": ["-mavx2", "-mfma", "-mf16c"]}
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_kernel: dict[str, Any] = {}  # "call": the loaded function, or None where it could not be built


def _build_kernel(capability: str | None = None) -> Any:
    """The kernel's function for ``capability`` (default: torch's own on this CPU, ``_ISA_FLAGS``), compiled once
    into the cache folder (keyed by source, compiler and flags), or None with one warning where no C compiler works:
    dequantization then runs as torch ops, about 10x slower."""
    source = Path(__file__).with_name("nf4_kernel.c")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    isa = _ISA_FLAGS.get(capability or torch.backends.cpu.get_cpu_capability(), [])
    reason = "no C compiler found (set CC)"
    for openmp in (["-fopenmp"], []):  # without OpenMP (Apple's clang): one thread, still several times faster
        if compiler is None:
            break
        command = [compiler, "-O3", "-shared", "-fPIC", *isa, *openmp]
        key = hashlib.sha256(source.read_bytes() + " ".join(command).encode()).hexdigest()[:16]
        library = default_cache_dir() / f"nf4-kernel-{key}.so"
        try:
            if not library.exists():
                library.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # concurrent builds: each its own file
                    built = Path(tmp) / library.name
                    subprocess.run([*command, str(source), "-o", str(built)], check=True, capture_output=True,
                                   text=True, timeout=120)
                    os.replace(built, library)
            call = ctypes.CDLL(str(library)).nf4_dequantize
        except (OSError, subprocess.SubprocessError) as e:
            stderr = getattr(e, "stderr", None) or str(e)
            reason = f"{Path(compiler).name} failed: {stderr.strip().splitlines()[-1][:200] if stderr.strip() else e}"
            continue
        call.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        call.restype = ctypes.c_int
        return call
    log.warning("NF4: the dequantization kernel could not be built (%s); dequantizing with "
                                        "torch ops, about 10x slower", reason)
    return None


def _dequantize(packed: torch.Tensor, block_scale: torch.Tensor, dtype: torch.dtype,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Values of ``packed`` codes (flat, whole blocks) in ``dtype``, shape (n_blocks, BLOCK), written into ``out``
    (contiguous, as many values) when given: each level times its block's scale in fp32, rounded once (so a bf16
    weight is exactly the fp32 one, rounded).

    On a CPU, the C kernel: 7-15 G values/s on 2 cores (native bf16 kind; about a plain copy's rate), against 2.3 for
    torch.compile of the same loop (which looked the levels up one value at a time) and 0.2-0.4 for torch ops."""
    n_blocks = packed.numel() * 2 // BLOCK
    if packed.device.type == "cpu" and dtype in _KINDS:
        if "call" not in _kernel:
            _kernel["call"] = _build_kernel()
        call = _kernel["call"]
        if call is not None:
            into = torch.empty(n_blocks, BLOCK, dtype=dtype) if out is None else out
            packed, block_scale = packed.contiguous(), block_scale.float().contiguous()  # held for the call
            if into.is_contiguous() and not call(packed.data_ptr(), block_scale.data_ptr(), LEVELS.data_ptr(),
                                                 into.data_ptr(), n_blocks, _KINDS[dtype], torch.get_num_threads()):
                return into.view(n_blocks, BLOCK)
    values = _dequantize_eager(packed, block_scale, dtype)
    return values if out is None else out.view(n_blocks, BLOCK).copy_(values)

# Dequantize at most this many values at once (8 MB in bf16), into one buffer reused by every weight (``_scratch``):
# 4M was the fastest chunk measured; smaller ones stay in cache but make the matmuls that read them narrow
# (docs/performance.md, the chunk sizes).
CHUNK_VALUES = 1 << 22
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(device: torch.device, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) buffer in ``dtype``, the same memory each time: a chunk is used before the next is made."""
    flat = _SCRATCH.get((device, dtype))
    if flat is None or flat.numel() < rows * cols:
        flat = _SCRATCH[(device, dtype)] = torch.empty(rows * cols, dtype=dtype, device=device)
    return flat[: rows * cols].view(rows, cols)


_KEEP = {"recomputing": False}
# Kept only in half precision: in fp32 (an AVX2-only CPU) the block kept doubles in size and the matmuls dominate the
# step, so keeping saved little for much memory (docs/performance.md, issue 25).
KEEP_DTYPES = (torch.bfloat16, torch.float16)


try:  # glibc: hand freed heap pages back to the OS
    _malloc_trim = ctypes.CDLL(None).malloc_trim
    _mallopt = ctypes.CDLL(None).mallopt
except (OSError, AttributeError):  # pragma: no cover - another C library
    _malloc_trim = _mallopt = None


def map_large_buffers() -> None:
    """Under FSDP2 on a CPU: every buffer of 1 MiB or more is mapped on its own and unmapped when freed. FSDP2 frees
    each block's gathered weights after its forward and gathers them again for its backward; under glibc's dynamic
    mmap threshold (raised to 32 MiB by the first such buffer freed) they came from the heap, which fragmented and grew
    by about a gathered shard per block: 7B QLoRA on 2 ranks peaked at 4.95 GiB per rank for a 1 x 128 step, 3.33 GiB
    with this, at 59.5 s a step against 58.0 (docs/performance.md, 2026-12-07). Setting M_MMAP_THRESHOLD also turns
    the dynamic threshold off."""
    if _mallopt is not None:
        _mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _release_heap() -> None:
    """After an NF4 linear's forward on a CPU where nothing is kept (fp32, not in KEEP_DTYPES): glibc keeps the step's
    freed activations in its heap, so return them (the dequantized chunks are not among them: ``_scratch``): it keeps
    7B's fp32 step under 5 GiB at some cost in time. Not where a block is kept (bf16, fp16): there the freed pages
    fault in again for little memory saved. The figures, and the heap policies measured and dropped, are in
    docs/performance.md (issue 25)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


@contextmanager
def keep_dequantized() -> Iterator[None]:
    """Gradient checkpointing's recomputation of a block (``checkpoint(..., context_fn=...)``): its backward follows at
    once, so each NF4 weight dequantized for the recomputed forward is kept for that backward, and freed by it (one
    dequantization of three saved, for one block's weights in the compute dtype: about 0.4 GiB for 7B in bf16)."""
    previous, _KEEP["recomputing"] = _KEEP["recomputing"], True
    try:
        yield
    finally:
        _KEEP["recomputing"] = previous


_POOL: dict[tuple[torch.device, torch.dtype, int, int], list[torch.Tensor]] = {}


def _pooled(device: torch.device, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) buffer for a chunk kept from a recomputation to its backward, which gives it back
    (``_give_back``): the next block's recomputation writes into the same memory, so no page is freed and faulted in
    again."""
    free = _POOL.get((device, dtype, rows, cols))
    return free.pop() if free else torch.empty(rows, cols, dtype=dtype, device=device)


def _give_back(chunks: tuple[torch.Tensor, ...]) -> None:
    for c in chunks:
        _POOL.setdefault((c.device, c.dtype, *c.shape), []).append(c)


class _NF4Linear(torch.autograd.Function):
    """x W^T (+ b) with W dequantized for the matmul and again in backward: only the 4-bit W is kept. W is
    dequantized in row chunks of about CHUNK_VALUES values, so that no full-precision copy of a large W exists; on a CPU
    each into the same buffer (``_scratch``). While a checkpointed block is recomputed (``keep_dequantized``), the
    chunks are kept for its backward instead, in buffers it gives back (``_pooled``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, dtype: torch.dtype):
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        x = x.to(dtype)
        if _KEEP["recomputing"] and dtype in KEEP_DTYPES:
            kept = list(weight.row_chunks(dtype, "pool"))
            out = torch.cat([F.linear(x, w) for w in kept], dim=-1)
        else:
            out = torch.cat([F.linear(x, w) for w in weight.row_chunks(dtype, "scratch")], dim=-1)
            if x.is_cpu and dtype not in KEEP_DTYPES:
                _release_heap()
            # as many tensors of the chunks' shapes and dtype (checkpoint compares them with the recomputation's),
            # holding no memory: the backward dequantizes again
            cols = weight.numel() // weight.shape[0]
            empty = torch.empty((), dtype=dtype, device=x.device)
            kept = [empty.expand(stop - start, cols) for start, stop in weight.row_bounds()]
        ctx.save_for_backward(*kept)
        return out if bias is None else out + bias.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape = grad.shape
        grad = grad.to(ctx.dtype).reshape(-1, shape[-1])
        # checkpoint's backward runs the first forward's ctx with the tensors its recomputation saved: the kept
        # chunks (from the pool on a CPU), or placeholders; once given back they are not read again (retain_graph)
        kept = ctx.saved_tensors
        recomputed = kept[0].stride(0) != 0 and not getattr(ctx, "given_back", False)
        chunks = kept if recomputed else ctx.weight.row_chunks(ctx.dtype, "scratch")
        grad_x, start = None, 0
        for w in chunks:  # grad @ W, summed over its row chunks
            part = grad[:, start : start + w.shape[0]]
            grad_x = part @ w if grad_x is None else grad_x.addmm_(part, w)  # the sum inside the matmul
            start += w.shape[0]
        if recomputed and grad.is_cpu:
            _give_back(kept)
            ctx.given_back = True
        return grad_x.view(*shape[:-1], -1).to(ctx.x_dtype), None, None, None


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for an NF4 weight, in the weight's dtype: the run plan's compute dtype, which the model was built
    with (``RunPlan.linear_dtype``)."""
    return _NF4Linear.apply(x, weight, bias, weight.dtype)


class NF4Weight(torch.Tensor):
    """A frozen weight stored as NF4 (see the module docstring): shape and dtype are the original's; the data are
    ``packed`` codes (uint8, two per byte), int8 block ``scales``, their fp32 group ``factor`` and their ``mean``.

    Under FSDP2 (``fully_shard``) it is split by rows in whole blocks: a rank's shard holds the codes and int8 scales
    of its own rows (``first_block`` is where they start in the whole weight, ``full_rows`` its rows), and the whole
    weight's group factors and mean, 4 bytes per 16,384 values. FSDP2 all-gathers the codes and scales
    (``fsdp_pre_all_gather``) and makes of them the whole NF4 weight again (``fsdp_post_all_gather``): what a forward
    and its backward dequantize, a chunk at a time, as in one process. The half-precision weight is never gathered."""

    @staticmethod
    def __new__(cls, packed, scales, factor, mean, shape, dtype, first_block=0, full_rows=None):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor,
                 shape: torch.Size, dtype: torch.dtype, first_block: int = 0, full_rows: int | None = None) -> None:
        self.packed, self.scales, self.factor, self.mean = packed, scales, factor, mean
        self.first_block = first_block
        self.full_rows = shape[0] if full_rows is None and len(shape) else full_rows

    def inner(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales, "factor": self.factor, "mean": self.mean}

    def _like(self, shape: torch.Size | None = None, first_block: int | None = None, dtype: torch.dtype | None = None,
              **inner: torch.Tensor) -> NF4Weight:
        """Another NF4Weight with this one's metadata, some of it replaced."""
        first = self.first_block if first_block is None else first_block
        return NF4Weight(**{**self.inner(), **inner}, shape=self.shape if shape is None else shape,
                         dtype=dtype or self.dtype, first_block=first, full_rows=self.full_rows)

    @property
    def nbytes_stored(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inner().values())

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.dim() else 1

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        n = self.numel() // BLOCK
        block_scale = _block_scales(self.scales, self.factor, self.mean, self.first_block, n)
        return _dequantize(self.packed[: n * BLOCK // 2], block_scale, dtype or self.dtype).view(self.shape)

    def row_bounds(self) -> list[tuple[int, int]]:
        """The (start, stop) rows of each chunk ``row_chunks`` gives: about CHUNK_VALUES values each (one chunk, the
        whole weight, when rows do not hold whole blocks)."""
        rows, cols = self.shape[0], self.cols
        step = rows if cols % BLOCK else max(1, CHUNK_VALUES // cols)
        return [(r, min(r + step, rows)) for r in range(0, rows, step)]

    def row_chunks(self, dtype: torch.dtype, buffer: str = "new") -> Iterator[torch.Tensor]:
        """The dequantized weight, a few rows at a time (``row_bounds``). ``buffer``: "new" tensors; "scratch", on a
        CPU the same memory each time (a chunk is valid until the next is made); "pool", on a CPU memory to give back
        (``_give_back``) once used. Elsewhere always new: CUDA's caching allocator reuses memory already."""
        into = {"new": None, "scratch": _scratch, "pool": _pooled}[buffer] if self.device.type == "cpu" else None
        cols = self.cols
        block_scale = _block_scales(self.scales, self.factor, self.mean, self.first_block, self.numel() // BLOCK)
        for start, stop in self.row_bounds():  # whole blocks: rows hold whole blocks, or the one chunk is all rows
            first, last = start * cols // BLOCK, stop * cols // BLOCK
            out = None if into is None else into(self.device, dtype, stop - start, cols)
            yield _dequantize(self.packed[first * BLOCK // 2 : last * BLOCK // 2], block_scale[first:last], dtype,
                              out).view(-1, cols)

    def rows(self, start: int, stop: int) -> NF4Weight:
        """Rows start .. stop, sharing this weight's data (a row holds whole blocks: FSDP2's shards)."""
        if self.cols % BLOCK:
            raise ValueError(f"an NF4 weight of shape {tuple(self.shape)} cannot be split by rows: its rows do not "
                             f"hold whole blocks of {BLOCK} values")
        stop = min(stop, self.shape[0])
        start = min(start, stop)
        per_row = self.cols // BLOCK
        return self._like(shape=torch.Size((stop - start, *self.shape[1:])),
                          first_block=self.first_block + start * per_row,
                          packed=self.packed[start * per_row * BLOCK // 2 : stop * per_row * BLOCK // 2],
                          scales=self.scales[start * per_row : stop * per_row])

    def _empty(self, shape: torch.Size, make: Any, device: torch.device | None = None) -> NF4Weight:
        """A new weight of ``shape`` (rows of this one's width) with this one's metadata, its codes and scales made by
        ``make`` (torch.zeros, torch.empty), as are its group factors and mean (a shard copied in brings its own)."""
        device = device or self.device
        blocks = (torch.Size(shape).numel()) // BLOCK
        return self._like(shape=torch.Size(shape), packed=make(blocks * BLOCK // 2, dtype=torch.uint8, device=device),
                          scales=make(blocks, dtype=torch.int8, device=device),
                          factor=make(self.factor.shape, dtype=torch.float32, device=device),
                          mean=make(1, dtype=torch.float32, device=device))

    # FSDP2's extension points for a tensor subclass (torch.distributed.fsdp, as torchao's NF4Tensor): the
    # all-gather moves 4-bit codes and int8 scales, not the weight in its compute dtype.
    def fsdp_pre_all_gather(self, mesh: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        # Every rank sends as many bytes: FSDP2 pads the last shards (torch.chunk's split) to the first's rows. The
        # older one-argument signature: the newer one demands inputs of the padded shard's shape, which 4-bit codes
        # cannot have.
        padded = -(-self.full_rows // mesh.size()) * self.cols // BLOCK
        n = self.numel() // BLOCK
        packed, scales = self.packed[: n * BLOCK // 2], self.scales[:n]
        if n < padded:
            packed, scales = F.pad(packed, (0, (padded - n) * BLOCK // 2)), F.pad(scales, (0, padded - n))
        if mesh.size() == 1:  # FSDP2 copies a lone rank's one input, not several: the two as one byte buffer
            return (torch.cat([packed, scales.view(torch.uint8)]),), (self.factor, self.mean)
        return (packed, scales), (self.factor, self.mean)

    def fsdp_post_all_gather(self, outputs: tuple[torch.Tensor, ...], metadata: Any, param_dtype: torch.dtype, *,
                             out: torch.Tensor | None = None) -> tuple[NF4Weight, tuple[torch.Tensor, ...]] | None:
        if out is not None:  # the whole weight made by the first call views these outputs, gathered again in place
            return None
        factor, mean = metadata
        shape = torch.Size((self.full_rows, *self.shape[1:]))
        n = shape.numel() // BLOCK
        if len(outputs) == 1:  # one rank: codes, then scales, in one buffer
            packed, scales = outputs[0][: n * BLOCK // 2], outputs[0][n * BLOCK // 2 :].view(torch.int8)
        else:
            packed, scales = outputs
        whole = NF4Weight(packed[: n * BLOCK // 2], scales[:n], factor, mean, shape, self.dtype)
        return whole, tuple(outputs)  # whole buffers: FSDP2 frees and reallocates them by their own size

    def __repr__(self) -> str:
        return f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            return nf4_linear(x, weight, bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        w = args[0]
        if func in (aten.detach.default, aten.alias.default):
            return w._like()
        if func is aten._to_copy.default:  # .to(device) moves the 4-bit data; .to(dtype) only relabels it
            device = kwargs.get("device") or w.device
            return w._like(dtype=kwargs.get("dtype"), **{k: t.to(device) for k, t in w.inner().items()})
        if func is aten.clone.default:
            return w._like(**{k: t.clone() for k, t in w.inner().items()})
        if func is aten.is_pinned.default:
            return w.packed.is_pinned()
        # What fully_shard does to a parameter (split it by rows, pad the last shard, copy a shard in, view it flat)
        # and to_empty then does to the shards. Rows only: the data of a row are whole blocks.
        if func is aten.split.Tensor and (args[2] if len(args) > 2 else kwargs.get("dim", 0)) == 0:
            size = args[1]
            return [w.rows(r, r + size) for r in range(0, w.shape[0], size)]
        if func is aten.slice.Tensor:
            dim, start, stop, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1 :])[:4]
            if dim == 0 and step == 1:
                return w.rows(start or 0, w.shape[0] if stop is None else stop)
        if func in (aten.new_zeros.default, aten.new_empty.default):
            return w._empty(args[1], torch.zeros if func is aten.new_zeros.default else torch.empty,
                            kwargs.get("device"))
        if func is aten.empty_like.default:
            return w._empty(w.shape, torch.empty, kwargs.get("device"))
        if func is aten.copy_.default and isinstance(args[1], NF4Weight) and args[1].shape == w.shape:
            for k, t in args[1].inner().items():
                getattr(w, k).copy_(t)
            w.first_block = args[1].first_block
            return w
        if func is aten.view.default:  # as itself, or flat (FSDP2's view of a padded shard)
            shape = [w.numel() // -torch.Size(args[1]).numel() if d == -1 else d for d in args[1]]
            if shape in (list(w.shape), [w.numel()]):
                return w._like(shape=torch.Size(shape))
        if func is aten.as_strided.default and list(args[1]) == list(w.shape) and not (args[3:] and args[3]):
            return w._like()
        raise NotImplementedError(f"{func} is not defined on an NF4 weight; dequantize() it first")
