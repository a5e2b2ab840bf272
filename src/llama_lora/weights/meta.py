"""Meta's checkpoint layout: consolidated.NN.pth shards (split by Meta's model-parallel rule, layout.py) and
params.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import LlamaConfig
from ..layout import split_dim
from .tensors import LazyStateDict, StateDict, atomic_torch_save, plain, torch_load


def load_meta(path: Path) -> tuple[LazyStateDict, dict[str, str], LlamaConfig | None]:
    shards = sorted(path.glob("consolidated.*.pth"))
    numbers = [int(s.name.split(".")[1]) for s in shards]
    if numbers != list(range(len(shards))):
        raise FileNotFoundError(f"{path}: Meta shards must be consolidated.00.pth .. consolidated.{len(shards) - 1:02d}"
                                f".pth without gaps, found {[s.name for s in shards]}")
    parts = [torch_load(s) for s in shards]
    for shard, part in zip(shards, parts):
        if set(part) != set(parts[0]):
            raise ValueError(f"{shard}: holds different tensors than {shards[0].name}; the shards are from different"
                             " checkpoints")
    sd, sources = LazyStateDict(), {}
    for key in parts[0]:
        if key == "rope.freqs":
            continue
        dim = split_dim(key)
        sd.add(key, [parts[0][key]] if dim is None else [p[key] for p in parts], dim=dim or 0)
        sources[key] = str(shards[0] if len(parts) == 1 else path / "consolidated.*.pth")
    config = None
    if (path / "params.json").is_file():
        vocab = sd.shape("tok_embeddings.weight")[0] if "tok_embeddings.weight" in sd else None
        config = LlamaConfig.from_meta_params(path / "params.json", vocab_size=vocab)
    if "output.weight" not in sd and "tok_embeddings.weight" in sd:
        # Llama 3.2 1B/3B: Meta's file holds the embedding only, which is also the output layer (as llama2.c's)
        sd.add("output.weight", [sd["tok_embeddings.weight"]])
        sources["output.weight"] = sources["tok_embeddings.weight"] + " (tied: the embedding)"
        if config is not None:
            config = dataclasses.replace(config, tie_embeddings=True)
    return sd, sources, config


def save_meta(sd: StateDict, config: LlamaConfig, out_dir: str | Path, n_shards: int = 1) -> Path:
    """Write consolidated.NN.pth shards (Meta's split rule) and params.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = plain(sd)
    for i in range(n_shards):
        shard = {}
        for k, v in sd.items():
            dim = split_dim(k)
            if dim is not None and n_shards > 1:
                if v.shape[dim] % n_shards:
                    raise ValueError(f"{k}: dimension {dim} of size {v.shape[dim]} does not split into {n_shards} "
                                     "shards")
                v = v.chunk(n_shards, dim=dim)[i].clone()  # a view would save its whole storage
            shard[k] = v
        atomic_torch_save(shard, out_dir / f"consolidated.{i:02d}.pth")
    (out_dir / "params.json").write_text(json.dumps(config.to_meta_params(), indent=2))
    return out_dir
