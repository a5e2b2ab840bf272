"""The families one step from Llama in the same model, each by its switches (LlamaConfig.attention_bias, qk_norm,
head_dim, sliding_window): Qwen2.5's presets and Qwen3's against their published parameter counts, their released
config.json files read to those presets and written back, and (where transformers is installed) their logits against
transformers' Qwen2ForCausalLM and Qwen3ForCausalLM on random weights it wrote."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_family

from llama_lora.config import LlamaConfig
from llama_lora.lora import count_params
from llama_lora.weights import build_model

# The model cards' totals: Qwen2.5 0.49B / 1.54B / 7.61B (the safetensors totals, tied embedding counted once) and
# Qwen3 0.6B / 1.7B / 4B / 8B, whose cards give the non-embedding counts 0.44B / 1.4B / 3.6B / 6.95B beside them.
PUBLISHED = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
             "qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976, "qwen3-4b": 4_022_468_096,
             "qwen3-8b": 8_190_735_360}
NON_EMBEDDING = {"qwen2.5-0.5b": 0.36e9, "qwen2.5-1.5b": 1.31e9, "qwen2.5-7b": 6.53e9, "qwen3-0.6b": 0.44e9,
                 "qwen3-1.7b": 1.4e9, "qwen3-4b": 3.6e9, "qwen3-8b": 6.95e9}

# config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen3-0.6B as released
QWEN25_05B = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
              "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
              "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
              "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
              "use_sliding_window": False, "vocab_size": 151936}
QWEN3_06B = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
             "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
             "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
             "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
             "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
             "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
             "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}

@pytest.mark.parametrize("preset", PUBLISHED)
def test_each_qwen_preset_has_the_published_parameter_count(preset):
    c = LlamaConfig.from_name(preset)
    assert c.n_params == PUBLISHED[preset]
    embedding = (1 if c.tie_embeddings else 2) * c.vocab_size * c.dim
    assert abs(c.n_params - embedding - NON_EMBEDDING[preset]) < 0.01 * NON_EMBEDDING[preset]
    assert c.family == ("qwen2" if preset.startswith("qwen2.5") else "qwen3")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_family_model_has_the_parameters_its_config_counts(family):
    """The built model's tensors (biases, q/k norms, the queries' own width) are what n_params and the layout say."""
    config = tiny_family(family)
    model = build_model(config, plan=torch.float32, seed=0)
    assert count_params(model)[1] == config.n_params
    attn = model.layers[0].attention
    if family == "qwen2":
        assert attn.wq.bias.shape == (64,) and attn.wk.bias.shape == (32,) and attn.wo.bias is None
    else:
        assert attn.wq.weight.shape == (96, 64) and attn.wo.weight.shape == (64, 96)
        assert attn.q_norm.weight.shape == (24,)


@pytest.mark.parametrize("released, preset", [(QWEN25_05B, "qwen2.5-0.5b"), (QWEN3_06B, "qwen3-0.6b")])
def test_released_qwen_config_json_reads_to_its_preset_and_back(tmp_path, released, preset):
    (tmp_path / "config.json").write_text(json.dumps(released))
    c = LlamaConfig.from_hf_config(tmp_path / "config.json")
    assert c == LlamaConfig.from_name(preset)
    (tmp_path / "back.json").write_text(json.dumps(c.to_hf_config("bfloat16")))
    back = json.loads((tmp_path / "back.json").read_text())
    assert back["model_type"] == released["model_type"] and back["architectures"] == released["architectures"]
    assert LlamaConfig.from_hf_config(tmp_path / "back.json") == c


@pytest.mark.parametrize("change, refused", [
    ({"attention_bias": True}, "attention_bias: True"),  # Qwen3's bias would be on o_proj too
    ({"use_mrope": True}, "use_mrope: True"),
    ({"mlp_bias": True}, "mlp_bias: True"),
])
def test_a_qwen_config_json_this_model_cannot_compute_is_refused_in_one_line(tmp_path, change, refused):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_06B, **change}))
    with pytest.raises(ValueError, match=f"{refused} is not implemented here") as e:
        LlamaConfig.from_hf_config(tmp_path / "config.json")
    assert "\n" not in str(e.value)


def _peaked(hf_model, scale: float = 8.0):
    """Queries and keys scaled so attention is far from uniform: a RoPE, bias or norm bug then shows in the logits."""
    with torch.no_grad():
        for layer in hf_model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(scale)
            attn.k_proj.weight.mul_(scale)
            for name in ("q_proj", "k_proj", "v_proj"):
                bias = getattr(attn, name).bias
                if bias is not None:
                    bias.normal_(0, 1.0)
            for name in ("q_norm", "k_norm"):
                if hasattr(attn, name):
                    getattr(attn, name).weight.normal_(1.0, 0.5)
    return hf_model


def hf_family_model(family: str, transformers):
    """A tiny random transformers model of the family, shaped as conftest's TINY_FAMILIES, with peaked attention."""
    common = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False, use_sliding_window=False)
        model = transformers.Qwen3ForCausalLM(cfg)
    torch.manual_seed(0)
    return _peaked(model.eval())


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_qwen_folder_written_by_transformers_computes_its_logits(tmp_path, family):
    """Qwen2 (q/k/v biases, tied output) and Qwen3 (q/k norms, head_dim 24 where dim / heads is 16) from tiny random
    models written by transformers' save_pretrained, queries and keys scaled so attention is peaked, biases and norm
    weights drawn away from their init: our logits equal transformers' within 1e-5 in fp32; without the switch the
    logits differ."""
    transformers = pytest.importorskip("transformers")
    hf = hf_family_model(family, transformers)
    hf.save_pretrained(tmp_path)
    ours = build_model(checkpoint=tmp_path, plan=torch.float32).eval()
    assert ours.config.family == family and ours.config == tiny_family(family, max_seq_len=2048)
    tokens = torch.randint(0, 512, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = hf(input_ids=tokens).logits, ours(tokens)
    scale = theirs.abs().max()
    assert (mine - theirs).abs().max() <= 1e-5 * scale, float((mine - theirs).abs().max() / scale)
    with torch.no_grad():  # the switches matter: biases zeroed, or the norms' weights at one, give other logits
        for layer in ours.layers:
            attn = layer.attention
            if family == "qwen2":
                attn.wq.bias.zero_(), attn.wk.bias.zero_()
            else:
                attn.q_norm.weight.fill_(1.0), attn.k_norm.weight.fill_(1.0)
        assert (ours(tokens) - theirs).abs().max() > 1e-3 * scale


# ----- GGUF: llama.cpp's qwen2, qwen3 and llama (Mistral) architectures -----

QWEN_TEXTS = ["<|im_start|>user\nName three fruits, 12345 of them.<|im_end|>\n<|im_start|>assistant\n",
              "Bonjour 🚀 我爱你 café ❤️ fin", "  leading spaces, 2026 digits and\ttabs\n\n"]


def qwen_style_tokenizer(folder: Path, pieces: int, assets: Path) -> Path:
    """A byte-level BPE made as Qwen's tokenizer.json is (Qwen2's split pattern: each digit alone; GPT-2's byte
    alphabet; <|endoftext|>, <|im_start|> and <|im_end|> special; no BOS), trained here on the Alpaca sample with
    HF's tokenizers, independently of the project; ``pieces`` tokens in all."""
    tokenizers = pytest.importorskip("tokenizers")
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    pre = tokenizers.pre_tokenizers
    tk.pre_tokenizer = pre.Sequence([pre.Split(tokenizers.Regex(pattern), behavior="isolated"),
                                     pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = tokenizers.decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=pieces, special_tokens=special,
                                             initial_alphabet=pre.ByteLevel.alphabet())
    records = json.loads((assets / "alpaca_5000.json").read_text())[:500]
    tk.train_from_iterator([r["instruction"] + "\n" + r["output"] for r in records] + QWEN_TEXTS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False}))
    return folder / "tokenizer.json"


