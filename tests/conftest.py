import os
from pathlib import Path

import pytest
import torch

from llama_lora.config import LlamaConfig
from llama_lora.weights import build_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_config() -> LlamaConfig:
    return LlamaConfig.from_name("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    """fp32 random tiny model (GQA on: 4 query heads, 2 key/value heads)."""
    return build_model(tiny_config, base_dtype=torch.float32, seed=0)


@pytest.fixture
def tokens(tiny_config):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, tiny_config.vocab_size, (2, 24), generator=g)


@pytest.fixture(scope="session")
def assets() -> Path:
    """The real LLaMA-2 tokenizer and Alpaca sample; set LLAMA_LORA_TEST_ASSETS (.ci/run does)."""
    folder = os.environ.get("LLAMA_LORA_TEST_ASSETS")
    if not folder:
        pytest.skip("LLAMA_LORA_TEST_ASSETS is not set")
    path = Path(folder)
    if not (path / "tokenizer.model").is_file():
        pytest.fail(f"LLAMA_LORA_TEST_ASSETS={folder} has no tokenizer.model")
    return path


@pytest.fixture(scope="session")
def demo_tok(tmp_path_factory):
    """The demo's own SentencePiece tokenizer, trained once per test session."""
    from llama_lora.demo import demo_tokenizer, generate_demo_records
    from llama_lora.tokenizer import Tokenizer

    return Tokenizer(demo_tokenizer(generate_demo_records(2000), 1024, tmp_path_factory.mktemp("cache")))
