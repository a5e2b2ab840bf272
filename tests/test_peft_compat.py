"""Our PEFT export against HF's own stack, for each family. transformers and peft are in the test extra (not
dependencies: the project never imports them); skipped where they are absent (checked 2026-12-06 with transformers
5.25.0 and peft 0.21.2)."""

import json

import pytest
import torch
from conftest import TINY_FAMILIES, tiny_family

from llama_lora.lora import LoRASettings, apply_lora, lora_state_dict
from llama_lora.peft import export_peft, import_peft
from llama_lora.weights import build_model, save_hf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LORA = {"targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"], "r": 4, "alpha": 8.0, "dropout": 0.0}


def exported_to_peft(tmp_path, tiny_config, tokens, lora):
    """Our model with a LoRA adapter (B drawn), its base saved in HF's format and the adapter exported in PEFT's;
    PeftModel.from_pretrained on them must compute our logits. Returns our model and PEFT's."""
    model = build_model(tiny_config, plan=torch.float32, seed=0)
    with torch.no_grad():  # norms away from one (Qwen3's per-head q/k norms are permuted with q and k's rows)
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
    save_hf(model.state_dict(), tiny_config, tmp_path / "base")
    apply_lora(model, LoRASettings(**lora))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.1)
            elif n.endswith("lora_magnitude"):  # DoRA: magnitudes away from ||W||, as after training
                p.mul_(1 + 0.2 * torch.randn_like(p))
    model.eval()
    export_peft(lora_state_dict(model), tiny_config, LoRASettings(**lora), tmp_path / "adapter",
                base_model=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    assert type(hf).__name__ == tiny_config.to_hf_config("float32")["architectures"][0]
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=tokens).logits, model(tokens), rtol=1e-4, atol=1e-4)
    return model, theirs


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_peft_model_from_pretrained_gives_our_logits(tmp_path, tokens, family):
    """Each family (Llama, Mistral, Qwen2's biases, Qwen3's q/k norms and wider queries): our adapter on every
    linear layer, exported, gives PeftModel on transformers' model of the family our logits; PEFT's own save of it
    imports back to the same weights."""
    torch.manual_seed(0)
    config = tiny_family(family)
    model, theirs = exported_to_peft(tmp_path, config, tokens, LORA)
    theirs.save_pretrained(tmp_path / "resaved")
    sd, lora = import_peft(tmp_path / "resaved", config)
    own = model.state_dict()
    assert lora == LoRASettings(**LORA)
    assert all(torch.equal(v, own[k]) for k, v in sd.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_transformers_auto_dtype_keeps_the_written_dtype(tmp_path, tiny_config, tokens, dtype):
    """A folder we write (merge.py's HF format) loads in transformers with dtype "auto" in the dtype of its shards,
    with our logits."""
    model = build_model(tiny_config, plan=dtype, seed=0)
    save_hf(model.state_dict(), tiny_config, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype="auto")
    assert hf.dtype == dtype
    if dtype == torch.float32:
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=tokens).logits, model(tokens), rtol=1e-4, atol=1e-4)


def test_an_rslora_adapter_interchanges_with_peft(tmp_path, tiny_config, tokens):
    """use_rslora both ways (checked 2026-12-03 with peft 0.21.2): our rsLoRA adapter, exported, gives
    PeftModel our logits; PEFT's own rsLoRA adapter, imported, gives PEFT's logits here."""
    from llama_lora.trained_run import open_run

    torch.manual_seed(1)
    _, theirs = exported_to_peft(tmp_path, tiny_config, tokens, {**LORA, "r": 16, "alpha": 4.0, "use_rslora": True})
    assert theirs.peft_config["default"].use_rslora
    # PEFT's own: a fresh rsLoRA model, B drawn, saved by PEFT
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             lora_dropout=0.0)
    made = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    made.eval().save_pretrained(tmp_path / "peft")
    ours = open_run(tmp_path / "peft", tmp_path / "base").build(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), made(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_dora_adapter_interchanges_with_peft(tmp_path, tokens, family):
    """use_dora both ways (checked 2026-12-03 with peft 0.21.2): our DoRA adapter (B and the magnitudes drawn),
    exported with its magnitudes under PEFT's key (q/k rows permuted), gives PeftModel our logits; PEFT's own DoRA
    adapter, imported, gives PEFT's logits here, also when merged by merge.py's code path."""
    from llama_lora.export import merged_weights
    from llama_lora.trained_run import open_run
    from llama_lora.weights import open_checkpoint

    torch.manual_seed(2)
    tiny_config = tiny_family(family)
    lora = {**LORA, "use_dora": True}
    _, theirs = exported_to_peft(tmp_path, tiny_config, tokens, lora)
    assert theirs.peft_config["default"].use_dora
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                             use_dora=True, lora_dropout=0.0)
    made = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    made.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = made(input_ids=tokens).logits
    ours = open_run(tmp_path / "peft", tmp_path / "base").build(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), expected, rtol=1e-4, atol=1e-4)
        sd, _, _ = open_checkpoint(tmp_path / "base")
        merged = dict(merged_weights(sd, open_run(tmp_path / "peft", tmp_path / "base")))
        plain = build_model(tiny_config, plan=torch.float32, seed=0)
        plain.load_state_dict(merged)
        torch.testing.assert_close(plain(tokens), expected, rtol=1e-4, atol=1e-4)
