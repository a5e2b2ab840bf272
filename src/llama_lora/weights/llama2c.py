"""llama2.c's version-0 checkpoint: a 7-int header, then fp32 weights grouped by kind across layers."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import torch

from ..config import LlamaConfig
from ..model import rope_cache
from .tensors import LazyStateDict, StateDict, plain, publish

# llama2.c's per-layer tensors, in the file's order (each kind for every layer in turn).
_PER_LAYER = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
              "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


def load_llama2c(path: Path) -> tuple[LazyStateDict, dict[str, str], LlamaConfig]:
    size = path.stat().st_size
    if size < 28 or size % 4:
        raise ValueError(f"{path}: not a llama2.c version-0 checkpoint (size {size} bytes)")
    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, max_seq_len = struct.unpack("7i", f.read(28))
    shared = vocab > 0
    try:
        config = LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=abs(vocab),
                             hidden_dim=hidden, max_seq_len=max_seq_len, tie_embeddings=shared)
    except ValueError as e:
        raise ValueError(f"{path}: header does not describe a valid model ({e})") from None
    kv_dim = n_kv_heads * config.head_dim
    shapes = {"attention_norm": (dim,), "attention.wq": (dim, dim), "attention.wk": (kv_dim, dim),
              "attention.wv": (kv_dim, dim), "attention.wo": (dim, dim), "ffn_norm": (dim,),
              "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden), "feed_forward.w3": (hidden, dim)}
    layout = [("tok_embeddings.weight", None, (abs(vocab), dim))]
    layout += [(f"{name}.weight", n_layers, shapes[name]) for name in _PER_LAYER]
    layout += [("norm.weight", None, (dim,)), ("freq_cis_real", None, (max_seq_len, config.head_dim // 2)),
               ("freq_cis_imag", None, (max_seq_len, config.head_dim // 2))]
    if not shared:
        layout.append(("output.weight", None, (abs(vocab), dim)))
    needed = 7 + sum((n or 1) * torch.Size(s).numel() for _, n, s in layout)
    if size // 4 != needed:
        raise ValueError(f"{path}: llama2.c checkpoint is {size} bytes, its header implies {needed * 4}; "
                         "the file is truncated or not version 0")
    flat = torch.from_file(str(path), shared=False, size=needed, dtype=torch.float32)
    sd, offset = LazyStateDict(), 7
    for name, n_stack, shape in layout:
        count = (n_stack or 1) * torch.Size(shape).numel()
        t = flat[offset : offset + count]
        offset += count
        if name.startswith("freq_cis"):
            continue  # recomputed by the model
        if n_stack is None:
            sd.add(name, [t.view(shape)])
        else:
            for i, layer_t in enumerate(t.view(n_stack, *shape)):
                sd.add(f"layers.{i}.{name}", [layer_t])
    if shared:
        sd.add("output.weight", [sd["tok_embeddings.weight"]])
    return sd, dict.fromkeys(sd, str(path)), config


def save_llama2c(sd: StateDict, config: LlamaConfig, path: str | Path) -> Path:
    """Write llama2.c's version-0 .bin."""
    path = Path(path)
    if config.rope_theta != 10000.0 or config.rope_scaling is not None:
        raise ValueError("llama2.c's format has no RoPE settings (run.c computes theta 10000, unscaled); write this "
                         "model as meta or hf")
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = plain(sd)
    shared = torch.equal(sd["tok_embeddings.weight"], sd["output.weight"])
    vocab = config.vocab_size if shared else -config.vocab_size
    header = struct.pack("7i", config.dim, config.hidden_dim, config.n_layers, config.n_heads, config.n_kv_heads,
                         vocab, config.max_seq_len)
    rope = rope_cache(config.head_dim, config.max_seq_len, config.rope_theta)
    tensors = [sd["tok_embeddings.weight"]]
    tensors += [sd[f"layers.{i}.{name}.weight"] for name in _PER_LAYER for i in range(config.n_layers)]
    tensors += [sd["norm.weight"], rope[..., 0], rope[..., 1]]
    if not shared:
        tensors.append(sd["output.weight"])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for t in tensors:
            t = t.detach().float().contiguous()
            f.write(ctypes.string_at(t.data_ptr(), t.numel() * 4))
    publish(tmp, path)
    return path