def peaked_model(config: LlamaConfig, seed: int):
    """A random fp32 model of ``config`` with q and k scaled x12 (peaked attention), norm weights and biases drawn
    away from their init: a row-order, bias or norm bug shows in its logits."""
    model = build_model(config, plan=torch.float32, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("wq.weight", "wk.weight")):
                p.mul_(12)
            elif n.endswith(("norm.weight", ".bias")):
                p.normal_(1.0 if n.endswith("weight") else 0.0, 0.5)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_llama_cpp_computes_a_qwen_models_logits_and_applies_its_lora_gguf(tmp_path, family, monkeypatch, assets):
    """A tiny Qwen2 (biases) or Qwen3 (q/k norms, head_dim 24), or Mistral (llama.cpp's llama), with peaked
    attention, its embedding padded beyond its Qwen-style tokenizer (512 rows, 508 tokens) as Qwen's is, written by
    merge.py as an f32 GGUF of llama.cpp's qwen2 / qwen3 / llama architecture: llama.cpp tokenizes as we do and
    computes our logits (1e-5 of the largest); with our random LoRA adapter's GGUF applied (--lora), the adapted
    model's logits. Failed first (q/k in Meta's row order in a qwen2 file: 0.18 of the largest logit off)."""
    from test_gguf_files import llama_cpp, open_gguf, same_tokens_and_logits, script

    from llama_lora.gguf_files import write_lora
    from llama_lora.layout import gguf_arch
    from llama_lora.lora import LoRASettings, apply_lora, lora_state_dict
    from llama_lora.tokenizer import Tokenizer
    from llama_lora.weights import save_hf

    lc = llama_cpp()
    config = tiny_family(family, max_seq_len=128)
    tokenizer = qwen_style_tokenizer(tmp_path / "base", 508, assets)
    model = peaked_model(config, seed=3)
    save_hf(model.state_dict(), config, tmp_path / "base")
    proc = script("merge.py", "--checkpoint_dir", str(tmp_path / "base"), "--out_dir", str(tmp_path / "out"),
                  "--format", "gguf", "--gguf_type", "f32", "--tokenizer_path", str(tokenizer))
    assert proc.returncode == 0, proc.stderr[-3000:]
    gguf_file = tmp_path / "out" / "model-f32.gguf"
    tok = Tokenizer(tokenizer)
    assert tok.gguf_pre == "qwen2" and tok.bos_id is None
    lora = LoRASettings(targets=["wq", "wk", "wv", "wo", "w2"], r=4, alpha=8.0, dropout=0.0)
    adapted = apply_lora(build_model(checkpoint=tmp_path / "base", plan=torch.float32), lora).eval()
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.05)
    write_lora(tmp_path / "adapter.gguf", config, lora, lora_state_dict(adapted))
    for kwargs, ours in (({}, model.eval()), ({"lora_path": str(tmp_path / "adapter.gguf")}, adapted)):
        llm = open_gguf(lc, gguf_file, monkeypatch, **kwargs)
        assert llm.metadata["general.architecture"] == gguf_arch(config) and llm.n_vocab() == 512
        same_tokens_and_logits(llm, tok, ours, QWEN_TEXTS, bos=False, tolerance=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_qwen_gguf_is_a_base(tmp_path, family, assets):
    """A GGUF of llama.cpp's qwen2 / qwen3 architecture (as Ollama and llama.cpp's converter ship Qwen: q and k in
    HF's row order, biases or q/k norms, a padded token list) reads back as the model it was written from: the config
    with its switches, and in f32 the same logits (q8_0: within its rounding), its BPE tokenizer with the qwen2
    pre-tokenizer from the file."""
    from llama_lora.gguf_files import write_model
    from llama_lora.tokenizer import Tokenizer
    from llama_lora.weights import load_checkpoint

    config = tiny_family(family, max_seq_len=128)
    model = peaked_model(config, seed=5).eval()
    sd = model.state_dict()
    tok = Tokenizer(qwen_style_tokenizer(tmp_path / "tok", 508, assets))
    tokens = torch.tensor([tok.encode(QWEN_TEXTS[1], bos=False)])
    for kind, tolerance in (("f32", 1e-6), ("q8_0", 3e-2)):
        path = write_model(tmp_path / f"{kind}.gguf", config, {k: tuple(v.shape) for k, v in sd.items()}, sd.items(),
                           tok, kind)
        read = load_checkpoint(path)[2]  # the file keeps norm_eps in f32
        assert read == dataclasses.replace(config, norm_eps=read.norm_eps) and read.norm_eps == pytest.approx(1e-6)
        back = build_model(checkpoint=path, plan=torch.float32).eval()
        with torch.no_grad():
            theirs, mine = back(tokens), model(tokens)
        assert (theirs - mine).abs().max() <= tolerance * mine.abs().max(), (kind, float((theirs - mine).abs().max()))
        own = Tokenizer(path)
        assert own.gguf_pre == "qwen2" and own.encode(QWEN_TEXTS[2], bos=False) == tok.encode(QWEN_TEXTS[2], bos=False)
