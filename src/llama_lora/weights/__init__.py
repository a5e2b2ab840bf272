"""Checkpoint I/O: Meta shards, HuggingFace (safetensors or .bin), llama2.c version 0; everything in Meta's names.

Loading never unpickles code (``weights_only=True`` or safetensors), reads with mmap, and places tensors with
``load_state_dict(assign=True)`` into a model built on the meta device, so a 7B model never exists twice in memory.

- ``tensors``: weights-only reading, the lazy state dict, atomic writes;
- ``meta``, ``hf``, ``llama2c``: the three formats, each read and written;
- ``source``: which format a folder holds, and its tensors and config, checked against the model;
- ``build``: a ready model as the run plan says, and FSDP2's per-rank fill.
"""

from .build import build_model, fill_shards, gather_rows, load_rows, local_rows, meta_model
from .hf import hf_key_to_meta, meta_key_to_hf, save_hf
from .llama2c import save_llama2c
from .meta import save_meta
from .source import WEIGHTS_HELP, check_state_dict, checkpoint_config, detect_format, load_checkpoint, open_checkpoint
from .tensors import LazyStateDict

__all__ = ["WEIGHTS_HELP", "LazyStateDict", "build_model", "check_state_dict", "checkpoint_config", "detect_format",
           "fill_shards", "gather_rows", "hf_key_to_meta", "load_checkpoint", "load_rows", "local_rows",
           "meta_key_to_hf", "meta_model", "open_checkpoint",
           "save_hf", "save_llama2c", "save_meta"]
