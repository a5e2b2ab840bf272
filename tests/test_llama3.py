"""The Llama 3.x architectures: RoPE theta wherever config.json keeps it, Llama 3.1's frequency scaling, tied
embeddings, the presets against the published parameter counts, and logits against transformers' own models of the
3.1 and 3.2 layouts (skipped without transformers)."""

import json

import pytest
import torch

from llama_lora.config import LlamaConfig
from llama_lora.model import llama3_scaled, rope_cache
from llama_lora.weights import build_model, load_checkpoint, save_hf, save_meta

# Published parameter counts (the model cards' safetensors totals).
PUBLISHED = {"llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496, "llama3.2-1b": 1_235_814_400,
             "llama3.2-3b": 3_212_749_824}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_each_llama3_preset_has_the_published_parameter_count(preset):
    config = LlamaConfig.from_name(preset)
    assert config.n_params == PUBLISHED[preset]
    assert config.vocab_size == 128256 and config.rope_theta == 500000.0 and config.rope_scaling is not None
    assert config.tie_embeddings == preset.startswith("llama3.2")


def hf_config(**over) -> dict:
    """A transformers 5 config.json of the tiny shape."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 16384, "hidden_act": "silu", "attention_bias": False,
           "mlp_bias": False, "head_dim": 16, "tie_word_embeddings": False,
           "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    cfg.update(over)
    return cfg


def test_rope_theta_inside_rope_parameters_is_read(tmp_path):
    """transformers 5 writes rope_theta only inside rope_parameters: it was read as 10000 before, silently."""
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    assert LlamaConfig.from_hf_config(tmp_path / "config.json").rope_theta == 500000.0


def test_llama3_scaling_is_read_from_either_place(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    expected = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}
    v5 = hf_config(rope_parameters={**scaling, "rope_theta": 500000.0})
    v4 = hf_config(rope_scaling=scaling, rope_theta=500000.0)
    del v4["rope_parameters"]
    for cfg in (v5, v4):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        config = LlamaConfig.from_hf_config(tmp_path / "config.json")
        assert config.rope_scaling == expected and config.rope_theta == 500000.0


def test_metas_use_scaled_rope_is_read(tmp_path):
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 16,
              "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    (tmp_path / "params.json").write_text(json.dumps(params))
    config = LlamaConfig.from_meta_params(tmp_path / "params.json")
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_seq_len": 8192}


@pytest.mark.parametrize("field, value", [
    ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"), ("use_mrope", True),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}), ("model_type", "gemma2"),
])
def test_a_config_field_not_implemented_is_refused_in_one_line(tmp_path, field, value):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(**{field: value})))
    with pytest.raises(ValueError, match="not implemented here") as e:
        LlamaConfig.from_hf_config(tmp_path / "config.json")
    assert "\n" not in str(e.value)


def test_metas_params_with_an_unknown_setting_is_refused(tmp_path):
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512, "moe_args": {"num_experts": 16}}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="moe_args not implemented here"):
        LlamaConfig.from_meta_params(tmp_path / "params.json")


def test_scaling_matches_metas_reference_formula():
    """Meta's apply_scaling (llama-models, llama3/model.py), written out per frequency as in its first release."""
    import math

    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    expected = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            expected.append(f)
        elif wavelen > 8192 / 1:
            expected.append(f / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            expected.append((1 - smooth) * f / 8 + smooth * f)
    got = llama3_scaled(freqs, 8.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=0)
    assert (got < freqs).sum() > 10 and (got == freqs).sum() > 10  # both bands are exercised


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_scaling_and_theta_round_trip_through_both_layouts(tmp_path, layout):
    config = LlamaConfig.from_name("tiny", rope_theta=500000.0, max_seq_len=16384, tie_embeddings=True,
                                   rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_seq_len": 8192})
    sd = build_model(config, plan=torch.float32, seed=0).state_dict()
    (save_meta if layout == "meta" else save_hf)(sd, config, tmp_path)
    _, _, back = load_checkpoint(tmp_path)
    assert back.rope_theta == config.rope_theta and back.rope_scaling == config.rope_scaling
    assert back.tie_embeddings and torch.equal(rope_cache(16, 9000, 500000.0, scaling=back.rope_scaling),
                                              rope_cache(16, 9000, 500000.0, scaling=config.rope_scaling))


# ----- against transformers' own Llama 3.1 and 3.2 layouts -----

def sharpen(model) -> None:
    """Scale q and k up so that attention is far from uniform: a RoPE or scaling mistake then moves the logits."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)


@pytest.mark.parametrize("kind", ["3.1", "3.2"])
def test_logits_equal_transformers_for_llama3_layouts(tmp_path, kind):
    """Tiny random models in the 3.1 layout (theta 500000, llama3 scaling factor 8, untied) and the 3.2 one (factor
    32, tied embeddings), written by transformers' save_pretrained, loaded through our HF path: the logits over 1,500
    positions (past the scaled wavelengths) equal transformers' within 1e-5 in fp32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    scaling = {"rope_type": "llama3", "factor": 8.0 if kind == "3.1" else 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=16384,
                                   rope_parameters={**scaling, "rope_theta": 500000.0}, rms_norm_eps=1e-5,
                                   tie_word_embeddings=kind == "3.2")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    sharpen(hf)
    hf.save_pretrained(tmp_path)
    ours = build_model(checkpoint=tmp_path, plan=torch.float32).eval()
    assert ours.config.rope_theta == 500000.0 and ours.config.tie_embeddings == (kind == "3.2")
    tokens = torch.randint(0, 512, (1, 1500), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = hf(input_ids=tokens).logits, ours(tokens)
    scale = theirs.abs().max()
    assert (mine - theirs).abs().max() <= 1e-5 * scale
    # and it could fail: without the scaling, or with LLaMA-2's theta, the same weights give other logits
    for wrong in ({"rope_scaling": None}, {"rope_theta": 10000.0}):
        other = build_model(LlamaConfig(**{**vars(ours.config), **wrong}), plan=torch.float32)
        other.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert (other.eval()(tokens) - theirs).abs().max() > 1e-3 * scale, wrong


def test_transformers_reads_the_llama3_folder_we_write(tmp_path):
    """merge.py's HF format of a 3.2-layout model (rope_parameters, as transformers 5 reads it, and rope_theta /
    rope_scaling for 4.x): transformers computes our logits."""
    transformers = pytest.importorskip("transformers")
    config = LlamaConfig.from_name("tiny", rope_theta=500000.0, max_seq_len=16384, tie_embeddings=True,
                                   rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_seq_len": 8192})
    ours = build_model(config, plan=torch.float32, seed=3).eval()
    with torch.no_grad():
        for layer in ours.layers:
            layer.attention.wq.weight.mul_(8)
            layer.attention.wk.weight.mul_(8)
    save_hf(ours.state_dict(), config, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3" and hf.config.rope_parameters["factor"] == 32.0
    tokens = torch.randint(0, 512, (1, 1500), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, mine = hf(input_ids=tokens).logits, ours(tokens)
    assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_metas_llama32_folder_without_an_output_layer_is_tied(tmp_path):
    """Meta's Llama 3.2 consolidated.00.pth holds no output.weight and its params.json says nothing of tying (only
    use_scaled_rope): the output layer is the embedding."""
    config = LlamaConfig.from_name("tiny", rope_theta=500000.0, tie_embeddings=True,
                                   rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_seq_len": 8192})
    model = build_model(config, plan=torch.float32, seed=5).eval()
    sd = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    torch.save(sd, tmp_path / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 16,
              "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    (tmp_path / "params.json").write_text(json.dumps({**params, "hidden_dim": 176}))
    back = build_model(checkpoint=tmp_path, plan=torch.float32).eval()
    assert back.config.tie_embeddings and back.output.weight is back.tok_embeddings.weight
    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
