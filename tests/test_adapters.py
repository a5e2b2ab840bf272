import json

import pytest
import torch
from conftest import tiny_family, trained_run
from safetensors.torch import load_file

from llama_lora.export import merged_weights, untied_if_adapted
from llama_lora.lora import LoRASettings, apply_lora, lora_state_dict
from llama_lora.peft import export_peft, import_peft
from llama_lora.trained_run import open_run
from llama_lora.weights import build_model, save_hf, save_meta

LORA = {"targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"], "r": 4, "alpha": 8.0, "dropout": 0.0}


@pytest.fixture
def lora_model(tiny_config):
    return random_lora_model(tiny_config)


def random_lora_model(config):
    torch.manual_seed(0)
    model = build_model(config, plan=torch.float32, seed=0)
    apply_lora(model, LoRASettings(**LORA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_peft_export_names_shapes_and_config(tmp_path, lora_model, tiny_config):
    export_peft(lora_state_dict(lora_model), tiny_config, LoRASettings(**LORA), tmp_path, "base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8.0, 0.0)
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj",
                                            "up_proj", "lm_head"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    c = tiny_config
    kv_dim = c.n_kv_heads * c.head_dim
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, c.dim)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (c.dim, 4)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (kv_dim, 4)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, c.hidden_dim)
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (c.vocab_size, 4)
    assert len(tensors) == 2 * (7 * c.n_layers + 1)
    # q/k lora_B rows carry HF's permutation, like the base weights; v does not.
    wq = lora_model.layers[0].attention.wq
    assert not torch.equal(tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], wq.lora_b)
    assert torch.equal(tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"],
                       lora_model.layers[0].attention.wv.lora_b)


def test_peft_round_trip_gives_identical_logits(tmp_path, lora_model, tiny_config, tokens):
    expected = lora_model(tokens)
    save_meta(build_model(tiny_config, plan=torch.float32, seed=0).state_dict(), tiny_config, tmp_path / "base")
    export_peft(lora_state_dict(lora_model), tiny_config, LoRASettings(**LORA), tmp_path / "adapter", "base")
    sd, lora = import_peft(tmp_path / "adapter", tiny_config)
    assert lora == LoRASettings(**LORA)
    loaded = open_run(tmp_path / "adapter", tmp_path / "base").build(torch.float32)
    assert torch.equal(loaded(tokens), expected)


def test_delta_weight_in_hf_layout_equals_permuted_meta_delta(tmp_path, lora_model, tiny_config):
    """What PeftModel computes on the HF base (B_hf A_hf) is exactly HF's permutation of our delta."""
    from llama_lora.layout import permute_to_hf

    export_peft(lora_state_dict(lora_model), tiny_config, LoRASettings(**LORA), tmp_path, "base")
    t = load_file(tmp_path / "adapter_model.safetensors")
    for proj, meta, heads in (("q_proj", "wq", tiny_config.n_heads), ("k_proj", "wk", tiny_config.n_kv_heads)):
        pre = f"base_model.model.model.layers.1.self_attn.{proj}"
        delta_hf = t[f"{pre}.lora_B.weight"] @ t[f"{pre}.lora_A.weight"]
        layer = getattr(lora_model.layers[1].attention, meta)
        torch.testing.assert_close(delta_hf, permute_to_hf(layer.lora_b @ layer.lora_a, heads))


