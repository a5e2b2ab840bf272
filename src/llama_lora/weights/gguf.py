"""A GGUF file as a base: llama.cpp's ``llama``, ``qwen2`` and ``qwen3`` architectures read through the gguf package
(llama.cpp's own reader),
each tensor by Meta name and dequantized only when it is read. f32, f16 and bf16 tensors are memory-mapped as they
are; the quantized ones (q8_0, q4_0, q4_1, q5_0, q5_1 and the k-quants the gguf package dequantizes) become fp32 one
tensor at a time, which the run plan then casts or quantizes (``build_model``), so the whole model never exists in
fp32. llama.cpp's ``llama`` pairs RoPE channels as Meta's does: no row is permuted; its ``qwen2`` and ``qwen3`` rotate
halves as HF does, and their q/k rows are permuted back as they are read (``layout.GGUF_ARCHITECTURES``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import LlamaConfig
from ..layout import BLOCK_LINEARS, GGUF_ARCHITECTURES, HEAD_NORMS, gguf_name, permute_from_hf, rope_heads
from .tensors import LazyStateDict

ARCHITECTURES = tuple(dict.fromkeys(arch for arch, _ in GGUF_ARCHITECTURES.values()))  # general.architecture values
MAGIC = b"GGUF"


def gguf_package() -> Any:
    """The gguf package, imported here only, or one line that says how to get it."""
    try:
        import gguf
    except ImportError:
        raise ValueError('GGUF files need the gguf package (llama.cpp\'s own reader and writer): pip install -e '
                         '".[gguf]", or pip install gguf') from None
    return gguf


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def read_gguf(path: str | Path) -> Any:
    """The file's reader (its tensors memory-mapped), or one line for a file that is not a readable GGUF."""
    gguf = gguf_package()
    try:
        return gguf.GGUFReader(str(path), "c")  # copy-on-write, as torch's mmap: a merge may rewrite in place
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not GGUF: whatever the reader says
        raise ValueError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:200] if str(e) else e!r}); "
                         "is it truncated or still downloading?") from None


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value (a string, a number or a list), or ``default`` where the file has none."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader: Any, path: Path) -> LlamaConfig:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: a GGUF of architecture {arch!r}; this version reads {', '.join(ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path}: RoPE frequency scaling in a GGUF (Llama 3.1's rope_freqs) is not read yet; use "
                         "the model's HF or Meta folder")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
    heads = field(reader, f"{arch}.attention.head_count")
    head_dim = field(reader, f"{arch}.attention.key_length")
    if head_dim != field(reader, f"{arch}.attention.value_length", head_dim):
        raise ValueError(f"{path}: keys and values of different widths are not implemented here")
    return LlamaConfig(dim=field(reader, f"{arch}.embedding_length"), n_layers=field(reader, f"{arch}.block_count"),
                       n_heads=heads, n_kv_heads=field(reader, f"{arch}.attention.head_count_kv", heads),
                       vocab_size=vocab, hidden_dim=field(reader, f"{arch}.feed_forward_length"),
                       norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                       rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
                       max_seq_len=field(reader, f"{arch}.context_length", 4096),
                       tie_embeddings="output.weight" not in names, attention_bias=arch == "qwen2",
                       qk_norm=arch == "qwen3", head_dim=head_dim)


def _meta_names(config: LlamaConfig) -> dict[str, str]:
    """GGUF name -> Meta name of every tensor of a Llama of this config."""
    keys = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    for i in range(config.n_layers):
        keys += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
        keys += [f"layers.{i}.{layer.meta}.weight" for layer in BLOCK_LINEARS]
        keys += [f"layers.{i}.{layer.meta}.bias" for layer in BLOCK_LINEARS if layer.biased and config.attention_bias]
        keys += [f"layers.{i}.{norm}.weight" for norm in HEAD_NORMS if config.qk_norm]
    return {gguf_name(k): k for k in keys}


def load_gguf(path: str | Path) -> tuple[LazyStateDict, dict[str, str], LlamaConfig]:
    """The tensors of a GGUF file by Meta name (read lazily), the file each came from, and its config."""
    path = Path(path)
    reader = read_gguf(path)
    config = gguf_config(reader, path)
    gguf = gguf_package()
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    meta = _meta_names(config)
    rotate_half = GGUF_ARCHITECTURES[config.family][1]  # q and k in HF's row order in this architecture
    sd, sources = LazyStateDict(), {}
    for t in reader.tensors:
        name = meta.get(t.name)
        if name is None:
            raise ValueError(f"{path}: tensor {t.name!r} has no place in a Llama of this shape")
        shape = tuple(reversed([int(n) for n in t.shape]))  # GGML lists the fastest dimension first
        heads = rope_heads(name, config) if rotate_half else None
        if t.tensor_type in plain and t.tensor_type != gguf.GGMLQuantizationType.BF16:
            sd.add(name, [torch.from_numpy(np.asarray(t.data)).view(shape)], hf_heads=heads)
        else:
            sd.add_lazy(name, torch.Size(shape), _dequantizer(gguf, t, shape, heads))
        sources[name] = f"{path} ({t.tensor_type.name})"
    if config.tie_embeddings:  # the output layer is the embedding: one tensor, placed as both (build_model ties them)
        sd.alias("output.weight", "tok_embeddings.weight")
        sources["output.weight"] = sources["tok_embeddings.weight"] + " (tied: the embedding)"
    return sd, sources, config


def _dequantizer(gguf: Any, t: Any, shape: tuple[int, ...], heads: int | None = None):
    def read() -> torch.Tensor:
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"tensor {t.name}: the gguf package cannot dequantize {t.tensor_type.name}; convert the "
                             "file to f16 or q8_0 with llama.cpp's llama-quantize") from None
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(shape)
        return tensor if heads is None else permute_from_hf(tensor, heads)
    return read
