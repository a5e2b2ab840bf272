"""The LoRA variants: DoRA's forward, gradients, merge and runs; rsLoRA's scale, its merge and export; LoRA+'s optimizer
groups. (Their PEFT interchange is in test_peft_compat.py.)"""

import importlib.util
import math

import pytest
import torch
from conftest import ROOT, fit, run_on_meta_base, trained_run, write_tiny_config

from llama_lora.export import merged_weights
from llama_lora.lora import LoRALinear, LoRASettings, apply_lora, lora_layers, lora_state_dict, merge_lora
from llama_lora.quant import NF4Weight, quantize


def test_rslora_scales_the_update_by_alpha_over_the_root_of_r():
    torch.manual_seed(0)
    layer = LoRALinear(32, 24, r=16, alpha=8.0, dropout=0.0, use_rslora=True)
    torch.nn.init.normal_(layer.lora_b)
    assert layer.scaling == 8.0 / math.sqrt(16) == 2.0
    assert LoRALinear(32, 24, r=16, alpha=8.0, dropout=0.0).scaling == 0.5
    x = torch.randn(3, 32)
    direct = x @ layer.weight.T + 2.0 * (x @ layer.lora_a.T @ layer.lora_b.T)
    torch.testing.assert_close(layer(x), direct, rtol=1e-5, atol=1e-5)


def test_an_rslora_model_merges_exactly_both_ways(tiny_model, tokens):
    """merge_lora (the layers) and merged_weights (merge.py, from the adapter's settings) fold alpha / sqrt(r)."""
    settings = LoRASettings(targets=["wq", "wv", "w2"], r=4, alpha=3.0, dropout=0.0, use_rslora=True)
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_lora(tiny_model, settings)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.2)
    tiny_model.eval()
    with torch.no_grad():
        unmerged = tiny_model(tokens)
    lora = {"targets": settings.targets, "r": 4, "alpha": 3.0, "dropout": 0.0, "use_rslora": True}
    folded = dict(merged_weights(base, trained_run(lora_state_dict(tiny_model), lora)))
    merge_lora(tiny_model, unload=True)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(tokens), unmerged, rtol=1e-5, atol=1e-5)
    own = tiny_model.state_dict()
    assert all(torch.allclose(folded[k], own[k], rtol=1e-6, atol=1e-6) for k in own)


def test_lora_plus_puts_the_b_matrices_alone_in_a_group_at_lr_times_ratio(tmp_path, cache_dir):
    """LoRA+: two parameter groups, the second holding every lora_b and nothing else, its lr ratio times the first's
    all along the schedule (LearningRateMonitor logs both)."""
    from conftest import scalars

    lora = {"targets": ["wq", "wv", "w2"], "r": 4, "alpha": 8, "dropout": 0.0, "lr_ratio": 16.0}
    fit(write_tiny_config(tmp_path, cache_dir, model={"lora": lora}, trainer={"max_steps": 3, "limit_val_batches": 0}))
    a, b = scalars(tmp_path / "logs", "lr-AdamW/pg1"), scalars(tmp_path / "logs", "lr-AdamW/pg2")
    assert a.keys() == b.keys() and all(b[s] == pytest.approx(16 * a[s]) for s in a) and max(a.values()) > 0
    optimizer = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["optimizer_states"][0]
    groups, state = optimizer["param_groups"], optimizer["state"]
    # r = 4: every A is (4, in), every B (out, 4), and no out or in is 4 here; 2 layers x 3 targets of each
    shapes = [[tuple(state[i]["exp_avg"].shape) for i in g["params"]] for g in groups]
    assert len(groups) == 2 and len(shapes[0]) == len(shapes[1]) == 2 * 3
    assert all(s[0] == 4 for s in shapes[0]) and all(s[1] == 4 and s[0] != 4 for s in shapes[1])


def test_a_bad_lr_ratio_is_refused():
    with pytest.raises(ValueError, match="lr_ratio must be > 0"):
        LoRASettings(lr_ratio=0.0)


