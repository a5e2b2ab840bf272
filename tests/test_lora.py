import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama_lora.config import LlamaConfig
from llama_lora.lora import (
    LoRALinear,
    LoRASettings,
    apply_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    trainable_summary,
)
from llama_lora.model import Llama

ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]


def randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_linear_formula_and_names():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True)
    layer = LoRALinear.from_linear(base, r=4, alpha=8, dropout=0.0)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    assert {n for n, _ in layer.named_parameters()} == {"weight", "bias", "lora_a", "lora_b"}
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_b) == 0 and layer.lora_a.abs().sum() > 0
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 5, 16)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_a.T @ layer.lora_b.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(layer, nn.Linear)  # drop-in


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(8, 16)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, x @ layer.weight.T + dropped @ layer.lora_a.T @ layer.lora_b.T)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ layer.weight.T + x @ layer.lora_a.T @ layer.lora_b.T)


def test_b_zero_equals_base_model(tiny_model, tokens):
    base = tiny_model(tokens)
    apply_lora(tiny_model, LoRASettings(ALL, r=4, alpha=8, dropout=0.0))
    assert torch.equal(tiny_model(tokens), base)


def test_only_lora_requires_grad_and_base_unchanged_after_step(tiny_model, tokens):
    apply_lora(tiny_model, LoRASettings(["wq", "wv"], r=4, alpha=8, dropout=0.0))
    mark_only_lora_as_trainable(tiny_model)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in trainable)
    assert len(trainable) == 2 * 2 * tiny_model.config.n_layers
    base_before = {n: p.clone() for n, p in tiny_model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.clone() for n, p in tiny_model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    F.cross_entropy(tiny_model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    for n, p in tiny_model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]) and p.grad is None, n
    assert any(not torch.equal(p, lora_before[n]) for n, p in tiny_model.named_parameters() if n in lora_before)


def test_merge_is_idempotent_and_equals_unmerged(tiny_model, tokens):
    apply_lora(tiny_model, LoRASettings(ALL, r=4, alpha=16, dropout=0.0))
    randomize_b(tiny_model)
    unmerged = tiny_model(tokens)
    layer = tiny_model.layers[0].attention.wq
    layer.merge()
    once = layer.weight.clone()
    layer.merge()
    assert torch.equal(layer.weight, once)
    merge_lora(tiny_model)
    torch.testing.assert_close(tiny_model(tokens), unmerged, rtol=1e-4, atol=1e-4)
    merge_lora(tiny_model, unload=True)
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())
    assert not any("lora_" in k for k in tiny_model.state_dict())
    torch.testing.assert_close(tiny_model(tokens), unmerged, rtol=1e-4, atol=1e-4)


def test_lora_weights_stay_fp32_over_half_base(tiny_config, tokens):
    from llama_lora.weights import build_model

    model = build_model(tiny_config, plan=torch.bfloat16, seed=0)
    apply_lora(model, LoRASettings(["wq", "wv"], r=4, alpha=8, dropout=0.0))
    sd = lora_state_dict(model)
    assert sd and all(v.dtype == torch.float32 for v in sd.values())
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    randomize_b(model)
    mark_only_lora_as_trainable(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)  # what a GradScaler will see
    # Without autocast the LoRA branch runs in fp32 and the bf16 base still works.
    assert model(tokens).dtype == torch.bfloat16


def test_seed_trainable_params_line_for_llama2_7b_on_meta_device():
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_name("llama2-7b"))
    apply_lora(model, LoRASettings(["wq", "wk", "wv"], r=16, alpha=32, dropout=0.05))
    mark_only_lora_as_trainable(model)
    assert model.layers[0].attention.wq.lora_a.is_meta
    assert trainable_summary(model) == (
        "trainable params: 12,582,912 || all params: 6,750,998,528 || trainable%: 0.19"
    )


@pytest.mark.parametrize("targets, r, dropout, match", [
    (["q_proj"], 8, 0.0, "model.lora.targets: unknown"),
    ([], 8, 0.0, "non-empty subset"),
    (["wq"], 0, 0.0, "model.lora.r must be a positive integer"),
    (["wq"], 8, 1.0, "model.lora.dropout must be in"),
])
def test_bad_lora_settings(targets, r, dropout, match):
    with pytest.raises(ValueError, match=match):
        LoRASettings(targets, r=r, alpha=16, dropout=dropout)
