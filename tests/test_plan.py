"""The run plan: every dtype and "auto" decided once, and the paths between them (QLoRA on a half-precision
checkpoint computing in fp32, generation during training, merge from an NF4 base)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, fit, write_tiny_config

from llama_lora.config import LlamaConfig
from llama_lora.weights import build_model, save_hf, save_meta

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # oneDNN and ATen as on an AVX2-only CPU


def script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def half_base(tmp_path, layout: str):
    """A tiny base as users download it: Meta's bf16 consolidated.00.pth, or HF's fp16 safetensors."""
    config = LlamaConfig.from_name("tiny")
    dtype = torch.bfloat16 if layout == "meta" else torch.float16
    sd = build_model(config, plan=dtype, seed=5).state_dict()
    return (save_meta if layout == "meta" else save_hf)(sd, config, tmp_path / f"base-{layout}")


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_qlora_computing_in_fp32_on_a_half_precision_checkpoint_generates(tmp_path, cache_dir, layout):
    """The README's CPU QLoRA recipe on an AVX2 CPU: an NF4 base from a bf16 (Meta) or fp16 (HF) checkpoint, fp32
    compute. Generation during training (SampleGenerations, InstructionAccuracy) and generate.py with precision auto
    on an AVX2 CPU must run: the KV cache computes in the plan's dtype, not the embedding's."""
    base = half_base(tmp_path, layout)
    config = write_tiny_config(tmp_path, cache_dir, model={"base_dtype": "nf4", "checkpoint_dir": str(base)},
                               trainer={"precision": "32-true", "max_steps": 2, "val_check_interval": 2,
                                        "limit_val_batches": 1})
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"] += [
        {"class_path": "llama_lora.callbacks.SampleGenerations", "init_args": {"prompts": ["Name a colour."],
                                                                               "max_new_tokens": 4}},
        {"class_path": "llama_lora.callbacks.InstructionAccuracy", "init_args": {"max_new_tokens": 2, "show": 1}}]
    config.write_text(yaml.safe_dump(cfg))
    proc = fit(config)
    assert "Tuned model (after)" in proc.stdout
    proc = script("generate.py", "--adapter", str(tmp_path / "ckpt" / "last.ckpt"), "--greedy", "--max_new_tokens",
                  "3", "Name a colour.", env=AVX2)
    assert proc.returncode == 0 and "tokens/s" in proc.stderr, proc.stderr[-3000:]


def test_the_package_imports_under_a_half_precision_default_dtype():
    """Module-level tensors (NF4's code book, its lookup tables) carry explicit dtypes."""
    code = ("import torch; torch.set_default_dtype(torch.bfloat16); import llama_lora.module, llama_lora.export; "
            "from llama_lora.quant import quantize; w = torch.randn(64, 64, dtype=torch.float32); "
            "assert torch.equal(quantize(w).dequantize(torch.float32), "
            "(torch.set_default_dtype(torch.float32), quantize(w).dequantize(torch.float32))[1])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----- the rules: precision that fits the hardware, and every dtype from it -----

@pytest.fixture(params=[True, False], ids=["native-bf16", "avx2-only"])
def cpu_kind(request, monkeypatch):
    """The CPU capability probe, mocked both ways: the rules are tested on either kind whatever CPU runs the test."""
    import llama_lora.plan as plan

    monkeypatch.setattr(plan, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_auto_precision_on_a_cpu_follows_native_bf16(cpu_kind):
    from llama_lora.plan import make_plan, resolve_precision

    precision, why = resolve_precision("auto", "cpu")
    assert precision == ("bf16-mixed" if cpu_kind else "32-true")
    assert ("natively" if cpu_kind else "AVX2 only") in why
    plan = make_plan("cpu")
    assert plan.compute_dtype == (torch.bfloat16 if cpu_kind else torch.float32) and plan.autocast == cpu_kind
    assert plan.linear_dtype == plan.compute_dtype  # the frozen base in the dtype the compute runs in
    assert resolve_precision("16-mixed", "cpu")[0] == "bf16-mixed"  # no fp16 autocast on a CPU, as Lightning does
    assert resolve_precision(32, "cpu")[0] == "32-true" and resolve_precision("bf16", "cpu")[0] == "bf16-mixed"
    with pytest.raises(ValueError, match="64-true.* is not supported"):
        resolve_precision("64-true", "cpu")


@pytest.mark.parametrize("ampere", [True, False])
def test_auto_precision_on_cuda_is_bf16_from_ampere_else_fp16(monkeypatch, ampere):
    from llama_lora.plan import make_plan, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: ampere)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    assert resolve_precision("auto", "cuda")[0] == ("bf16-mixed" if ampere else "16-mixed")
    plan = make_plan("cuda")
    assert plan.compute_dtype == (torch.bfloat16 if ampere else torch.float16)
    assert plan.packed_attention in ("varlen", "mask")  # flash varlen where torch has it, for half precision


# (precision, base_dtype, lora) -> compute, autocast, block linears, embedding, norms/output, LoRA, activations
PLANS = {
    ("bf16-mixed", "auto", True): ("bf16", True, "bf16", "bf16", "bf16", "fp32", "bf16"),
    ("32-true", "auto", True): ("fp32", False, "fp32", "fp32", "fp32", "fp32", "fp32"),
    ("32-true", "bf16", True): ("bf16", False, "bf16", "bf16", "bf16", "fp32", "bf16"),  # no autocast: bf16 weights
    ("bf16-mixed", "auto", False): ("bf16", True, "fp32", "fp32", "fp32", "fp32", "fp32"),  # fp32 masters
    ("bf16-true", "fp32", True): ("bf16", False, "bf16", "bf16", "bf16", "bf16", "bf16"),  # Lightning converts all
    ("bf16-mixed", "nf4", True): ("bf16", True, "bf16", "bf16", "bf16", "fp32", "bf16"),
    ("32-true", "nf4", True): ("fp32", False, "fp32", "bf16", "fp32", "fp32", "fp32"),  # embedding kept in bf16
    ("16-mixed", "auto", True): ("bf16", True, "bf16", "bf16", "bf16", "fp32", "bf16"),  # a CPU: bf16-mixed
}


@pytest.mark.parametrize("settings", list(PLANS), ids=lambda s: "-".join(map(str, s)))
def test_every_dtype_of_a_run_comes_from_one_plan(settings):
    from llama_lora.plan import DTYPE_NAMES, RunPlan, make_plan

    plan = make_plan("cpu", *settings[:2], lora=settings[2])
    got = (DTYPE_NAMES[plan.compute_dtype], plan.autocast, DTYPE_NAMES[plan.linear_dtype],
           DTYPE_NAMES[plan.embedding_dtype], DTYPE_NAMES[plan.norm_dtype], DTYPE_NAMES[plan.lora_dtype],
           DTYPE_NAMES[plan.activation_dtype])
    assert got == PLANS[settings]
    assert plan.kv_cache_dtype == plan.compute_dtype and plan.quantization == (
        "nf4" if settings[1] == "nf4" else None)
    assert RunPlan.from_dict(plan.to_dict()) == plan  # what a checkpoint saves is the plan
    assert plan.describe().startswith(f"Plan: cpu, {plan.precision}") and "\n" not in plan.describe()


def test_what_cannot_run_is_refused_by_the_plan_in_one_line():
    from llama_lora.plan import make_plan

    with pytest.raises(ValueError, match="needs model.lora"):
        make_plan("cpu", "32-true", "nf4", lora=False)
    with pytest.raises(ValueError, match="under 16-mixed needs base_dtype: fp32"):
        make_plan("cuda", "16-mixed", "fp16", lora=False)


def test_explicit_half_precision_on_a_cpu_that_emulates_it_warns(cpu_kind):
    from llama_lora.plan import make_plan

    warnings = make_plan("cpu", "bf16-mixed", "bf16").warnings
    assert bool(warnings) != cpu_kind
    if not cpu_kind:
        assert "bf16-mixed with model.base_dtype bf16 on this CPU" in warnings[0] and "about 1 GFLOP/s" in warnings[0]
        assert "auto (fp32 here)" in warnings[0]
    assert "fp16 matmuls are emulated" in make_plan("cpu", "16-true").warnings[0] or not cpu_kind
    assert make_plan("cpu", "32-true", "fp32").warnings == () and make_plan("cpu").warnings == ()


def test_trainer_and_module_read_one_plan(cpu_kind):
    from llama_lora.module import LlamaLoRAModule
    from llama_lora.trainer import Trainer

    trainer = Trainer(accelerator="cpu", precision="auto", logger=False, enable_checkpointing=False)
    assert trainer.precision == ("bf16-mixed" if cpu_kind else "32-true")
    plan = LlamaLoRAModule(model="tiny").plan_for(trainer)
    assert plan.precision == trainer.precision and ("natively" if cpu_kind else "AVX2 only") in plan.reason
    assert plan.linear_dtype == (torch.bfloat16 if cpu_kind else torch.float32)  # the dtype the compute runs in
    full = LlamaLoRAModule(model="tiny", lora=None).plan_for(trainer)
    assert full.linear_dtype == torch.float32 and full.full_finetune  # trained weights: fp32 masters
    with pytest.raises(ValueError, match="use_distributed_sampler must be false"):
        Trainer(accelerator="cpu", use_distributed_sampler=True)


SOURCES = [p for d in ("src", "scripts", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def test_only_the_plan_probes_the_hardware_or_reads_autocast():
    """The plan is the only place "auto" is resolved: nothing else asks the CPU or GPU what it computes natively, or
    asks autocast what dtype a call computes in (the plan says)."""
    import re

    probes = re.compile(r"_is_mkldnn_bf16_supported|cpu_has_native_bf16|is_bf16_supported|get_autocast_dtype|"
                        r"is_autocast_enabled")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p.name != "plan.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if probes.search(line)]
    assert not offenders, offenders


def test_the_package_has_no_import_circles():
    """The graph of the package's internal imports, at module level and inside functions alike (a lazy import that
    goes back up the graph is a circle all the same), has no cycle, and the modules others build on import alone in a
    fresh interpreter."""
    import ast

    package = ROOT / "src" / "llama_lora"
    modules = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = base.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{anchor}.{node.module}" if node.module else anchor
                deps |= {t for t in (target, *(f"{target}.{a.name}" for a in node.names)) if t in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama_lora"):
                deps |= {t for t in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if t in modules}
        graph[name] = deps - {name}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph[node]:
            assert state.get(dep) != 1, f"import circle: {' -> '.join([*path, node, dep])}"
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
    for name in ("llama_lora.plan", "llama_lora.layout", "llama_lora.weights", "llama_lora.data"):  # leaves
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr[-1000:])
