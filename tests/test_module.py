import pytest
import torch
import torch.nn.functional as F

from llama_lora.lora import apply_lora, mark_only_lora_as_trainable
from llama_lora.loss import token_loss_sum
from llama_lora.module import LoRASettings, WarmupCosineLR
from llama_lora.weights import build_model


def reference_loss(model, input_ids, labels):
    logits = model(input_ids).float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("lora_targets", [None, ["wq", "wv"], ["wq", "output"]])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_token_loss_and_grads_equal_full_cross_entropy(tiny_config, tokens, lora_targets, chunk_size):
    """Masked-position output layer (fused or recomputed chunks) = full-logits cross-entropy, value and gradients."""
    labels = tokens.clone()
    labels[0, :10] = -100  # a masked prompt
    labels[1, -5:] = -100  # padding
    results = []
    for fn in (reference_loss, lambda m, x, y: token_loss_sum(m, x, y, chunk_size)[0]):
        torch.manual_seed(0)  # lora_a's Kaiming init draws from the global RNG
        model = build_model(tiny_config, plan=torch.float32, seed=0)
        if lora_targets:
            apply_lora(model, LoRASettings(lora_targets, r=4, alpha=8, dropout=0.0))
            mark_only_lora_as_trainable(model)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("lora_b"):
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
        loss = fn(model, tokens, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    assert ref_grads.keys() == got_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], rtol=1e-4, atol=1e-6)
    n_targets = token_loss_sum(build_model(tiny_config, plan=torch.float32, seed=0), tokens, labels)[1]
    assert n_targets == (labels[:, 1:] != -100).sum()


def test_fused_loss_under_bf16_autocast_matches_unfused(tiny_config, tokens):
    model = build_model(tiny_config, plan=torch.bfloat16, seed=0)
    labels = tokens.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = token_loss_sum(model, tokens, labels)[0]
        ref = reference_loss(model, tokens, labels)
    torch.testing.assert_close(fused, ref, rtol=2e-2, atol=0.5)


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and lrs[4] == pytest.approx(1.0)
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_lora_settings_validation():
    with pytest.raises(ValueError, match="unknown \\['q_proj'\\]"):
        LoRASettings(targets=["q_proj"])
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRASettings(r=0)


def test_strategies_that_cannot_finish_are_refused_with_the_supported_choice():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from llama_lora.plan import make_plan

    with pytest.raises(ValueError, match="FSDP1 .* use ModelParallelStrategy \\(FSDP2\\) with "
                                         "save_distributed_checkpoint: false, or ddp"):
        make_plan(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="needs save_distributed_checkpoint: false"):
        make_plan(strategy=ModelParallelStrategy())
    make_plan(strategy=ModelParallelStrategy(save_distributed_checkpoint=False))
    make_plan(strategy=DDPStrategy())


def test_loss_without_gradients_equals_the_training_loss_and_keeps_nothing(tiny_config, tokens):
    """Validation's no_grad path computes the same loss and no gradient work (nothing saved for a backward)."""
    model = build_model(tiny_config, plan=torch.float32, seed=0)
    labels = tokens.clone()
    labels[:, :5] = -100
    with_grad = token_loss_sum(model, tokens, labels)[0]
    with torch.no_grad():
        without = token_loss_sum(model, tokens, labels)[0]
    assert without.grad_fn is None and with_grad.grad_fn is not None
    assert torch.equal(without, with_grad.detach())
