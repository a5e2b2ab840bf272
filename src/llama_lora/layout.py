"""The model's tensors, once: each linear layer's Meta name, HF name, llama.cpp (GGUF) name, LoRA target, shape,
whether QLoRA quantizes it, how Meta's model-parallel shards split it, and whether HF permutes its rows for RoPE; and
the names of the norms and embeddings in each format. LoRA, checkpoint I/O, the memory model, adapter export and GGUF
export read this table; nothing else lists the layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LlamaConfig


@dataclass(frozen=True)
class Linear:
    target: str  # the LoRA target, and the module's attribute name: wq
    meta: str  # the module in Meta's names (within a block, or at the top): attention.wq
    hf: str  # the module in HF LlamaForCausalLM's names (within a block, or at the top): self_attn.q_proj
    gguf: str  # the tensor in llama.cpp's names (blk.N.<this>.weight, or at the top): attn_q
    out_dim: str  # LlamaConfig attribute (or kv_dim) giving the weight's rows
    in_dim: str  # and its columns
    quantized: bool  # stored as NF4 under model.base_dtype nf4
    split_dim: int  # Meta's shards: ColumnParallelLinear splits rows (0), RowParallelLinear columns (1)
    rope_heads: str | None = None  # HF permutes the rows per head of this count (rotate-half RoPE): q and k
    in_block: bool = True
    biased: bool = False  # has a bias under LlamaConfig.attention_bias (Qwen2's q, k and v)

    def shape(self, config: LlamaConfig) -> tuple[int, int]:
        """(out, in) of the weight."""
        dims = {"dim": config.dim, "q_dim": config.q_dim, "kv_dim": config.n_kv_heads * config.head_dim,
                "hidden": config.hidden_dim, "vocab": config.vocab_size}
        return dims[self.out_dim], dims[self.in_dim]

    @property
    def hf_module_name(self) -> str:
        """The name PEFT's target_modules uses: q_proj, lm_head."""
        return self.hf.rsplit(".", 1)[-1]


LINEARS = (
    Linear("wq", "attention.wq", "self_attn.q_proj", "attn_q", "q_dim", "dim", True, 0, rope_heads="n_heads",
           biased=True),
    Linear("wk", "attention.wk", "self_attn.k_proj", "attn_k", "kv_dim", "dim", True, 0, rope_heads="n_kv_heads",
           biased=True),
    Linear("wv", "attention.wv", "self_attn.v_proj", "attn_v", "kv_dim", "dim", True, 0, biased=True),
    Linear("wo", "attention.wo", "self_attn.o_proj", "attn_output", "dim", "q_dim", True, 1),
    Linear("w1", "feed_forward.w1", "mlp.gate_proj", "ffn_gate", "hidden", "dim", True, 0),
    Linear("w2", "feed_forward.w2", "mlp.down_proj", "ffn_down", "dim", "hidden", True, 1),
    Linear("w3", "feed_forward.w3", "mlp.up_proj", "ffn_up", "hidden", "dim", True, 0),
    Linear("output", "output", "lm_head", "output", "vocab", "dim", False, 0, in_block=False),
)
BY_TARGET = {layer.target: layer for layer in LINEARS}
LORA_TARGETS = tuple(BY_TARGET)
BLOCK_LINEARS = tuple(layer for layer in LINEARS if layer.in_block)

# The other tensors: the norms of a block (Meta -> HF name; replicated in Meta's shards; Qwen3's per-head q/k norms
# too, whose weight of head_dim HF permutes as one head of q or k), and the top-level ones (Meta -> HF name, Meta's
# split dim: the embedding is a ParallelEmbedding, split on its columns); and their GGUF names.
BLOCK_NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm"}
HEAD_NORMS = ("attention.q_norm", "attention.k_norm")
TOP = {"tok_embeddings": ("model.embed_tokens", 1), "norm": ("model.norm", None)}
GGUF_OTHERS = {"attention_norm": "attn_norm", "ffn_norm": "ffn_norm", "tok_embeddings": "token_embd",
               "norm": "output_norm", "attention.q_norm": "attn_q_norm", "attention.k_norm": "attn_k_norm"}


