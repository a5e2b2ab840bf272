"""GGUF, the file llama.cpp, Ollama and LM Studio run: a merged model (LLaMA metadata, the SentencePiece tokenizer, the
weights) or a LoRA adapter alone, written with llama.cpp's own Python writer (the ``gguf`` package, an optional extra:
``pip install -e ".[gguf]"``), tensor by tensor.

llama.cpp names tensors its own way (``layout.gguf_name``). Its ``llama`` architecture (Llama, Mistral) pairs RoPE
channels as Meta does, so Meta-named tensors go in as they are; its ``qwen2`` and ``qwen3`` rotate halves, as HF does,
and get q and k in HF's row order (``layout.to_gguf_layout``). Norms and biases stay f32 (llama.cpp's rule: 1-D
tensors are never quantized); a matrix whose rows do not split into the type's blocks is written in f16 instead, and
said so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .config import LlamaConfig
from .layout import gguf_arch, gguf_name, to_gguf_layout
from .lora import LoRASettings
from .model import llama3_scaled, rope_frequencies
from .prompts import PromptFormat
from .tokenizer import GGUF_PRE_TOKENIZERS, Tokenizer
from .weights.gguf import gguf_package
from .weights.tensors import publish

log = logging.getLogger(__name__)

# The types the gguf package writes itself (its quants module): llama.cpp's llama-quantize makes the k-quants
# (Q4_K_M, Q5_K_M, ...) from an f16 file.
GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}


def _tensor_type(gguf: Any, name: str, shape: tuple[int, ...], wanted: str) -> Any:
    """The GGML type of one tensor: 1-D tensors in f32, matrices in the wanted type (f16 when a row does not split
    into its blocks)."""
    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or wanted == "f32":
        return types.F32
    qtype = types[wanted.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        log.info("GGUF: %s has rows of %d values, not a multiple of %s's blocks of %d: written in f16", name,
                 shape[-1], wanted, block)
        return types.F16
    return qtype


def _encode(gguf: Any, t: torch.Tensor, qtype: Any) -> Any:
    """A tensor's bytes for the file: f32/f16 as arrays, the rest through the gguf package's quantizer."""
    data = t.detach().to(torch.float32).contiguous().numpy()
    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return data
    if qtype == types.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _byte_shape(gguf: Any, shape: tuple[int, ...], qtype: Any) -> tuple[tuple[int, ...], Any, int]:
    """(shape to declare, numpy dtype, bytes) of a tensor of ``shape`` stored as ``qtype``."""
    types = gguf.GGMLQuantizationType
    if qtype in (types.F32, types.F16):
        dtype = np.float32 if qtype == types.F32 else np.float16
        return shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize
    byte_shape = tuple(gguf.quants.quant_shape_to_byte_shape(shape, qtype))
    return byte_shape, np.dtype(np.uint8), math.prod(byte_shape)


def _add_sentencepiece_tokenizer(writer: Any, gguf: Any, tokenizer: Tokenizer) -> None:
    """The SentencePiece model as llama.cpp's "llama" tokenizer: pieces, scores and types."""
    sp = tokenizer.sp
    kinds = gguf.TokenType
    types = [kinds.UNKNOWN if sp.IsUnknown(i) else kinds.CONTROL if sp.IsControl(i) else kinds.BYTE if sp.IsByte(i)
             else kinds.UNUSED if sp.IsUnused(i) else kinds.NORMAL for i in range(tokenizer.vocab_size)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.IdToPiece(i).encode("utf-8") for i in range(tokenizer.vocab_size)])
    writer.add_token_scores([sp.GetScore(i) for i in range(tokenizer.vocab_size)])
    writer.add_token_types(types)
    writer.add_unk_token_id(sp.unk_id())


def _add_bpe_tokenizer(writer: Any, gguf: Any, tokenizer: Tokenizer, rows: int) -> None:
    """A byte-level BPE (Llama 3's tiktoken file, a tokenizer.json, a GGUF's own) as llama.cpp's "gpt2" tokenizer: its
    tokens in GPT-2's byte alphabet, the merges, the special tokens as control tokens, and the pre-tokenizer by
    llama.cpp's name. An embedding of more ``rows`` than tokens (Qwen's, padded) gets unused [PAD<id>] tokens for the
    rest, as llama.cpp's converter writes them: llama.cpp takes its vocabulary size from the token list."""
    if tokenizer.gguf_pre is None:
        raise ValueError(f"GGUF: {tokenizer.path.name}'s pre-tokenizer is none that llama.cpp names here "
                         f"({', '.join(GGUF_PRE_TOKENIZERS)}); merge to --format hf instead")
    tokens, merges, special = tokenizer.vocabulary()
    kinds = gguf.TokenType
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.gguf_pre)
    writer.add_token_list([*tokens, *(f"[PAD{i}]" for i in range(len(tokens), rows))])
    writer.add_token_types([kinds.CONTROL if s else kinds.NORMAL for s in special]
                           + [kinds.UNUSED] * (rows - len(tokens)))
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    if "eot" in tokenizer.special:
        writer.add_eot_token_id(tokenizer.special["eot"])
    writer.add_pad_token_id(tokenizer.pad_id)


