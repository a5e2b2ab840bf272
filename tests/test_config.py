import json

import pytest
import torch

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
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf_config()))
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


# ----- precision that fits the hardware -----

@pytest.fixture(params=[True, False], ids=["native-bf16", "avx2-only"])
def cpu_kind(request, monkeypatch):
    """The CPU capability probe, mocked both ways: the rule is tested on either kind whatever CPU runs the test."""
    import llama_lora.config as config

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_auto_precision_on_a_cpu_follows_native_bf16(cpu_kind):
    from llama_lora.config import native_dtype, resolve_dtype, resolve_precision

    dtype, reason = native_dtype("cpu")
    assert dtype == ("bf16" if cpu_kind else "fp32")
    assert ("natively" if cpu_kind else "AVX2 only") in reason
    assert resolve_precision("auto", "cpu") == ("bf16-mixed" if cpu_kind else "32-true")
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_kind else torch.float32)
    assert resolve_precision("16-mixed", "cpu") == "16-mixed" and resolve_dtype("fp16", "cpu") == torch.float16


@pytest.mark.parametrize("ampere", [True, False])
def test_auto_precision_on_cuda_is_bf16_from_ampere_else_fp16(monkeypatch, ampere):
    from llama_lora.config import native_dtype, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: ampere)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    assert native_dtype("cuda")[0] == ("bf16" if ampere else "fp16")
    assert resolve_precision("auto", "cuda") == ("bf16-mixed" if ampere else "16-mixed")


def test_explicit_half_precision_on_a_cpu_that_emulates_it_warns(cpu_kind):
    from llama_lora.config import slow_precision_warning

    bf16 = slow_precision_warning("bf16-mixed", "bf16", "cpu")
    assert (bf16 is None) == cpu_kind
    if not cpu_kind:
        assert "bf16-mixed and bf16 on this CPU" in bf16 and "about 1 GFLOP/s" in bf16 and "147" in bf16
        assert "auto (fp32 here)" in bf16
    assert "16-true" in slow_precision_warning("16-true", "auto", "cpu")  # fp16 compute: emulated on every CPU
    assert slow_precision_warning("32-true", "fp32", "cpu") is None and slow_precision_warning("auto", "auto",
                                                                                              "cpu") is None
    assert slow_precision_warning("bf16-mixed", "bf16", "cuda") is None


def test_trainer_resolves_auto_and_logs_why(cpu_kind, caplog):
    import logging

    from llama_lora.module import LlamaLoRAModule
    from llama_lora.trainer import Trainer

    with caplog.at_level(logging.INFO):
        trainer = Trainer(accelerator="cpu", precision="auto", logger=False, enable_checkpointing=False)
    assert trainer.precision == ("bf16-mixed" if cpu_kind else "32-true")
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"trainer.precision auto: {trainer.precision}, because") for m in logged)
    module = LlamaLoRAModule(model="tiny")
    module.trainer = trainer
    assert module.base_dtype == (torch.bfloat16 if cpu_kind else torch.float32)  # the dtype the compute runs in
    assert LlamaLoRAModule(model="tiny", lora=None).base_dtype == torch.float32  # trained weights: fp32 masters
