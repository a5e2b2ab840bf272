"""LLaMA-2 in plain PyTorch, with Meta's parameter names and numerics.

Reference: Meta's llama/model.py. Differences: attention goes through ``F.scaled_dot_product_attention``
with grouped-query heads handled by SDPA, RoPE uses real cos/sin arithmetic on adjacent channel pairs
(numerically Meta's complex multiply), and the KV cache is optional so the same module trains and generates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LlamaConfig
from .plan import RunPlan
from .quant import keep_dequantized


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as Meta does), cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """RoPE's frequency of each channel pair, fp32: theta^(-2i / head_dim)."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)[: head_dim // 2] / head_dim
    return 1.0 / (theta**exponents)


def llama3_scaled(freqs: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                  original_max_seq_len: int) -> torch.Tensor:
    """Llama 3.1's RoPE frequency scaling (Meta's ``apply_scaling``, HF's ``rope_type: llama3``): wavelengths
    shorter than original / high_freq_factor stay, those longer than original / low_freq_factor are divided by
    ``factor``, and the band between is interpolated smoothly."""
    wavelen = 2 * math.pi / freqs
    low_wavelen, high_wavelen = original_max_seq_len / low_freq_factor, original_max_seq_len / high_freq_factor
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * freqs / factor + smooth * freqs
    return torch.where(wavelen < high_wavelen, freqs, torch.where(wavelen > low_wavelen, freqs / factor, mid))


def rope_cache(head_dim: int, max_seq_len: int, theta: float = 10000.0, device=None,
               scaling: dict[str, float] | None = None) -> torch.Tensor:
    """cos and sin of the rotation angles, fp32: (max_seq_len, head_dim // 2, 2). ``scaling``: Llama 3.1's
    (``LlamaConfig.rope_scaling``), or None."""
    freqs = rope_frequencies(head_dim, theta, device)
    if scaling is not None:
        freqs = llama3_scaled(freqs, **scaling)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def _rotate(x: torch.Tensor, rope: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    B, T, H, D = x.shape
    xp = x.float().reshape(B, T, H, D // 2, 2)
    rope = rope.unsqueeze(-3)  # (T, 1, D // 2, 2), or (B, T, 1, D // 2, 2) with per-example positions
    cos, sin = rope[..., 0], rope[..., 1]
    if inverse:
        sin = -sin
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(3).type_as(x)


class _RoPE(torch.autograd.Function):
    """The rotation is orthogonal, so its backward is the inverse rotation: nothing but the table is saved
    (autograd would keep several fp32 copies of q and k per layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rope)
        return _rotate(x, rope)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rope,) = ctx.saved_tensors
        return _rotate(grad, rope, inverse=True), None


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x: (B, T, H, D) by rope: (T, D // 2, 2) or (B, T, D // 2, 2),
    in fp32."""
    return _RoPE.apply(x, rope)


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v: (B, Hkv, T, D) at positions start..start+T; return the cache up to start+T."""
        B, _, T, _ = k.shape
        self.k[:B, :, start : start + T] = k
        self.v[:B, :, start : start + T] = v
        return self.k[:B, :, : start + T], self.v[:B, :, : start + T]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        kv_dim, bias = self.n_kv_heads * self.head_dim, config.attention_bias  # Qwen2's q/k/v biases
        self.wq = nn.Linear(config.dim, config.q_dim, bias=bias)
        self.wk = nn.Linear(config.dim, kv_dim, bias=bias)
        self.wv = nn.Linear(config.dim, kv_dim, bias=bias)
        self.wo = nn.Linear(config.q_dim, config.dim, bias=False)
        # Qwen3: each head's query and key normalised (one weight of head_dim shared by the heads) before RoPE
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int | None = None,
                segments: Segments | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D), k/v with Hkv heads
        gqa = self.n_kv_heads != self.n_heads
        if start_pos is None and segments is not None:  # packed rows: causal within each example
            y = segments.attend(q, k, v, gqa)
        elif start_pos is None:  # training / full forward: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            assert self.kv_cache is not None, "call Llama.setup_cache() before decoding with start_pos"
            k, v = self.kv_cache.update(start_pos, k, v)  # (B, Hkv, start_pos + T, D)
            # Query i (absolute position start_pos + i) sees keys 0..start_pos + i.
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int | None = None,
                segments: Segments | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, start_pos, segments)
        return h + self.feed_forward(self.ffn_norm(h))


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its segment: (B, T), restarting at 0 where the segment id changes."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention within segments: (B, 1, T, T), True where query t may attend to key s."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]


try:  # CUDA flash attention over variable-length sequences (torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None


class Segments:
    """The examples of packed rows, for attention that stays within each (``segment_ids``: (B, T), examples numbered
    from 1, 0 for padding). Three ways, one result:

    - ``spans``: one causal attention per example, on its own slice of the row. On a CPU the cost is that of the
      examples alone (a masked attention over whole rows does (row length / example length) times the work).
    - ``varlen``: CUDA's variable-length flash attention over all examples at once (fp16/bf16).
    - ``mask``: attention over whole rows with a block-diagonal causal mask (anything else).

    Padding positions get zeros: no target sits there and no token attends to them."""

    def __init__(self, segment_ids: torch.Tensor, way: str = "spans") -> None:
        self.segment_ids, self.way = segment_ids, way  # the run plan's packed_attention
        B, T = segment_ids.shape
        ids = segment_ids.tolist()
        self.spans: list[list[tuple[int, int]]] = []  # per row: (start, end) of each example
        for row in ids:
            spans, start = [], 0
            for t in range(1, T + 1):
                if t == T or row[t] != row[t - 1]:
                    if row[start] != 0:
                        spans.append((start, t))
                    start = t
            self.spans.append(spans)
        # The B * T positions of all rows end to end, as consecutive pieces: each example, and each stretch of padding
        self.pieces, self.real, end = [], [], 0
        for b, spans in enumerate(self.spans):
            for s, e in [*spans, (T, T)]:
                if b * T + s > end:  # padding before this example (or at the row's end)
                    self.pieces.append(b * T + s - end), self.real.append(False)
                if e > s:
                    self.pieces.append(e - s), self.real.append(True)
                end = b * T + e
        self._mask: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D)."""
        B, H, T, D = q.shape
        way = self.way
        if way == "mask":
            if self._mask is None:
                self._mask = segment_mask(self.segment_ids)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask, enable_gqa=gqa)
        if way == "varlen":
            keep = self.segment_ids.flatten() != 0
            lengths = torch.tensor([e - s for spans in self.spans for s, e in spans], device=q.device)
            cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=q.device)
            cu[1:] = lengths.cumsum(0)
            longest = int(lengths.max())
            flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D)[keep] for t in (q, k, v)]  # (tokens, H, D)
            y = varlen_attn(*flat, cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=gqa)
            out = q.new_zeros(B * T, H, D).index_put((keep.nonzero().squeeze(1),), y)
            return out.view(B, T, H, D).transpose(1, 2)
        # All rows end to end along the time axis, cut into examples and padding by one split (whose backward is one
        # cat: slicing each example out would allocate and fill a whole-size gradient per example). (B, H, T, D) is a
        # view of the projections' (B, T, H, D), so the rows join without a copy.
        pieces = [t.transpose(1, 2).reshape(1, B * T, t.shape[1], D).split(self.pieces, dim=1) for t in (q, k, v)]
        out = [F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                              is_causal=True, enable_gqa=gqa).transpose(1, 2) if real
               else qp.new_zeros(qp.shape) for qp, kp, vp, real in zip(*pieces, self.real)]
        return torch.cat(out, dim=1).view(B, T, H, D).transpose(1, 2)


