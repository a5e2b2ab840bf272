import json

import pytest

from llama_lora.config import PRESETS, LlamaConfig

REFERENCE = {  # DESIGN.md: dim, layers, heads, kv heads, ffn hidden, vocab, params
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, 6_738_415_616),
    "llama2-13b": (5120, 40, 40, 40, 13824, 32000, 13_015_864_320),
    "llama2-70b": (8192, 80, 64, 8, 28672, 32000, 68_976_648_192),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_presets_match_reference(name):
    c = LlamaConfig.from_name(name)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, c.n_params) == REFERENCE[name]


def test_small_demo_tiny_presets():
    assert LlamaConfig.from_name("small").hidden_dim == 1376
    assert 2_000_000 <= LlamaConfig.from_name("demo").n_params <= 10_000_000
    assert set(PRESETS) >= {"llama2-7b", "llama2-13b", "llama2-70b", "tiny", "demo"}


def test_meta_params_json(tmp_path):
    # Meta's 70B params.json as shipped (vocab_size -1: taken from the tokenizer).
    params = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
              "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
    (tmp_path / "params.json").write_text(json.dumps(params))
    c = LlamaConfig.from_meta_params(tmp_path / "params.json")
    assert c == LlamaConfig.from_name("llama2-70b")


def test_hf_config_json(tmp_path):
    c = LlamaConfig.from_name("llama2-7b")
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf_config("float16")))
    assert LlamaConfig.from_hf_config(tmp_path / "config.json") == c


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=100, n_heads=3), "n_heads=3 must divide dim=100"),
        (dict(n_heads=32, n_kv_heads=5), "n_kv_heads=5 must divide n_heads=32"),
        (dict(dim=0), "dim must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer"),
        (dict(dim=96, n_heads=32), "head_dim"),
        (dict(ffn_dim_multiplier=-1.0), "ffn_dim_multiplier"),
    ],
)
def test_invalid_values_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="choose one of: llama2-7b"):
        LlamaConfig.from_name("llama3")


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        LlamaConfig.from_meta_params(tmp_path / "params.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="line 1, column 2"):
        LlamaConfig.from_hf_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="missing num_hidden_layers"):
        LlamaConfig.from_hf_config(tmp_path / "config.json")


def test_mistral_preset_and_config_json(tmp_path):
    """Mistral 7B v0.3's published count (7.25B: 7,248,023,552) and its HF config.json (model_type mistral, no
    window); v0.1's sliding window of 4,096 caps the context, and a run longer than it is refused in one line."""
    import dataclasses

    c = LlamaConfig.from_name("mistral-7b-v0.3")
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, c.n_params) == (
        4096, 32, 32, 8, 14336, 32768, 7_248_023_552)
    hf = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "vocab_size": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
          "sliding_window": None, "hidden_act": "silu", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert LlamaConfig.from_hf_config(tmp_path / "config.json") == c
    (tmp_path / "config.json").write_text(json.dumps({**hf, "vocab_size": 32000, "sliding_window": 4096}))
    v01 = LlamaConfig.from_hf_config(tmp_path / "config.json")
    assert (v01.sliding_window, v01.max_seq_len) == (4096, 4096)
    assert dataclasses.replace(v01, max_seq_len=2048).max_seq_len == 2048
    with pytest.raises(ValueError, match="sliding window of 4096 tokens is not implemented here; .* at most 4096"):
        dataclasses.replace(v01, max_seq_len=8192)
    (tmp_path / "back.json").write_text(json.dumps(v01.to_hf_config("bfloat16")))
    assert LlamaConfig.from_hf_config(tmp_path / "back.json") == v01
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "gemma"}))
    with pytest.raises(ValueError, match="model_type: 'gemma' is not implemented here \\(llama, mistral, qwen2"):
        LlamaConfig.from_hf_config(tmp_path / "config.json")
