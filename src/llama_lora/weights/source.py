"""Where base weights come from: the format of a checkpoint folder (Meta, HF or llama2.c), its tensors by Meta name,
the config it describes, and the checks that they fit the model (shapes only: nothing is read)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..config import LlamaConfig
from .gguf import is_gguf_file, load_gguf
from .hf import load_hf
from .llama2c import load_llama2c
from .meta import load_meta
from .tensors import LazyStateDict

log = logging.getLogger(__name__)

WEIGHTS_HELP = (
    "LLaMA-2 weights come from Meta (https://llama.meta.com, after accepting the license) or the meta-llama "
    "repos on the HuggingFace Hub. Accepted layouts: a Meta dir (consolidated.NN.pth + params.json), "
    "an HF dir (config.json + *.safetensors or pytorch_model*.bin, sharded with an index), or a llama2.c .bin file"
)


def detect_format(path: str | Path) -> str:
    """'meta', 'hf', 'llama2c' or 'gguf' for a checkpoint dir (or a llama2.c .bin or a .gguf file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint not found: {path}. {WEIGHTS_HELP}")
    if path.is_file():
        if is_gguf_file(path):
            return "gguf"
        if path.suffix == ".bin" and not path.name.startswith("pytorch_model"):
            return "llama2c"
        raise ValueError(f"{path}: a checkpoint file must be a GGUF or a llama2.c .bin; for other layouts pass the "
                         "directory")
    if list(path.glob("consolidated.*.pth")):
        return "meta"
    if list(path.glob("*.safetensors")) or list(path.glob("pytorch_model*.bin")):
        return "hf"
    raise FileNotFoundError(f"{path} holds no LLaMA weights. {WEIGHTS_HELP}")


def load_checkpoint(path: str | Path) -> tuple[LazyStateDict, dict[str, str], LlamaConfig | None]:
    """State dict in Meta names (read lazily, see LazyStateDict), the file each tensor came from, and the config the
    checkpoint describes."""
    sd, sources, config, fmt = _read(path)
    log.info("Read %s checkpoint %s: %d tensors", fmt, path, len(sd))
    return sd, sources, config


def _read(path: str | Path) -> tuple[LazyStateDict, dict[str, str], LlamaConfig | None, str]:
    fmt = detect_format(Path(path))
    return (*{"meta": load_meta, "hf": load_hf, "llama2c": load_llama2c, "gguf": load_gguf}[fmt](Path(path)), fmt)


def checkpoint_config(path: str | Path) -> LlamaConfig:
    """The config a checkpoint describes (its params.json / config.json, with the shapes its tensors say), for a
    model to be built from it later: the tensors are not read, and the checkpoint is not announced as read."""
    config = _read(path)[2]
    if config is None:
        raise ValueError(f"{path}: no params.json/config.json found; pass a model config or preset")
    return config


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
    if config is not None and ckpt_config is not None and ckpt_config.tie_embeddings != config.tie_embeddings:
        # Whether the output layer is the embedding (llama2.c's shared classifier, Llama 3.2's tied embeddings) is
        # the checkpoint's: one parameter, written once.
        config = dataclasses.replace(config, tie_embeddings=ckpt_config.tie_embeddings)
    config = config or ckpt_config
    if config is None:
        raise ValueError(f"{checkpoint}: no params.json/config.json found; pass a model config or preset")
    return sd, sources, config