@pytest.mark.slow
def test_an_rslora_run_exports_its_scale_to_peft_and_to_llama_cpp(tmp_path, cache_dir):
    """A run with use_rslora: PEFT's adapter_config says use_rslora; llama.cpp's LoRA GGUF (which scales by
    alpha / r) carries the alpha that gives alpha / sqrt(r)."""
    import json
    import subprocess
    import sys

    gguf = pytest.importorskip("gguf")
    lora = {"targets": ["wq", "wv"], "r": 4, "alpha": 8, "dropout": 0.0, "use_rslora": True}
    fit(write_tiny_config(tmp_path, cache_dir, model={"lora": lora}, trainer={"max_steps": 1, "limit_val_batches": 0}))
    for fmt in ("peft", "gguf"):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_adapter.py"), "--adapter",
                               str(tmp_path / "ckpt" / "last.ckpt"), "--out_dir", str(tmp_path / fmt), "--format",
                               fmt], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_rslora"] is True
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "adapter.gguf"))
    assert reader.fields["adapter.lora.alpha"].contents() / 4 == pytest.approx(8 / math.sqrt(4))


# ----- DoRA -----

DORA = {"targets": ["wq", "wk", "wv", "w2"], "r": 4, "alpha": 8.0, "dropout": 0.0, "use_dora": True}


