"""A checkpoint's tensors: read weights-only and memory-mapped, looked up lazily by Meta name (``LazyStateDict``),
and written atomically."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from ..layout import permute_from_hf

StateDict = dict[str, torch.Tensor]


def torch_load(path: Path) -> StateDict:
    """A .pth/.bin file, weights only (never unpickles code), memory-mapped where the file format allows it."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" in str(e):  # legacy (non-zip) torch.save files cannot be mmapped
            return torch.load(path, map_location="cpu", weights_only=True)
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    except Exception as e:  # pickle refusing a non-tensor object, truncated zip, ...
        raise ValueError(f"{path}: not a readable weights-only PyTorch checkpoint ({str(e).splitlines()[0]})") from None


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by Meta name, each read only when asked for.

    Tensors are memory-mapped. A tensor split over Meta's model-parallel shards is concatenated when it is read, and
    HF's q/k permutation is undone on first read, in place (the mapping is private, copy-on-write). ``rows`` reads
    only some rows of a tensor, through both, so that a rank of a sharded model never holds a whole tensor.
    """

    def __init__(self) -> None:
        self._parts: dict[str, tuple[list[torch.Tensor], int]] = {}
        self._hf_heads: dict[str, int] = {}  # q/k tensors still in HF's rotate-half row order, and their head count
        self._lazy: dict[str, tuple[torch.Size, Callable[[], torch.Tensor]]] = {}  # made only when read (GGUF quants)

    def alias(self, key: str, other: str) -> None:
        """``key`` reads as ``other`` does (a tied output layer is the embedding)."""
        if other in self._lazy:
            self._lazy[key] = self._lazy[other]
        else:
            self._parts[key] = self._parts[other]

    def add_lazy(self, key: str, shape: torch.Size, read: Callable[[], torch.Tensor]) -> None:
        """A tensor that ``read`` makes when asked for (an fp32 dequantization of a quantized GGUF tensor)."""
        self._lazy[key] = (shape, read)

    def add(self, key: str, parts: list[torch.Tensor], dim: int = 0, hf_heads: int | None = None) -> None:
        self._parts[key] = (parts, dim)
        if hf_heads is not None:
            self._hf_heads[key] = hf_heads

    def shape(self, key: str) -> torch.Size:
        if key in self._lazy:
            return self._lazy[key][0]
        parts, dim = self._parts[key]
        shape = list(parts[0].shape)
        if len(parts) > 1:
            shape[dim] = sum(p.shape[dim] for p in parts)
        return torch.Size(shape)

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32 if key in self._lazy else self._parts[key][0][0].dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._lazy:
            return self._lazy[key][1]()
        parts, dim = self._parts[key]
        if len(parts) > 1:
            return torch.cat(parts, dim=dim)
        heads = self._hf_heads.pop(key, None)
        if heads is not None:
            _permute_in_place(parts[0], heads)
        return parts[0]

    def release(self, key: str) -> None:
        """Let the kernel drop the pages of a tensor that has been read and is not needed again (its mapping is
        private and unmodified, or modified only for the read: nothing is lost), so that RSS does not grow to the
        checkpoint's size while it is streamed through, as quantizing or writing a GGUF does."""
        for part in self._parts.get(key, ([], 0))[0]:
            _drop_pages(part)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the tensor (its first dimension) without reading the others."""
        if key in self._lazy:
            return self[key][start:stop]
        parts, dim = self._parts[key]
        if key in self._hf_heads:
            order = permute_from_hf(torch.arange(parts[0].shape[0])[:, None], self._hf_heads[key])[:, 0]
            return parts[0][order[start:stop]]
        if len(parts) == 1:
            return parts[0][start:stop]
        if dim != 0:
            return torch.cat([p[start:stop] for p in parts], dim=dim)
        pieces, offset = [], 0
        for p in parts:  # the parts that overlap start..stop
            lo, hi = max(start - offset, 0), min(stop - offset, p.shape[0])
            if lo < hi:
                pieces.append(p[lo:hi])
            offset += p.shape[0]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def __contains__(self, key: object) -> bool:  # Mapping's would read the tensor
        return key in self._parts or key in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter([*self._parts, *self._lazy])

    def __len__(self) -> int:
        return len(self._parts) + len(self._lazy)


def _permute_in_place(w: torch.Tensor, n_heads: int) -> None:
    """Undo HF's q/k permutation inside ``w`` itself. The checkpoint's mapping is private (copy-on-write), so the
    rewritten pages replace the file's pages instead of joining them: loading HF costs the memory Meta's layout does,
    not one more copy of q and k."""
    permuted = permute_from_hf(w, n_heads)
    w.copy_(permuted if permuted.data_ptr() != w.data_ptr() else permuted.clone())


# ----- writing -----

def publish(tmp: Path, path: Path) -> None:
    """Move a finished temporary file into place (atomic), with the permissions the user's umask gives new files
    (safetensors writes its files 0600, torch.save 0644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    publish(tmp, path)


def plain(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A state dict to write: base tensors only, contiguous, detached."""
    lora = [k for k in sd if "lora_" in k]
    if lora:
        raise ValueError(f"State dict holds LoRA tensors ({lora[0]}, ...): merge_lora(model, unload=True) first")
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _drop_pages(t: torch.Tensor) -> None:
    """MADV_DONTNEED on the whole pages of a memory-mapped CPU tensor (Linux; elsewhere nothing)."""
    if t.device.type != "cpu" or not hasattr(_libc, "madvise"):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


try:
    _libc = ctypes.CDLL(None)
except OSError:  # pragma: no cover - no C library to call
    _libc = None


def _writable_folder(folder: Path) -> bool:
    """Whether files can be created in ``folder``, or in the nearest existing folder above it (it will be made)."""
    while not folder.exists():
        if folder.parent == folder:
            return False
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def check_output_dir(path: str | Path, what: str) -> None:
    """Refuse, in one line and before any work, an output folder that is a file or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; give a folder to write into")
    if not _writable_folder(path):
        raise ValueError(f"{what} {path} cannot be written (permissions or a read-only file system); give a folder "
                         "you can write to")


def check_output_file(path: str | Path, what: str) -> None:
    """Refuse, in one line and before any work, an output file that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    if (path.exists() and not os.access(path, os.W_OK)) or not _writable_folder(path.parent):
        raise ValueError(f"{what} {path} cannot be written (permissions or a read-only file system); give a path "
                         "you can write to")
