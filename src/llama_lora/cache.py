"""Where the project keeps what it builds once: downloaded data, the demo's tokenizer and base model, the NF4 kernel."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``LLAMA_LORA_CACHE``, else ``~/.cache/llama_lora``."""
    return Path(os.environ.get("LLAMA_LORA_CACHE", Path.home() / ".cache" / "llama_lora"))
