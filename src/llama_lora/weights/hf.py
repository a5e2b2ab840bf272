"""HuggingFace LlamaForCausalLM checkpoints: safetensors or .bin, sharded with an index; names mapped to Meta's and
the q/k rows un-permuted (layout.py) as they are read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import LlamaConfig
from ..layout import BLOCK_LINEARS, BLOCK_NORMS, LINEARS, TOP, rope_heads, to_hf_layout
from .tensors import LazyStateDict, StateDict, plain, publish, torch_load

# Meta module name -> HF module name: within a block, and at the top.
_BLOCK_NAMES = {**{layer.meta: layer.hf for layer in BLOCK_LINEARS}, **BLOCK_NORMS}
_TOP_NAMES = {**{meta: hf for meta, (hf, _) in TOP.items()}, **{x.meta: x.hf for x in LINEARS if not x.in_block}}
_FROM_HF_BLOCK = {hf: meta for meta, hf in _BLOCK_NAMES.items()}
_FROM_HF_TOP = {hf: meta for meta, hf in _TOP_NAMES.items()}


def hf_key_to_meta(key: str) -> str | None:
    """HF LlamaForCausalLM name -> Meta name; None for tensors that carry no weights (rotary inv_freq)."""
    module, _, kind = key.rpartition(".")
    if module in _FROM_HF_TOP:
        return f"{_FROM_HF_TOP[module]}.{kind}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m and m.group(2) in _FROM_HF_BLOCK:
        return f"layers.{m.group(1)}.{_FROM_HF_BLOCK[m.group(2)]}.{m.group(3)}"
    if key.endswith("rotary_emb.inv_freq"):
        return None
    raise ValueError(f"Unexpected tensor {key!r} in a HuggingFace checkpoint: is this a LLaMA model?")


def meta_key_to_hf(key: str) -> str:
    module, _, kind = key.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{kind}"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if not m or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"No HuggingFace name for tensor {key!r}")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def load_hf(path: Path) -> tuple[LazyStateDict, dict[str, str], LlamaConfig | None]:
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
            part = torch_load(f)
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
        sd.add(name, [t], hf_heads=rope_heads(name, config))
        meta_sources[name] = sources[k]
    return sd, meta_sources, config


def save_hf(sd: StateDict, config: LlamaConfig, out_dir: str | Path, max_shard_bytes: int | None = None,
            safetensors: bool = True) -> Path:
    """Write HF LlamaForCausalLM weights (permuted q/k), sharded with an index when over max_shard_bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = plain(sd)
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
        publish(tmp, out_dir / name)
        del shard
    if len(shards) > 1:
        weight_map = {meta_key_to_hf(k): name for name, keys in zip(names, shards) for k in keys}
        index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}
        (out_dir / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_config(dtype), indent=2))
    return out_dir
