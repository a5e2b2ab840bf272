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
def quantize(w: torch.Tensor, dtype: torch.dtype | None = None, chunk_blocks: int = 4096) -> NF4Weight:
    """w (any float dtype) as an NF4Weight of the same shape, labelled ``dtype`` (default: w's), the dtype it
    dequantizes to by default. Deterministic: the same weight gives the same bits, so a resumed run quantizes its base
    again to exactly what it trained on."""
    if w.numel() % BLOCK:
        raise ValueError(f"NF4 needs a multiple of {BLOCK} values per weight, got shape {tuple(w.shape)}")
    blocks = w.detach().reshape(-1, BLOCK)
    packed = torch.empty(blocks.shape[0], BLOCK // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(blocks.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, blocks.shape[0], chunk_blocks):  # chunks that stay in cache: several passes over each
        x = blocks[i : i + chunk_blocks].to(torch.float32, copy=True)  # normalised in place below: never w itself
        a = x.abs().amax(dim=1)
        absmax[i : i + chunk_blocks] = a
        codes = _codes(x.div_(a.clamp(min=torch.finfo(torch.float32).tiny)[:, None]))
        packed[i : i + chunk_blocks] = codes[:, 0::2] << 4 | codes[:, 1::2]
    # Double quantization of the block scales.
    mean = absmax.mean()
    n_groups = -(-absmax.numel() // SCALE_GROUP)
    centred = F.pad(absmax - mean, (0, n_groups * SCALE_GROUP - absmax.numel())).view(n_groups, SCALE_GROUP)
    factor = centred.abs().amax(dim=1) / 127
    scales = torch.round(centred / factor.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).to(torch.int8)
    return NF4Weight(packed.flatten(), scales.flatten(), factor, mean.reshape(1), w.shape, dtype or w.dtype)


def _block_scales(scales: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor, n_blocks: int) -> torch.Tensor:
    return (scales.view(-1, SCALE_GROUP).float() * factor[:, None]).flatten()[:n_blocks] + mean


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
except (OSError, AttributeError):  # pragma: no cover - another C library
    _malloc_trim = None


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
    ``packed`` codes (uint8, two per byte), int8 block ``scales``, their fp32 group ``factor`` and their ``mean``."""

    @staticmethod
    def __new__(cls, packed, scales, factor, mean, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor,
                 shape: torch.Size, dtype: torch.dtype) -> None:
        self.packed, self.scales, self.factor, self.mean = packed, scales, factor, mean

    def inner(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales, "factor": self.factor, "mean": self.mean}

    @property
    def nbytes_stored(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inner().values())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        block_scale = _block_scales(self.scales, self.factor, self.mean, self.packed.numel() * 2 // BLOCK)
        return _dequantize(self.packed, block_scale, dtype or self.dtype).view(self.shape)

    def row_bounds(self) -> list[tuple[int, int]]:
        """The (start, stop) rows of each chunk ``row_chunks`` gives: about CHUNK_VALUES values each (one chunk, the
        whole weight, when rows do not hold whole blocks)."""
        rows, cols = self.shape[0], self.numel() // self.shape[0]
        step = rows if cols % BLOCK else max(1, CHUNK_VALUES // cols)
        return [(r, min(r + step, rows)) for r in range(0, rows, step)]

    def row_chunks(self, dtype: torch.dtype, buffer: str = "new") -> Iterator[torch.Tensor]:
        """The dequantized weight, a few rows at a time (``row_bounds``). ``buffer``: "new" tensors; "scratch", on a
        CPU the same memory each time (a chunk is valid until the next is made); "pool", on a CPU memory to give back
        (``_give_back``) once used. Elsewhere always new: CUDA's caching allocator reuses memory already."""
        into = {"new": None, "scratch": _scratch, "pool": _pooled}[buffer] if self.device.type == "cpu" else None
        cols = self.numel() // self.shape[0]
        block_scale = _block_scales(self.scales, self.factor, self.mean, self.numel() // BLOCK)
        for start, stop in self.row_bounds():  # whole blocks: rows hold whole blocks, or the one chunk is all rows
            first, last = start * cols // BLOCK, stop * cols // BLOCK
            out = None if into is None else into(self.device, dtype, stop - start, cols)
            yield _dequantize(self.packed[first * BLOCK // 2 : last * BLOCK // 2], block_scale[first:last], dtype,
                              out).view(-1, cols)

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
            return NF4Weight(**w.inner(), shape=w.shape, dtype=w.dtype)
        if func is aten._to_copy.default:  # .to(device) moves the 4-bit data; .to(dtype) only relabels it
            device = kwargs.get("device") or w.device
            moved = {k: t.to(device) for k, t in w.inner().items()}
            return NF4Weight(**moved, shape=w.shape, dtype=kwargs.get("dtype") or w.dtype)
        if func is aten.clone.default:
            return NF4Weight(**{k: t.clone() for k, t in w.inner().items()}, shape=w.shape, dtype=w.dtype)
        if func is aten.is_pinned.default:
            return w.packed.is_pinned()
        raise NotImplementedError(f"{func} is not defined on an NF4 weight; dequantize() it first")