def _draw(model: torch.nn.Module, seed: int = 0) -> None:
    """B away from 0 and the magnitudes away from ||W||: the state of a trained DoRA adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.3)
            layer.lora_magnitude.mul_(1 + 0.3 * torch.randn(layer.lora_magnitude.shape, generator=g))


@pytest.mark.parametrize("base", ["fp32", "bf16", "nf4"])
def test_dora_at_initialisation_computes_the_base_model_exactly(tiny_config, tokens, base):
    """m starts at ||W|| per output row and B at 0: the logits are the base model's, bit for bit (also on a bf16
    base and on an NF4 base, whose norm is taken from the dequantized rows)."""
    from llama_lora.weights import build_model

    model = build_model(tiny_config, plan=torch.float32, seed=0)
    if base != "fp32":
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.startswith("layers"):
                    w = mod.weight.detach().to(torch.bfloat16)
                    mod.weight = torch.nn.Parameter(quantize(w, torch.float32) if base == "nf4" else w.float(),
                                                    requires_grad=False)
    model.eval()
    with torch.no_grad():
        before = model(tokens)
        apply_lora(model, LoRASettings(**DORA))
        after = model(tokens)
    assert torch.equal(before, after)
    layer = model.layers[0].attention.wq
    w = layer.weight.dequantize(torch.float32) if base == "nf4" else layer.weight
    torch.testing.assert_close(layer.lora_magnitude, w.float().norm(dim=1), rtol=1e-6, atol=0)


def test_dora_gradients_are_the_papers_formula_with_the_norm_a_constant():
    """y = x W'^T with W' = m (W + s B A) / ||W + s B A||, the norm detached (section 4.3): the layer's gradients of
    m, A, B and x equal autograd's through that formula written out; with the norm not detached they differ, so the
    comparison can fail."""
    torch.manual_seed(0)
    layer = LoRALinear(48, 40, r=6, alpha=12.0, dropout=0.0, use_dora=True)
    _draw(layer)
    x = torch.randn(5, 7, 48, requires_grad=True)
    target = torch.randn(5, 7, 40)

    def grads(fn):
        for t in (x, layer.lora_a, layer.lora_b, layer.lora_magnitude):
            t.grad = None
        ((fn(x) - target) ** 2).sum().backward()
        return [t.grad.clone() for t in (x, layer.lora_a, layer.lora_b, layer.lora_magnitude)]

    def paper(detach):
        def fn(x):
            v = layer.weight + layer.scaling * layer.lora_b @ layer.lora_a
            norm = v.norm(dim=1, keepdim=True)
            return x @ (layer.lora_magnitude[:, None] * v / (norm.detach() if detach else norm)).T
        return fn

    ours, direct, coupled = grads(layer), grads(paper(True)), grads(paper(False))
    for a, b in zip(ours, direct):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ours[1], coupled[1], rtol=1e-3, atol=1e-6)  # A's gradient sees the norm's


def test_dora_weight_norm_in_row_chunks_is_the_whole_weights(monkeypatch):
    """The norm is taken a few rows at a time (dense and NF4): the same as over the whole W + s B A."""
    import llama_lora.quant as quant

    torch.manual_seed(0)
    layer = LoRALinear(128, 96, r=4, alpha=8.0, dropout=0.0, use_dora=True)
    _draw(layer)
    whole = (layer.weight + layer.scaling * layer.lora_b @ layer.lora_a).norm(dim=1)
    monkeypatch.setattr(quant, "CHUNK_VALUES", 128 * 7)  # 7 rows a chunk: 13 full chunks and a short one
    torch.testing.assert_close(layer.weight_norm(), whole.detach(), rtol=1e-6, atol=1e-6)
    layer.weight = torch.nn.Parameter(quantize(layer.weight.detach()), requires_grad=False)
    full = layer.weight.dequantize(torch.float32) + layer.scaling * layer.lora_b.detach() @ layer.lora_a.detach()
    torch.testing.assert_close(layer.weight_norm(), full.norm(dim=1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_a_dora_model_merges_exactly_both_ways(tiny_model, tokens, base):
    """merge_lora (the layers) and merged_weights (merge.py, from the adapter) fold m (W + s B A) / ||W + s B A||:
    the merged logits are the unmerged ones; on an NF4 base, into its dequantized weights."""
    if base == "nf4":
        with torch.no_grad():
            for name, mod in tiny_model.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.startswith("layers"):
                    mod.weight = torch.nn.Parameter(quantize(mod.weight.detach()), requires_grad=False)
    base_sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_lora(tiny_model, LoRASettings(**DORA))
    _draw(tiny_model)
    tiny_model.eval()
    with torch.no_grad():
        unmerged = tiny_model(tokens)
    def fold(tensors, lora):  # merged_weights rewrites a tensor in place where the dtype stays: a copy each time
        return dict(merged_weights({k: v.clone() for k, v in base_sd.items()}, trained_run(tensors, lora)))

    folded = fold(lora_state_dict(tiny_model), DORA)
    merge_lora(tiny_model, unload=True)
    with torch.no_grad():
        merged = tiny_model(tokens)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    own = {k: v.dequantize(torch.float32) if isinstance(v, NF4Weight) else v.float()  # the layers not adapted
           for k, v in tiny_model.state_dict().items()}
    assert all(torch.allclose(folded[k].float(), own[k], rtol=1e-6, atol=1e-6) for k in own)
    # the magnitudes mattered: folded as plain LoRA, the same A and B give other weights
    tensors = {k: v for k, v in lora_state_dict(tiny_model).items() if not k.endswith("lora_magnitude")}
    plain = fold(tensors, {**DORA, "use_dora": False})
    assert not torch.allclose(plain["layers.0.attention.wq.weight"].float(), own["layers.0.attention.wq.weight"])


def test_dora_trains_only_a_b_and_m_and_lora_plus_leaves_m_in_the_first_group(tmp_path, cache_dir):
    """A DoRA run through fit.py: the checkpoint holds A, B and the magnitude of each target; under LoRA+ the second
    optimizer group holds the B matrices only (the magnitudes learn at lr, with the A matrices); the magnitudes
    moved from ||W||."""
    lora = {**DORA, "targets": ["wq", "wv"], "lr_ratio": 4.0}
    fit(write_tiny_config(tmp_path, cache_dir, model={"lora": lora}, trainer={"max_steps": 3, "limit_val_batches": 0}))
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    kinds = {k.rsplit(".", 1)[-1] for k in ckpt["state_dict"]}
    assert kinds == {"lora_a", "lora_b", "lora_magnitude"}
    assert sum(k.endswith("lora_magnitude") for k in ckpt["state_dict"]) == 2 * 2
    groups, state = ckpt["optimizer_states"][0]["param_groups"], ckpt["optimizer_states"][0]["state"]
    dims = [[state[i]["exp_avg"].dim() for i in g["params"]] for g in groups]
    assert sorted(dims[0]) == [1] * 4 + [2] * 4 and dims[1] == [2] * 4


def script(name, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    """A DoRA run (dropout on: the correction's base term of the dropped input) of 2 steps on a bf16 Meta base."""
    return run_on_meta_base(tmp_path_factory, "dora", seed=3, lora={**DORA, "dropout": 0.1})


@pytest.mark.slow
def test_a_dora_run_merges_exports_generates_evaluates_and_resumes(dora_run, tmp_path, tokens):
    """Every script takes a DoRA adapter: merge.py (HF and Meta) computes the adapter's logits, the PEFT export loads
    back to the same model, generate.py and evaluate.py run, a resume continues it, and the llama.cpp LoRA form,
    which cannot hold DoRA, is refused in one line."""
    from llama_lora.trained_run import open_run
    from llama_lora.weights import build_model

    ckpt = dora_run / "ckpt" / "last.ckpt"
    unmerged = open_run(ckpt).build(torch.float32)
    with torch.no_grad():
        expected = unmerged(tokens)
    for fmt in ("hf", "meta"):
        proc = script("merge.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / fmt), "--format", fmt,
                      "--base_dtype", "fp32")
        assert proc.returncode == 0, proc.stderr[-2000:]
        with torch.no_grad():
            merged = build_model(checkpoint=tmp_path / fmt, plan=torch.float32)(tokens)
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    if importlib.util.find_spec("gguf"):  # the GGUF merge folds DoRA as the others do: its q weight is the HF one's
        import gguf

        proc = script("merge.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / "gguf-merged"), "--format",
                      "gguf", "--gguf_type", "f32")
        assert proc.returncode == 0, proc.stderr[-2000:]
        q = next(t for t in gguf.GGUFReader(str(tmp_path / "gguf-merged" / "model-f32.gguf")).tensors
                 if t.name == "blk.0.attn_q.weight")
        meta = build_model(checkpoint=tmp_path / "meta", plan=torch.float32).layers[0].attention.wq.weight
        assert torch.equal(torch.from_numpy(q.data.copy()).reshape(meta.shape), meta.detach())
    proc = script("export_adapter.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / "peft"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_peft = open_run(tmp_path / "peft", dora_run / "base").build(torch.float32)
    with torch.no_grad():
        assert torch.equal(from_peft(tokens), expected)
    proc = script("export_adapter.py", "--adapter", str(ckpt), "--out_dir", str(tmp_path / "gguf"), "--format", "gguf")
    assert proc.returncode == 2 and "merge it into the model instead" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    proc = script("generate.py", "--adapter", str(ckpt), "--greedy", "--max_new_tokens", "4", "Name a colour.")
    assert proc.returncode == 0 and "tokens/s" in proc.stderr, proc.stderr[-2000:]
    proc = script("evaluate.py", "--adapter", str(ckpt), "--out", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = fit(dora_run / "config.yaml", "--ckpt_path", "last", "--trainer.max_steps", "3")
    assert torch.load(dora_run / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"model": {"base_dtype": "nf4"}, "data": {"packing": True}},
                                   {"trainer": {"devices": 2, "strategy": "ddp"}, "data": {"micro_batch_size": 2}}])
def test_dora_trains_on_an_nf4_base_with_packing_and_under_ddp(tmp_path, cache_dir, extra):
    """QDoRA with packing, and DoRA on 2 DDP processes: the runs finish and the magnitudes move."""
    model = {"lora": {**DORA, "targets": ["wq", "wv"]}, **extra.get("model", {})}
    fit(write_tiny_config(tmp_path, cache_dir, model=model, trainer={"max_steps": 3, "limit_val_batches": 0,
                                                                     **extra.get("trainer", {})},
                          data=extra.get("data", {})))
    sd = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    from llama_lora.trained_run import open_run

    layer = open_run(tmp_path / "ckpt" / "last.ckpt").build(torch.float32).layers[0].attention.wq
    m = next(v for k, v in sd.items() if k.endswith("layers.0.attention.wq.lora_magnitude"))
    w = layer.weight.dequantize(torch.float32) if isinstance(layer.weight, NF4Weight) else layer.weight.float()
    assert not torch.allclose(m, w.norm(dim=1), rtol=1e-7, atol=0)