def _recompute_keeps_dequantized():
    """checkpoint's context_fn: nothing in the forward; in the recomputation, NF4 weights stay dequantized for the
    backward that follows at once (quant.keep_dequantized)."""
    return contextlib.nullcontext(), keep_dequantized()


def check_checkpoint_layers(value: int | None, n_layers: int, key: str = "checkpoint_layers") -> None:
    if value is not None and not 0 <= value <= n_layers:
        raise ValueError(f"{key} must be between 0 and n_layers={n_layers}, got {value}")


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, gradient_checkpointing: bool = False,
                 checkpoint_layers: int | None = None, plan: RunPlan | None = None) -> None:
        """``gradient_checkpointing`` recomputes blocks' activations in backward: all blocks, or only the first
        ``checkpoint_layers`` of them (the rest keep their activations: less recomputation for some more memory).
        ``plan`` says what activations, the KV cache and packed attention compute in (default: fp32 on a CPU);
        ``weights.build_model`` stores the weights as it says."""
        super().__init__()
        self.config = config
        self.plan = plan or RunPlan()
        self.gradient_checkpointing = gradient_checkpointing
        check_checkpoint_layers(checkpoint_layers, config.n_layers)
        self.checkpoint_layers = config.n_layers if checkpoint_layers is None else checkpoint_layers
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        # RoPE table, fp32. A plain attribute, not a buffer: model.to(bf16) must not round it, checkpoints
        # must not carry it, and meta-device construction must not leave it empty.
        self._rope: torch.Tensor | None = None

    def tie_weights(self) -> None:
        """With ``config.tie_embeddings``, make the output layer's weight the embedding's (one parameter)."""
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def rope(self, device: torch.device) -> torch.Tensor:
        if self._rope is None or self._rope.device != device:
            c = self.config
            self._rope = rope_cache(c.head_dim, c.max_seq_len, c.rope_theta, device=device, scaling=c.rope_scaling)
        return self._rope

    def compile_blocks(self) -> None:
        """torch.compile each block in place (parameter names unchanged), so that one compiled graph serves all."""
        for layer in self.layers:
            layer.compile()

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for tests, the demo and benchmarks (real runs load a checkpoint)."""
        for name, p in self.named_parameters():
            if "lora_" not in name:
                init_base_tensor(name, p, std, generator)

    def forward(self, tokens: torch.Tensor, start_pos: int | None = None, return_hidden: bool = False,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab); with ``return_hidden``, the final-norm hidden states (B, T, dim) instead, for a loss
        that applies the output layer itself. With start_pos set, reads and extends the KV cache (generation).

        ``segment_ids`` (B, T) marks packed rows: several examples in one row, numbered 1, 2, ... (0: padding). Each
        token attends only within its example, and RoPE positions restart at 0 for each one, so that an example
        computes what it computes alone."""
        B, T = tokens.shape
        offset = 0 if start_pos is None else start_pos
        if offset + T > self.config.max_seq_len:
            raise ValueError(
                f"Sequence of {offset + T} tokens exceeds max_seq_len={self.config.max_seq_len}; "
                "shorten the input or raise max_seq_len"
            )
        rope, segments = self.rope(tokens.device)[offset : offset + T], None
        if segment_ids is not None:
            rope = rope[segment_positions(segment_ids)]  # (B, T, D/2, 2)
            segments = Segments(segment_ids, self.plan.packed_attention)
        # (B, T, dim). An embedding stored in another dtype (an NF4 base computing in fp32 keeps it in bf16) is cast
        # row by row, as looked up.
        h = self.tok_embeddings(tokens).to(self.plan.activation_dtype)
        for i, layer in enumerate(self.layers):
            if (self.gradient_checkpointing and i < self.checkpoint_layers and self.training
                    and torch.is_grad_enabled()):
                h = checkpoint(layer, h, rope, start_pos, segments, use_reentrant=False,
                               context_fn=_recompute_keeps_dequantized)
            else:
                h = layer(h, rope, start_pos, segments)
        h = self.norm(h)
        return h if return_hidden else self.output(h)

    # ----- generation -----

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None) -> None:
        max_seq_len = max_seq_len or self.config.max_seq_len
        device = self.tok_embeddings.weight.device
        for layer in self.layers:  # keys and values come out in the plan's compute dtype, as the queries do
            attn = layer.attention
            attn.kv_cache = KVCache(batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim, self.plan.kv_cache_dtype,
                                    device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    @torch.no_grad()
    def generate_stream(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.6,
        top_k: int | None = None,
        top_p: float | None = 0.9,
        eos_id: int | None = 2,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield new token ids one at a time for one prompt; temperature 0 means greedy. Stops at EOS (not yielded).
        ``top_k`` keeps the k likeliest tokens (None: all), ``top_p`` the smallest set holding that much probability
        (None or 1: all)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if not prompt:
            raise ValueError("generate: the prompt is empty; give at least one token (e.g. BOS)")
        total = min(len(prompt) + max_new_tokens, self.config.max_seq_len)
        if len(prompt) >= total:
            raise ValueError(
                f"generate: the prompt has {len(prompt)} tokens, the context holds {self.config.max_seq_len}; "
                "shorten the prompt"
            )
        was_training = self.training
        self.eval()
        device = self.tok_embeddings.weight.device
        tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)

        def last_logits(x: torch.Tensor, start_pos: int | None) -> torch.Tensor:
            with self.plan.autocast_context():  # around each forward only: the caller runs between the yields
                return self(x, start_pos=start_pos)[:, -1]

        try:
            if use_cache:
                self.setup_cache(1, total)
            logits = last_logits(tokens, 0 if use_cache else None)
            for pos in range(len(prompt), total):
                next_id = sample(logits.float(), temperature, top_k, top_p, generator)
                if eos_id is not None and next_id == eos_id:
                    return
                yield next_id
                if pos + 1 == total:
                    return
                step = torch.tensor([[next_id]], device=device)
                if use_cache:
                    logits = last_logits(step, pos)
                else:
                    tokens = torch.cat([tokens, step], dim=1)
                    logits = last_logits(tokens, None)
        finally:
            if use_cache:
                self.clear_cache()
            self.train(was_training)

    def generate(self, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
        return list(self.generate_stream(prompt, max_new_tokens, **kwargs))


@torch.no_grad()
def init_base_tensor(name: str, t: torch.Tensor, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """The random init of one base tensor: norms at one, everything else N(0, std), drawn in fp32 and cast, so that
    a seed gives the same weights in every dtype (half-precision normal_ kernels draw differently across versions)."""
    if name.endswith("norm.weight"):
        t.fill_(1.0)
    elif t.dtype == torch.float32:
        t.normal_(mean=0.0, std=std, generator=generator)
    else:
        t.copy_(torch.empty(t.shape, device=t.device).normal_(mean=0.0, std=std, generator=generator))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling settings that mean nothing (a negative temperature, a nucleus of no mass), in one line."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, or null for no top-k filtering, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], or null for no nucleus filtering, got {top_p}")


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None = None) -> int:
    """Draw one token from logits (1, vocab): temperature, then top-k, then nucleus (top-p) filtering (the defaults
    are ``Llama.generate_stream``'s)."""
    if temperature <= 0:
        return int(logits.argmax(dim=-1).item())
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (Meta's sample_top_p); the top token always stays.
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())