def rope_factors(config: LlamaConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs.weight: what each RoPE frequency is divided by under Llama 3.1's scaling
    (``model.llama3_scaled``), as llama.cpp's own converter computes it."""
    freqs = rope_frequencies(config.head_dim, config.rope_theta)
    return freqs / llama3_scaled(freqs, **config.rope_scaling)


def _add_metadata(writer: Any, gguf: Any, config: LlamaConfig, tokenizer: Tokenizer, name: str,
                  chat_template: str | None) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_block_count(config.n_layers)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer.kind == "sentencepiece":
        _add_sentencepiece_tokenizer(writer, gguf, tokenizer)
    else:
        _add_bpe_tokenizer(writer, gguf, tokenizer, config.vocab_size)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def write_model(path: str | Path, config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]],
                tensors: Iterable[tuple[str, torch.Tensor]], tokenizer: Tokenizer, type_name: str = "f16",
                name: str = "llama-lora", chat_template: str | None = None) -> Path:
    """One .gguf file of a (merged) model. ``shapes``: every tensor's shape by Meta name, in the order ``tensors``
    yields them (one at a time: a layer's tensor is encoded and written before the next one is asked for).
    ``chat_template``: the prompt format the model was trained with, as Jinja (None: none, as for a base)."""
    gguf = gguf_package()
    tokenizer.check_fits(config.vocab_size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=gguf_arch(config))
    _add_metadata(writer, gguf, config, tokenizer, name, chat_template)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[type_name]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    skip = {"output.weight"} if config.tie_embeddings else set()  # llama.cpp uses token_embd for a tied output
    kinds = {}
    for key, shape in shapes.items():
        if key in skip:
            continue
        kinds[key] = _tensor_type(gguf, key, tuple(shape), type_name)
        declared, dtype, nbytes = _byte_shape(gguf, tuple(shape), kinds[key])
        writer.add_tensor_info(gguf_name(key), declared, dtype, nbytes, raw_dtype=kinds[key])
    factors = rope_factors(config) if config.rope_scaling is not None else None
    if factors is not None:  # llama.cpp's form of Llama 3.1's RoPE scaling: one divisor per frequency, in f32
        writer.add_tensor_info("rope_freqs.weight", tuple(factors.shape), factors.numpy().dtype, factors.numel() * 4,
                               raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, t in tensors:
        if key not in skip:
            writer.write_tensor_data(_encode(gguf, to_gguf_layout(key, t, config), kinds[key]))
    if factors is not None:
        writer.write_tensor_data(factors.numpy())
    writer.close()
    publish(tmp, path)
    return path


def write_lora(path: str | Path, config: LlamaConfig, lora: LoRASettings, tensors: Mapping[str, torch.Tensor],
               name: str = "llama-lora adapter") -> Path:
    """A llama.cpp LoRA adapter (``llama-cli -m base.gguf --lora this.gguf``): general.type adapter, adapter.type lora,
    adapter.lora.alpha, and ``blk.N.<layer>.weight.lora_a`` (r, in) / ``.lora_b`` (out, r) in f32. llama.cpp scales
    the update by alpha / r, as the adapter trained."""
    if lora.use_dora:
        raise ValueError("A DoRA adapter has no llama.cpp LoRA form (llama.cpp adds B A, not DoRA's rescaled rows); "
                         "merge it into the model instead: scripts/merge.py --format gguf")
    gguf = gguf_package()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=gguf_arch(config))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales by alpha / r: the alpha that gives the update's own scale (rsLoRA's alpha / sqrt(r) too)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.scale * lora.r)
    writer.add_name(name)
    writer.add_block_count(config.n_layers)
    for key, t in tensors.items():
        if key.rsplit(".", 1)[-1] in ("lora_a", "lora_b"):
            t = to_gguf_layout(key, t.detach().to(torch.float32), config)
            writer.add_tensor(gguf_name(key), t.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    publish(tmp, path)
    return path


def write_modelfile(gguf_path: Path, prompt_format: PromptFormat) -> Path:
    """An Ollama Modelfile beside a model GGUF, in the prompt format the model was trained with (Ollama's Go template
    and stop strings: ``PromptFormat.ollama``)."""
    template, stops = prompt_format.ollama or (None, [])  # none: Ollama reads the GGUF's own chat template
    text = (f"# Create and run it:  ollama create my-model -f {gguf_path.parent / 'Modelfile'}  &&  ollama run "
            f"my-model\n# The prompt is {prompt_format.description}, as in training.\nFROM ./{gguf_path.name}\n"
            + (f"TEMPLATE \"\"\"{template}\"\"\"\n" if template else "")
            + "".join(f"PARAMETER stop \"{stop}\"\n" for stop in stops))
    path = gguf_path.parent / "Modelfile"
    path.write_text(text)
    return path