@pytest.mark.parametrize("fmt", ["meta", "hf"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_merged_checkpoint_equals_unmerged(tmp_path, tokens, fmt, family):
    """Each family: the merged checkpoint (Qwen2's biases carried, Qwen3's norms) computes the adapter's logits."""
    tiny_config = tiny_family(family)
    lora_model = random_lora_model(tiny_config)
    expected = lora_model(tokens)
    base = {k: v.detach().clone() for k, v in lora_model.state_dict().items() if "lora_" not in k}
    run = trained_run(lora_state_dict(lora_model), LORA)
    sd = dict(merged_weights(base, run))
    assert sd.keys() == base.keys()
    # Qwen2's tied output, adapted, is merged untied (export.untied_if_adapted, as merge.py writes it)
    (save_meta if fmt == "meta" else save_hf)(sd, untied_if_adapted(tiny_config, run), tmp_path)
    merged = build_model(checkpoint=tmp_path, plan=torch.float32)
    torch.testing.assert_close(merged(tokens), expected, rtol=1e-4, atol=1e-4)


def test_bad_adapters(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="Adapter not found"):
        open_run(tmp_path / "nope.ckpt", model="tiny")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["c_attn"],
                                                              "r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no LLaMA counterpart"):
        import_peft(tmp_path, tiny_config)
    (tmp_path / "x.ckpt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable fit.py checkpoint"):
        open_run(tmp_path / "x.ckpt", model="tiny")


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_streamed_merge_of_a_half_precision_base_is_bit_identical_to_an_fp32_merge(tmp_path, lora_model,
                                                                                    tiny_config, fmt):
    """merge_adapter folds each layer in fp32 into the memory-mapped bf16 base (in place, copy-on-write); the result
    equals loading the whole base in fp32, merging there and casting to bf16, bit for bit. The base file on disk is
    not changed."""
    import hashlib

    from llama_lora.export import merge_adapter
    from llama_lora.lora import merge_lora
    from llama_lora.weights import load_checkpoint

    save_meta({k: v.detach().bfloat16() for k, v in lora_model.state_dict().items() if "lora_" not in k},
              tiny_config, tmp_path / "base")
    export_peft(lora_state_dict(lora_model), tiny_config, LoRASettings(**LORA), tmp_path / "adapter", "base")
    digest = hashlib.sha256((tmp_path / "base" / "consolidated.00.pth").read_bytes()).hexdigest()
    merge_adapter(tmp_path / "adapter", out_dir=tmp_path / "merged", format=fmt, checkpoint_dir=tmp_path / "base",
                  model="tiny")
    reference = open_run(tmp_path / "adapter", tmp_path / "base").build(torch.float32)
    merge_lora(reference, unload=True)
    merged, _, _ = load_checkpoint(tmp_path / "merged")
    for key, expected in reference.state_dict().items():
        assert merged[key].dtype == torch.bfloat16 and torch.equal(merged[key], expected.bfloat16()), key
    assert hashlib.sha256((tmp_path / "base" / "consolidated.00.pth").read_bytes()).hexdigest() == digest


def test_export_reads_no_base_weights(tmp_path, lora_model, tiny_config):
    """A fit.py checkpoint whose base folder is gone still exports: export needs only the LoRA tensors and settings."""
    import subprocess
    import sys

    from conftest import ROOT

    ckpt = {"state_dict": {f"model.{k}": v for k, v in lora_state_dict(lora_model).items()},
            "hyper_parameters": {"model": "tiny", "checkpoint_dir": str(tmp_path / "gone"), "lora": LORA}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_adapter.py"), "--adapter",
                           str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "peft")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sd, lora = import_peft(tmp_path / "peft", tiny_config)
    own = lora_state_dict(lora_model)
    assert lora == LoRASettings(**LORA)
    assert all(torch.equal(v, own[k]) for k, v in sd.items())


@pytest.fixture
def tied_lora(tmp_path, tokens):
    """A tied tiny base (HF folder, tie_word_embeddings) and a PEFT adapter with a LoRA on the output layer."""
    from llama_lora.config import LlamaConfig

    config = LlamaConfig.from_name("tiny", tie_embeddings=True)
    save_hf(build_model(config, plan=torch.float32, seed=0).state_dict(), config, tmp_path / "base")
    model = build_model(config, plan=torch.float32, seed=0)
    lora = LoRASettings(targets=["wq", "output"], r=4, alpha=8.0, dropout=0.0)
    apply_lora(model, lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.2)
    export_peft(lora_state_dict(model), config, lora, tmp_path / "adapter", "base")
    return model.eval(), config, lora


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_a_lora_on_a_tied_output_layer_merges_into_an_untied_model(tmp_path, tokens, tied_lora, fmt):
    """Failed before (and with the fix taken out): the merged model stayed tied, with one tensor equal to the
    embedding + s B A, so the output layer's update changed the input embeddings too and the logits moved."""
    from llama_lora.export import merge_adapter

    model, config, _ = tied_lora
    merge_adapter(str(tmp_path / "adapter"), out_dir=str(tmp_path / "merged"), format=fmt,
                  checkpoint_dir=str(tmp_path / "base"))
    merged = build_model(checkpoint=tmp_path / "merged", plan=torch.float32)
    assert not merged.config.tie_embeddings
    torch.testing.assert_close(merged(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    base = build_model(checkpoint=tmp_path / "base", plan=torch.float32)
    assert torch.equal(merged.tok_embeddings.weight, base.tok_embeddings.weight)  # the embedding as it was


def test_a_lora_on_a_tied_output_layer_has_no_llama_cpp_lora_form(tmp_path, tied_lora):
    """Failed before: export_adapter --format gguf wrote output.weight.lora_a/b for a GGUF with no output.weight."""
    from llama_lora.export import export_adapter

    model, _, lora = tied_lora
    ckpt = {"state_dict": {f"model.{k}": v for k, v in lora_state_dict(model).items()},
            "hyper_parameters": {"model": None, "checkpoint_dir": str(tmp_path / "base"),
                                 "lora": {"targets": lora.targets, "r": lora.r, "alpha": lora.alpha, "dropout": 0.0}}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="ties to the embedding"):
        export_adapter(str(tmp_path / "last.ckpt"), str(tmp_path / "out"), format="gguf")
    assert not (tmp_path / "out").exists()
