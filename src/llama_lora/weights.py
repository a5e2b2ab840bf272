"""Read and write LLaMA checkpoints: Meta shards, HuggingFace (safetensors or .bin), llama2.c version 0.

Everything is converted to Meta's parameter names. Loading never unpickles code (``weights_only=True`` or
safetensors), reads with mmap, and places tensors with ``load_state_dict(assign=True)`` into a model built on the
meta device, so a 7B model never exists twice in memory.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LlamaConfig
from .model import Llama, init_base_tensor, rope_cache

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# Meta's model-parallel split rule (llama/model.py: Column/RowParallelLinear, ParallelEmbedding).
_SPLIT_DIM0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
               "feed_forward.w3.weight", "output.weight")
_SPLIT_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")

_HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}
# Meta module name -> HF module name of each linear layer (PEFT's target_modules use these).
HF_MODULE_NAMES = {meta.split(".")[-1]: hf.split(".")[-1] for hf, meta in _HF_LAYER_NAMES.items() if "." in hf}
HF_MODULE_NAMES["output"] = "lm_head"

WEIGHTS_HELP = (
    "LLaMA-2 weights come from Meta (https://llama.meta.com, after accepting the license) or the meta-llama "
    "repos on the HuggingFace Hub. Accepted layouts: a Meta dir (consolidated.NN.pth + params.json), "
    "an HF dir (config.json + *.safetensors or pytorch_model*.bin, sharded with an index), or a llama2.c .bin file"
)


def _split_dim(key: str) -> int | None:
    if key.endswith(_SPLIT_DIM0):
        return 0
    if key.endswith(_SPLIT_DIM1):
        return 1
    return None  # norms: replicated in every shard


# ----- permutation between Meta's adjacent-pair RoPE and HF's rotate-half RoPE -----

def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows per head from Meta's (pair, 2) order to HF's (2, pair) order (HF's convert script)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_to_hf``."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def hf_permuted_heads(meta_key: str, config: LlamaConfig) -> int | None:
    """The head count over which HF permutes this tensor's rows: q and k weights, and the LoRA B of q and k (delta W =
    B A, so B's rows are W's rows). None for every other tensor."""
    module, _, kind = meta_key.rpartition(".")
    if kind not in ("weight", "lora_b"):
        return None
    return {"attention.wq": config.n_heads, "attention.wk": config.n_kv_heads}.get(module.split(".", 2)[-1])


def to_hf_layout(meta_key: str, t: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    heads = hf_permuted_heads(meta_key, config)
    return t if heads is None else permute_to_hf(t, heads).contiguous()


def hf_key_to_meta(key: str) -> str | None:
    """HF LlamaForCausalLM name -> Meta name; None for tensors that carry no weights (rotary inv_freq)."""
    if key in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if key.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"Unexpected tensor {key!r} in a HuggingFace checkpoint: is this a LLaMA model?")


def meta_key_to_hf(key: str) -> str:
    inverse_top = {v: k for k, v in _HF_TOP_NAMES.items()}
    if key in inverse_top:
        return inverse_top[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key)
    inverse_layer = {v: k for k, v in _HF_LAYER_NAMES.items()}
    if not m or m.group(2) not in inverse_layer:
        raise ValueError(f"No HuggingFace name for tensor {key!r}")
    return f"model.layers.{m.group(1)}.{inverse_layer[m.group(2)]}.{m.group(3)}"


# ----- format detection and reading -----

def detect_format(path: str | Path) -> str:
    """'meta', 'hf' or 'llama2c' for a checkpoint dir (or a llama2.c .bin file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint not found: {path}. {WEIGHTS_HELP}")
    if path.is_file():
        if path.suffix == ".bin" and not path.name.startswith("pytorch_model"):
            return "llama2c"
        raise ValueError(f"{path}: a checkpoint file must be a llama2.c .bin; for other layouts pass the directory")
    if list(path.glob("consolidated.*.pth")):
        return "meta"
    if list(path.glob("*.safetensors")) or list(path.glob("pytorch_model*.bin")):
        return "hf"
    raise FileNotFoundError(f"{path} holds no LLaMA weights. {WEIGHTS_HELP}")


def _torch_load(path: Path) -> StateDict:
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

    def add(self, key: str, parts: list[torch.Tensor], dim: int = 0, hf_heads: int | None = None) -> None:
        self._parts[key] = (parts, dim)
        if hf_heads is not None:
            self._hf_heads[key] = hf_heads

    def shape(self, key: str) -> torch.Size:
        parts, dim = self._parts[key]
        shape = list(parts[0].shape)
        if len(parts) > 1:
            shape[dim] = sum(p.shape[dim] for p in parts)
        return torch.Size(shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        parts, dim = self._parts[key]
        if len(parts) > 1:
            return torch.cat(parts, dim=dim)
        heads = self._hf_heads.pop(key, None)
        if heads is not None:
            _permute_in_place(parts[0], heads)
        return parts[0]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the tensor (its first dimension) without reading the others."""
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
        return key in self._parts

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)


def _load_meta(path: Path) -> tuple[LazyStateDict, dict[str, str], LlamaConfig | None]:
    shards = sorted(path.glob("consolidated.*.pth"))
    numbers = [int(s.name.split(".")[1]) for s in shards]
    if numbers != list(range(len(shards))):
        raise FileNotFoundError(f"{path}: Meta shards must be consolidated.00.pth .. consolidated.{len(shards) - 1:02d}"
                                f".pth without gaps, found {[s.name for s in shards]}")
    parts = [_torch_load(s) for s in shards]
    for shard, part in zip(shards, parts):
        if set(part) != set(parts[0]):
            raise ValueError(f"{shard}: holds different tensors than {shards[0].name}; the shards are from different"
                             " checkpoints")
    sd, sources = LazyStateDict(), {}
    for key in parts[0]:
        if key == "rope.freqs":
            continue
        dim = _split_dim(key)
        sd.add(key, [parts[0][key]] if dim is None else [p[key] for p in parts], dim=dim or 0)
        sources[key] = str(shards[0] if len(parts) == 1 else path / "consolidated.*.pth")
    config = None
    if (path / "params.json").is_file():
        vocab = sd.shape("tok_embeddings.weight")[0] if "tok_embeddings.weight" in sd else None
        config = LlamaConfig.from_meta_params(path / "params.json", vocab_size=vocab)
    return sd, sources, config


def _load_hf(path: Path) -> tuple[LazyStateDict, dict[str, str], LlamaConfig | None]:
    config = LlamaConfig.from_hf_config(path / "config.json") if (path / "config.json").is_file() else None
    # The HF repos ship both formats side by side, each with its own index: take safetensors when present (no
    # pickle, memory-mapped) and consult only that format's index.
    files = sorted(path.glob("*.safetensors"))
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if not files:
        files, indexes = sorted(path.glob("pytorch_model*.bin")), sorted(path.glob("pytorch_model*.bin.index.json"))
    for index in indexes:
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ValueError(f"{index}: not a HuggingFace index (a JSON object with a weight_map)") from None
        missing = sorted(wanted - {f.name for f in files})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
    raw: StateDict = {}
    sources: dict[str, str] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for k in st.keys():
                        raw[k], sources[k] = st.get_tensor(k), str(f)
            except Exception as e:
                raise ValueError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        else:
            part = _torch_load(f)
            raw.update(part)
            sources.update({k: str(f) for k in part})
    if config is None:
        raise FileNotFoundError(f"{path}: config.json is missing; HF checkpoints need it to undo the q/k permutation")
    if config.tie_embeddings and "lm_head.weight" not in raw and "model.embed_tokens.weight" in raw:
        raw["lm_head.weight"], sources["lm_head.weight"] = raw["model.embed_tokens.weight"], sources[
            "model.embed_tokens.weight"]
    sd, meta_sources = LazyStateDict(), {}
    for k, t in raw.items():
        name = hf_key_to_meta(k)
        if name is None:
            continue
        sd.add(name, [t], hf_heads=hf_permuted_heads(name, config))
        meta_sources[name] = sources[k]
    return sd, meta_sources, config


def _permute_in_place(w: torch.Tensor, n_heads: int) -> None:
    """Undo HF's q/k permutation inside ``w`` itself. The checkpoint's mapping is private (copy-on-write), so the
    rewritten pages replace the file's pages instead of joining them: loading HF costs the memory Meta's layout does,
    not one more copy of q and k."""
    permuted = permute_from_hf(w, n_heads)
    w.copy_(permuted if permuted.data_ptr() != w.data_ptr() else permuted.clone())


def _load_llama2c(path: Path) -> tuple[LazyStateDict, dict[str, str], LlamaConfig]:
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
    kv_dim, L = n_kv_heads * config.head_dim, n_layers
    layout = [("tok_embeddings.weight", None, (abs(vocab), dim)), ("attention_norm.weight", L, (dim,)),
              ("attention.wq.weight", L, (dim, dim)), ("attention.wk.weight", L, (kv_dim, dim)),
              ("attention.wv.weight", L, (kv_dim, dim)), ("attention.wo.weight", L, (dim, dim)),
              ("ffn_norm.weight", L, (dim,)), ("feed_forward.w1.weight", L, (hidden, dim)),
              ("feed_forward.w2.weight", L, (dim, hidden)), ("feed_forward.w3.weight", L, (hidden, dim)),
              ("norm.weight", None, (dim,)), ("freq_cis_real", None, (max_seq_len, config.head_dim // 2)),
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


def load_checkpoint(path: str | Path) -> tuple[LazyStateDict, dict[str, str], LlamaConfig | None]:
    """State dict in Meta names (read lazily, see LazyStateDict), the file each tensor came from, and the config the
    checkpoint describes."""
    path = Path(path)
    fmt = detect_format(path)
    sd, sources, config = {"meta": _load_meta, "hf": _load_hf, "llama2c": _load_llama2c}[fmt](path)
    log.info("Read %s checkpoint %s: %d tensors", fmt, path, len(sd))
    return sd, sources, config


def check_state_dict(model: torch.nn.Module, sd: LazyStateDict, sources: dict[str, str], what: str = "the model"
                     ) -> None:
    """Raise ValueError naming the file, tensor and shapes for a missing, unknown or mis-shaped tensor (shapes only:
    nothing is read)."""
    expected = {k: v.shape for k, v in model.state_dict().items() if "lora_" not in k}
    missing = sorted(set(expected) - set(sd))
    if missing:
        where = next(iter(set(sources.values())), "the checkpoint")
        raise ValueError(f"{where}: missing tensor {missing[0]!r} (and {len(missing) - 1} more) needed by {what}")
    unknown = sorted(set(sd) - set(expected))
    if unknown:
        raise ValueError(f"{sources.get(unknown[0], 'checkpoint')}: unknown tensor {unknown[0]!r} "
                         f"({len(unknown)} in all) for {what}")
    for k, shape in expected.items():
        if sd.shape(k) != shape:
            raise ValueError(f"{sources.get(k, 'checkpoint')}: tensor {k!r} has shape {tuple(sd.shape(k))}, "
                             f"{what} expects {tuple(shape)}; the checkpoint is for a different model size")


_STRUCTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")


def open_checkpoint(checkpoint: str | Path, config: LlamaConfig | None = None
                    ) -> tuple[LazyStateDict, dict[str, str], LlamaConfig]:
    """The checkpoint's tensors (unread) and the config to build; with ``config`` (a preset), the checkpoint's own
    config must agree with it."""
    sd, sources, ckpt_config = load_checkpoint(checkpoint)
    if config is not None and ckpt_config is not None:
        # Head counts shape no tensor, so the shape check in check_state_dict cannot catch a wrong preset for them.
        differ = [f"{k}={getattr(ckpt_config, k)} (preset: {getattr(config, k)})" for k in _STRUCTURE
                  if getattr(ckpt_config, k) != getattr(config, k)]
        if differ:
            raise ValueError(f"{checkpoint}: the checkpoint's config has {', '.join(differ)}; choose the "
                             "model preset that matches the checkpoint")
    config = config or ckpt_config
    if config is None:
        raise ValueError(f"{checkpoint}: no params.json/config.json found; pass a model config or preset")
    return sd, sources, config


NF4_TARGETS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
               "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")


def build_model(
    config: LlamaConfig | None = None,
    checkpoint: str | Path | None = None,
    base_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    gradient_checkpointing: bool = False,
    checkpoint_layers: int | None = None,
    nf4: bool = False,
) -> Llama:
    """A ready Llama: random (seeded) when ``checkpoint`` is None, else filled from the checkpoint with no copy.

    With ``nf4`` the transformer blocks' linear weights are stored as NF4 (quant.py) and everything else in
    ``base_dtype``, the dtype the compute runs in. Each tensor is quantized as it is read, and its pages of the
    memory-mapped checkpoint are dropped, so the half-precision model never exists in memory.
    With both ``config`` and ``checkpoint`` given, the checkpoint must match the config's shapes.
    """
    from .quant import quantize

    sd = sources = None
    if checkpoint is not None:
        sd, sources, config = open_checkpoint(checkpoint, config)
    if config is None:
        raise ValueError("build_model needs a config (preset) or a checkpoint")
    with torch.device("meta"):
        model = Llama(config, gradient_checkpointing=gradient_checkpointing, checkpoint_layers=checkpoint_layers)

    def dtype_of(name: str) -> torch.dtype:
        # An NF4 base computing in fp32 (an AVX2-only CPU) keeps the embedding in half precision: only the rows it
        # looks up are cast (model.compute_dtype), which saves 0.25 GiB for 7B at no cost.
        return torch.bfloat16 if nf4 and base_dtype == torch.float32 and name == "tok_embeddings.weight" else base_dtype

    if nf4:
        model.compute_dtype = base_dtype
    tensors = {}
    if sd is None:  # random init, tensor by tensor in the order init_weights draws them
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        for name, p in model.named_parameters():
            t = torch.empty(p.shape, dtype=dtype_of(name), device=device)
            init_base_tensor(name, t, generator=generator)
            tensors[name] = quantize(t, dtype=base_dtype) if nf4 and name.endswith(NF4_TARGETS) else t
    else:
        check_state_dict(model, sd, sources, what=f"a {config.n_layers}-layer, dim-{config.dim} LLaMA")
        for k in sd:  # one tensor at a time: an mmapped tensor already in base_dtype on CPU is placed as is
            if nf4 and k.endswith(NF4_TARGETS):
                source = sd[k]
                tensors[k] = quantize(source.to(device), dtype=base_dtype)
                _drop_pages(source)
            else:
                tensors[k] = sd[k].to(device=device, dtype=dtype_of(k))
    model.load_state_dict(tensors, assign=True, strict=sd is not None)
    model.tie_weights()  # assign=True placed the shared tensor as two parameters
    return model


def _drop_pages(t: torch.Tensor) -> None:
    """Let the kernel drop the pages of a memory-mapped checkpoint tensor that has been read (Linux, CPU): its
    mapping is private and unmodified, or modified only for this read, so nothing is lost, and RSS does not grow to
    the checkpoint's size while a model is quantized from it."""
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


@torch.no_grad()
def fill_shards(model: torch.nn.Module, sd: LazyStateDict | None, seed: int | None = None) -> None:
    """Fill the local shards of a model that ``fully_shard`` split on dim 0 after it was built on the meta device
    (and ``to_empty``-ed): each rank reads only its own rows of the memory-mapped checkpoint, or, without one, draws
    the single-process random init (every full tensor in turn, same generator) and keeps its rows. LoRA weights are
    drawn as LoRALinear draws them. Device memory per rank is about 1/W of the base; no rank holds a whole tensor
    read from the checkpoint."""
    from torch.distributed.tensor import DTensor

    from .lora import init_lora_a
    from .model import init_base_tensor

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if sd is None and seed is not None else None
    base = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    lora = [(n, p) for n, m in model.named_modules() if hasattr(m, "lora_a") for n, p in
            ((f"{n}.lora_a", m.lora_a), (f"{n}.lora_b", m.lora_b))]  # in the order LoRALinear draws them
    for name, p in base + lora:
        local = p.to_local() if isinstance(p, DTensor) else p
        start = _first_local_row(p) if isinstance(p, DTensor) else 0
        stop = start + local.shape[0]
        if name.endswith("lora_b"):
            local.zero_()
        elif sd is not None and "lora_" not in name:
            local.copy_(sd.rows(name, start, stop))
        else:
            full = torch.empty(p.shape, dtype=p.dtype, device=device)
            init_lora_a(full) if name.endswith("lora_a") else init_base_tensor(name, full, generator=generator)
            local.copy_(full[start:stop])


def _first_local_row(p) -> int:
    """First row of this rank's shard of a DTensor sharded on dim 0 over a 1-D mesh (torch.chunk's split)."""
    (placement,) = p.placements
    assert placement.is_shard(0), f"expected a dim-0 shard, got {placement}"
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    return min(rank * -(-p.shape[0] // world), p.shape[0])


# ----- writing -----

def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _plain(sd: StateDict) -> StateDict:
    lora = [k for k in sd if "lora_" in k]
    if lora:
        raise ValueError(f"State dict holds LoRA tensors ({lora[0]}, ...): merge_lora(model, unload=True) first")
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_meta(sd: StateDict, config: LlamaConfig, out_dir: str | Path, n_shards: int = 1) -> Path:
    """Write consolidated.NN.pth shards (Meta's split rule) and params.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = _plain(sd)
    for i in range(n_shards):
        shard = {}
        for k, v in sd.items():
            dim = _split_dim(k)
            if dim is not None and n_shards > 1:
                if v.shape[dim] % n_shards:
                    raise ValueError(f"{k}: dimension {dim} of size {v.shape[dim]} does not split into {n_shards} "
                                     "shards")
                v = v.chunk(n_shards, dim=dim)[i].clone()  # a view would save its whole storage
            shard[k] = v
        _atomic_torch_save(shard, out_dir / f"consolidated.{i:02d}.pth")
    (out_dir / "params.json").write_text(json.dumps(config.to_meta_params(), indent=2))
    return out_dir


def save_hf(sd: StateDict, config: LlamaConfig, out_dir: str | Path, max_shard_bytes: int | None = None,
            safetensors: bool = True) -> Path:
    """Write HF LlamaForCausalLM weights (permuted q/k), sharded with an index when over max_shard_bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = _plain(sd)
    if config.tie_embeddings:
        sd.pop("output.weight", None)  # HF's tie_word_embeddings: written once, as the embedding
    shards: list[list[str]] = [[]]  # Meta names per shard, in order
    size = 0
    for k, v in sd.items():
        if max_shard_bytes and shards[-1] and size + v.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += v.nbytes
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    names = [f"{stem}.{ext}"] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        # One shard at a time: the permuted q/k copies of this shard are all that is allocated.
        shard = {meta_key_to_hf(k): to_hf_layout(k, sd[k], config) for k in keys}
        tmp = out_dir / (name + ".tmp")
        if safetensors:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(shard, tmp)
        os.replace(tmp, out_dir / name)
        del shard
    if len(shards) > 1:
        weight_map = {meta_key_to_hf(k): name for name, keys in zip(names, shards) for k in keys}
        index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}
        (out_dir / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
    return out_dir


def save_llama2c(sd: StateDict, config: LlamaConfig, path: str | Path) -> Path:
    """Write llama2.c's version-0 .bin: a 7-int header, then fp32 weights grouped by kind across layers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = _plain(sd)
    shared = torch.equal(sd["tok_embeddings.weight"], sd["output.weight"])
    vocab = config.vocab_size if shared else -config.vocab_size
    header = struct.pack("7i", config.dim, config.hidden_dim, config.n_layers, config.n_heads, config.n_kv_heads,
                         vocab, config.max_seq_len)
    per_layer = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    rope = rope_cache(config.head_dim, config.max_seq_len, config.rope_theta)
    tensors = [sd["tok_embeddings.weight"]]
    tensors += [sd[f"layers.{i}.{name}.weight"] for name in per_layer for i in range(config.n_layers)]
    tensors += [sd["norm.weight"], rope[..., 0], rope[..., 1]]
    if not shared:
        tensors.append(sd["output.weight"])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for t in tensors:
            t = t.detach().float().contiguous()
            f.write(ctypes.string_at(t.data_ptr(), t.numel() * 4))
    os.replace(tmp, path)
    return path
