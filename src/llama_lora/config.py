"""LLaMA architecture settings: one dataclass, named presets, Meta and HF config readers (the dtypes a run uses are
the run plan's: plan.py)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # Meta's FFN rounding
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # None: derived from dim by Meta's rule, see __post_init__
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False  # the output layer is the embedding matrix (llama2.c's, Llama 3.2 1B/3B)
    # Llama 3.1's RoPE frequency scaling (``model.llama3_scaled``): factor, low_freq_factor, high_freq_factor,
    # original_max_seq_len; None: plain RoPE.
    rope_scaling: dict[str, float] | None = None
    # Mistral v0.1's sliding-window attention (None: full attention, as Mistral v0.3 and every Llama): a context
    # within the window is full attention, which is what this model computes; a longer one is refused.
    sliding_window: int | None = None
    # Qwen2 and Qwen2.5: biases on the query, key and value projections (not the output's, nor the MLP's).
    attention_bias: bool = False
    # Qwen3: an RMSNorm over each head's query and key (weights of head_dim), before RoPE.
    qk_norm: bool = False
    # Each head's width; None: dim / n_heads (Llama, Mistral, Qwen2). Qwen3 gives it (128), the queries then being
    # n_heads * head_dim wide, not dim.
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(
                f"LlamaConfig: n_heads={self.n_heads} must divide dim={self.dim}; pick a divisor of dim, or give "
                "head_dim"
            )
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim <= 0:
            raise ValueError(f"LlamaConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
                "(each key/value head serves a whole group of query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig: head_dim = {self.head_dim} must be even for rotary embeddings"
            )
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(f"LlamaConfig.ffn_dim_multiplier must be > 0 or None, got {self.ffn_dim_multiplier}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("LlamaConfig: norm_eps and rope_theta must be > 0")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)  # its own: presets share theirs
            if set(self.rope_scaling) != set(LLAMA3_ROPE) or not all(
                    isinstance(v, int | float) and v > 0 for v in self.rope_scaling.values()):
                raise ValueError(f"LlamaConfig.rope_scaling needs positive {', '.join(LLAMA3_ROPE)}; got "
                                 f"{self.rope_scaling}")
            if self.rope_scaling["high_freq_factor"] <= self.rope_scaling["low_freq_factor"]:
                raise ValueError("LlamaConfig.rope_scaling: high_freq_factor must exceed low_freq_factor")
        if self.sliding_window is not None and self.max_seq_len > self.sliding_window:
            raise ValueError(f"LlamaConfig: attention over a sliding window of {self.sliding_window} tokens is not "
                             "implemented here; within the window it is full attention: set data.max_seq_len to at "
                             f"most {self.sliding_window}, not {self.max_seq_len}")
        if self.hidden_dim is None:
            # Meta's rule (llama/model.py FeedForward): 2/3 of 4*dim for SwiGLU, scaled, rounded up to multiple_of.
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        elif self.hidden_dim <= 0:
            raise ValueError(f"LlamaConfig.hidden_dim must be positive or None, got {self.hidden_dim}")

    @property
    def family(self) -> str:
        """The HF model type these switches make (decided here once: the HF config, the GGUF architecture and RoPE's
        channel order in it read this): qwen3 (q/k norms), qwen2 (q/k/v biases), mistral (a sliding window), or
        llama."""
        if self.qk_norm:
            return "qwen3"
        if self.attention_bias:
            return "qwen2"
        return "mistral" if self.sliding_window is not None else "llama"

    @property
    def q_dim(self) -> int:
        """The queries' width (wq's rows, wo's columns): n_heads * head_dim."""
        return self.n_heads * self.head_dim

    @property
    def n_params(self) -> int:
        """Parameter count of the base model, computed from the shapes alone."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.dim * (2 * self.q_dim + 2 * kv_dim)
        attention += (self.q_dim + 2 * kv_dim) * self.attention_bias + 2 * self.head_dim * self.qk_norm
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attention + ffn + 2 * self.dim
        embeddings = (1 if self.tie_embeddings else 2) * self.vocab_size * self.dim
        return self.n_layers * per_layer + embeddings + self.dim

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_meta_params(cls, path: str | Path, vocab_size: int | None = None) -> LlamaConfig:
        """Read a Meta ``params.json``. Meta ships ``vocab_size: -1`` (taken from the tokenizer); pass the real one."""
        params = _read_json(path)
        known = {f.name for f in dataclasses.fields(cls)}
        meta_rope = {"use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor"}
        unknown = sorted(set(params) - known - meta_rope - {"max_batch_size"})
        if unknown:
            raise ValueError(f"{path}: {', '.join(unknown)} not implemented here; this is not a LLaMA model this "
                             "project computes exactly")
        kwargs = {k: v for k, v in params.items() if k in known}
        if params.get("use_scaled_rope") and kwargs.get("rope_scaling") is None:
            # Meta's reference (llama-models, llama3/model.py apply_scaling): factor 8, 1 and 4, original 8192
            kwargs["rope_scaling"] = {"factor": float(params.get("rope_scaling_factor", 8.0)), "low_freq_factor": 1.0,
                                      "high_freq_factor": float(params.get("rope_high_freq_factor", 4.0)),
                                      "original_max_seq_len": 8192}
        if vocab_size is not None:
            kwargs["vocab_size"] = vocab_size
        elif kwargs.get("vocab_size", -1) <= 0:
            kwargs["vocab_size"] = 32000  # every LLaMA-2 size uses the same 32000-piece tokenizer
        return cls(**kwargs)

    @classmethod
    def from_hf_config(cls, path: str | Path) -> LlamaConfig:
        """Read a HuggingFace ``config.json`` of a Llama, Mistral, Qwen2 (2.5) or Qwen3 checkpoint."""
        cfg = _read_json(path)
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{path}: not a LLaMA config.json, missing {', '.join(missing)}")
        model_type = cfg.get("model_type", "llama")
        # Llama's and Qwen3's attention_bias puts a bias on the output projection too, which no released one has
        unsupported = {"model_type": model_type not in HF_MODEL_TYPES,
                       "attention_bias": bool(cfg.get("attention_bias")), "mlp_bias": bool(cfg.get("mlp_bias")),
                       "hidden_act": cfg.get("hidden_act", "silu") != "silu",
                       "use_mrope": bool(cfg.get("use_mrope"))}
        refused = [f"{k}: {cfg.get(k, 'llama')!r}" for k, bad in unsupported.items() if bad]
        if refused:
            raise ValueError(f"{path}: {'; '.join(refused)} is not implemented here ({', '.join(HF_MODEL_TYPES)} "
                             "with SiLU and no output or MLP biases)")
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        context = cfg.get("max_position_embeddings", 4096)
        # transformers 5 keeps theta and the scaling in rope_parameters; 4.x has rope_theta and rope_scaling.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"{path}: rope_type {kind!r} is not implemented here (default and llama3 are)")
        scaling = None if kind == "default" else {
            "factor": float(rope["factor"]), "low_freq_factor": float(rope["low_freq_factor"]),
            "high_freq_factor": float(rope["high_freq_factor"]),
            "original_max_seq_len": int(rope["original_max_position_embeddings"])}
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            max_seq_len=min(context, window) if window else context,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            sliding_window=window or None,
            attention_bias=model_type == "qwen2",  # Qwen2's q/k/v biases are its architecture, not a setting
            qk_norm=model_type == "qwen3",
            head_dim=cfg.get("head_dim"),
        )

    def to_meta_params(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "hidden_dim": self.hidden_dim,  # not in Meta's files; kept so that explicit FFN sizes round-trip
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
            "tie_embeddings": self.tie_embeddings,  # not Meta's either: llama2.c models converted to this layout
            # nor these: Qwen's switches and head width, where they are not Llama's, so that a Qwen base round-trips
            **{k: getattr(self, k) for k in ("attention_bias", "qk_norm", "sliding_window") if getattr(self, k)},
            **({"head_dim": self.head_dim} if self.head_dim != self.dim // self.n_heads else {}),
            # Meta's flag (its reference then scales as use_scaled_rope says), and the exact settings, read back first
            **({"use_scaled_rope": True, "rope_scaling_factor": self.rope_scaling["factor"],
                "rope_high_freq_factor": self.rope_scaling["high_freq_factor"], "rope_scaling": self.rope_scaling}
               if self.rope_scaling else {}),
        }

    def to_hf_config(self, dtype: Any) -> dict[str, Any]:
        """HF's config.json, with ``dtype`` (a torch dtype or its name) that of the weights written beside it: under
        "dtype", which transformers reads since 4.56, and "torch_dtype", which older versions read (both, so that
        ``torch_dtype="auto"`` keeps the written dtype in either)."""
        dtype = str(dtype).removeprefix("torch.")
        family = self.family
        return {
            "architectures": [HF_ARCHITECTURES[family]],
            "model_type": family,
            # transformers' Llama has no window (Mistral's class keeps it); Qwen's read use_sliding_window
            "sliding_window": self.sliding_window,
            **({"use_sliding_window": False} if family.startswith("qwen") else {}),
            "head_dim": self.head_dim,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta, **self._hf_rope_scaling()},
            "rope_theta": self.rope_theta,
            "rope_scaling": {"rope_type": "llama3", **self._hf_rope_scaling()} if self.rope_scaling else None,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "dtype": dtype,
            "torch_dtype": dtype,
        }


    def _hf_rope_scaling(self) -> dict[str, Any]:
        if self.rope_scaling is None:
            return {}
        r = self.rope_scaling
        return {"rope_type": "llama3", "factor": r["factor"], "low_freq_factor": r["low_freq_factor"],
                "high_freq_factor": r["high_freq_factor"],
                "original_max_position_embeddings": int(r["original_max_seq_len"])}


LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")


def _read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def _llama3_rope(factor: float) -> dict[str, float]:
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}


# HF config.json model types read here, with the class of each: Llama; Mistral (Llama's layers and names, a 32,768
# vocabulary in v0.3, and in v0.1 a sliding window, see LlamaConfig.sliding_window); Qwen2 (2.5: q/k/v biases) and
# Qwen3 (q/k norms, head_dim given). LlamaConfig.family says which one a config is.
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}
HF_MODEL_TYPES = tuple(HF_ARCHITECTURES)

PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, ffn_dim_multiplier=1.3,
                       multiple_of=4096),
    # Llama 3.1 and 3.2, from Meta's original/params.json of each (dims, ffn_dim_multiplier, multiple_of, heads,
    # rope_theta 500000, use_scaled_rope) and vocab 128256; the scaling settings of their HF config.json (3.1:
    # factor 8, 3.2: factor 32; Meta's reference code applies 8 to both). Context 131072.
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.3,
                        multiple_of=1024, rope_theta=500000.0, max_seq_len=131072, rope_scaling=_llama3_rope(8.0)),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.3,
                         multiple_of=4096, rope_theta=500000.0, max_seq_len=131072, rope_scaling=_llama3_rope(8.0)),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256,
                          ffn_dim_multiplier=1.2, multiple_of=4096, rope_theta=500000.0, max_seq_len=131072,
                          rope_scaling=_llama3_rope(8.0)),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5,
                        multiple_of=256, rope_theta=500000.0, max_seq_len=131072, rope_scaling=_llama3_rope(32.0),
                        tie_embeddings=True),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.0,
                        multiple_of=256, rope_theta=500000.0, max_seq_len=131072, rope_scaling=_llama3_rope(32.0),
                        tie_embeddings=True),
    # Mistral 7B v0.3 (its HF config.json: 32,768 vocabulary, GQA 32/8, ffn 14336, theta 1e6, no sliding window).
    "mistral-7b-v0.3": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32768, hidden_dim=14336,
                            rope_theta=1000000.0, max_seq_len=32768),
    # Qwen2.5 (their HF config.json: q/k/v biases, theta 1e6, 151,936 rows of embedding (152,064 in 7B) for a
    # 151,665-token tokenizer; 0.5B and 1.5B tie the output to the embedding) and Qwen3 (q/k norms, head_dim 128,
    # theta 1e6; tied up to 4B). Context: their max_position_embeddings.
    "qwen2.5-0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, vocab_size=151936, hidden_dim=4864,
                         rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True, attention_bias=True,
                         norm_eps=1e-6),
    "qwen2.5-1.5b": dict(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, vocab_size=151936, hidden_dim=8960,
                         rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True, attention_bias=True,
                         norm_eps=1e-6),
    "qwen2.5-7b": dict(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=152064, hidden_dim=18944,
                       rope_theta=1000000.0, max_seq_len=32768, attention_bias=True, norm_eps=1e-6),
    "qwen3-0.6b": dict(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, vocab_size=151936,
                       hidden_dim=3072, rope_theta=1000000.0, max_seq_len=40960, tie_embeddings=True, qk_norm=True,
                       norm_eps=1e-6),
    "qwen3-1.7b": dict(dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, vocab_size=151936,
                       hidden_dim=6144, rope_theta=1000000.0, max_seq_len=40960, tie_embeddings=True, qk_norm=True,
                       norm_eps=1e-6),
    "qwen3-4b": dict(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=151936,
                     hidden_dim=9728, rope_theta=1000000.0, max_seq_len=40960, tie_embeddings=True, qk_norm=True,
                     norm_eps=1e-6),
    "qwen3-8b": dict(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=151936,
                     hidden_dim=12288, rope_theta=1000000.0, max_seq_len=40960, qk_norm=True, norm_eps=1e-6),
    # The benchmark shape shared with LitGPT/torchtune comparisons: dim 512, 8 layers, ffn 1376.
    "small": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, hidden_dim=1376, max_seq_len=2048),
    # Embedded demo: 2M parameters (learns the synthetic world's facts in two minutes on 2 CPU cores), vocab of the
    # demo's own SentencePiece tokenizer.
    "demo": dict(dim=192, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=1024, max_seq_len=512),
    # Unit tests: grouped-query attention on, everything tiny.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=176, max_seq_len=128),
}