def linear_of(key: str) -> Linear | None:
    """The linear layer a Meta tensor name belongs to ('layers.3.attention.wq.weight', '....lora_b', 'output.weight'),
    or None for embeddings and norms."""
    module = key.rsplit(".", 1)[0]
    for layer in LINEARS:
        if module == layer.meta or module.endswith("." + layer.meta):
            return layer
    return None


def is_block_linear(key: str) -> bool:
    """A weight of one of the blocks' linear layers (the ones QLoRA quantizes)."""
    layer = linear_of(key)
    return layer is not None and layer.quantized and key.endswith(".weight")


def split_dim(key: str) -> int | None:
    """The dimension Meta's model-parallel shards split this tensor on; None for replicated tensors (norms)."""
    layer = linear_of(key)
    if layer is not None:
        return layer.split_dim
    top = TOP.get(key.rsplit(".", 1)[0])
    return top[1] if top else None


def rope_heads(key: str, config: LlamaConfig) -> int | None:
    """The head count over which HF permutes this tensor's rows: q and k weights and biases, and the LoRA B and DoRA
    magnitude of q and k (delta W = B A, so B's rows are W's rows, and the magnitude has one value per row); Qwen3's
    q/k norm weights, one head's width. None for every other tensor."""
    module, _, kind = key.rpartition(".")
    if module.endswith(HEAD_NORMS):
        return 1
    layer = linear_of(key)
    if layer is None or layer.rope_heads is None or kind not in ("weight", "bias", "lora_b", "lora_magnitude"):
        return None
    return getattr(config, layer.rope_heads)


# llama.cpp's architecture for each family (LlamaConfig.family), and whether its RoPE rotates halves (NEOX), as HF's
# does, so that q and k are stored in HF's row order: llama.cpp's qwen2 and qwen3 do; its llama (Mistral too) pairs
# adjacent channels as Meta's does.
GGUF_ARCHITECTURES = {"llama": ("llama", False), "mistral": ("llama", False), "qwen2": ("qwen2", True),
                      "qwen3": ("qwen3", True)}


def gguf_arch(config: LlamaConfig) -> str:
    return GGUF_ARCHITECTURES[config.family][0]


def to_gguf_layout(key: str, t: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    """A Meta-ordered tensor in the row order of its GGUF architecture (HF's for the rotate-half ones)."""
    return to_hf_layout(key, t, config) if GGUF_ARCHITECTURES[config.family][1] else t


def gguf_name(key: str) -> str:
    """A Meta tensor name (``layers.3.attention.wq.weight``, ``....lora_a``) in llama.cpp's names
    (``blk.3.attn_q.weight``, ``blk.3.attn_q.weight.lora_a``). llama.cpp's RoPE pairs adjacent channels as Meta's does:
    no row is permuted."""
    module, _, kind = key.rpartition(".")
    suffix = kind if kind in ("weight", "bias") else f"weight.{kind}"
    parts = module.split(".")
    block = f"blk.{parts[1]}." if parts[0] == "layers" else ""
    inner = ".".join(parts[2:] if parts[0] == "layers" else parts)
    layer = next((x for x in LINEARS if x.meta == inner), None)
    name = layer.gguf if layer is not None else GGUF_OTHERS.get(inner)
    if name is None:
        raise ValueError(f"No GGUF name for tensor {key!r}")
    return f"{block}{name}.{suffix}"


# ----- the row permutation between Meta's adjacent-pair RoPE and HF's rotate-half RoPE -----

def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows per head from Meta's (pair, 2) order to HF's (2, pair) order (HF's convert script); a 1-D
    tensor (a DoRA magnitude) is one value per row."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_to_hf``."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def to_hf_layout(key: str, t: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    heads = rope_heads(key, config)
    return t if heads is None else permute_to_hf(t, heads).contiguous()
