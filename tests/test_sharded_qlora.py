"""QLoRA under FSDP2: an NF4 base split by rows over the ranks (quant.NF4Weight's FSDP2 extension points), each rank
quantizing only its own rows of the checkpoint, trains as DDP (and so one process) does, resumes exactly, and holds
about 1/W of the 4-bit bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import (
    FSDP2,
    WholeReads,
    fit,
    free_port,
    lora_weights,
    max_relative_difference,
    needs_cpu_fsdp2,
    scalars,
    tiny_family,
    write_tiny_config,
)

from llama_lora.memory import NF4_BITS
from llama_lora.quant import NF4Weight, empty, quantize


def _shards_equal_one_process(rank: int, world: int, port: int, shapes: list[tuple[int, int]]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for rows, cols in shapes:
            w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * torch.logspace(
                -2, 1, rows)[:, None]  # block scales far apart: a wrong group factor shows
            whole = quantize(w)
            with torch.device("meta"):
                layer = torch.nn.Linear(cols, rows, bias=False)
            layer.weight = torch.nn.Parameter(empty((rows, cols), torch.float32, "meta"), requires_grad=False)
            fully_shard(layer, mesh=mesh)
            layer.to_empty(device="cpu")
            local = layer.weight._local_tensor
            chunk = -(-rows // world)
            start = min(rank * chunk, rows)
            stop = min(start + chunk, rows)
            # this rank's rows quantized alone, the whole weight's statistics reduced: one process's bits
            mine = quantize(w[start:stop], first_block=start * cols // 64, total_blocks=rows * cols // 64,
                            group=mesh.get_group())
            ours = whole.rows(start, stop)
            for key in ("packed", "scales", "factor", "mean"):
                assert torch.equal(getattr(mine, key), getattr(ours, key)), (rows, cols, key)
            local.copy_(mine)
            assert local.nbytes_stored <= ours.nbytes_stored + 4 * (whole.factor.numel() + 1) + 64
            # forward and backward through the all-gathered 4-bit weight: one process's, exactly
            x = torch.randn(3, cols, generator=torch.Generator().manual_seed(0), requires_grad=True)
            y = layer(x)
            y.square().sum().backward()
            x0 = x.detach().clone().requires_grad_()
            y0 = torch.nn.functional.linear(x0, whole.dequantize())
            y0.square().sum().backward()
            assert torch.equal(y, y0) and torch.equal(x.grad, x0.grad), (rows, cols)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@needs_cpu_fsdp2
def test_nf4_shards_quantize_and_compute_as_one_process():
    """3 ranks, uneven splits (1000 rows: 334, 334, 332; a double-quantization group of 256 blocks across two
    ranks) and an empty shard (4 rows: 2, 2, 0): each rank's own rows quantize to the bits of the whole weight's
    rows, and a forward and backward through FSDP2's all-gathered NF4 weight equal one process's bit for bit."""
    torch.multiprocessing.spawn(_shards_equal_one_process, args=(3, free_port(), [(1000, 128), (4, 64), (96, 192)]),
                                nprocs=3)


WIDE = {"hidden_dim": 192}  # tiny's w2 rows are 176 values wide: not whole blocks of 64


class NF4ShardReport(WholeReads):
    """At the start of training: this rank's stored NF4 bytes against the whole NF4 base's, the checkpoint tensors it
    read whole, and its logits on a fixed batch (rank{r}.pt in ``out_dir``)."""

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        local = [p._local_tensor if isinstance(p, DTensor) else p for p in pl_module.model.parameters()]
        nf4 = [(p, t) for p, t in zip(pl_module.model.parameters(), local) if isinstance(t, NF4Weight)]
        tokens = torch.arange(24).view(2, 12) * 7 % 512
        with torch.no_grad():
            logits = pl_module.model(tokens.to(pl_module.device))
        torch.save({"local": sum(t.nbytes_stored for _, t in nf4), "n": len(nf4),
                    "whole": sum(p.numel() * NF4_BITS / 8 for p, _ in nf4),
                    "logits": logits.float().cpu(), "full_reads": len(self.full_reads)},
                   Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def _run(d: Path, cache_dir: Path, base: Path, ranks: int, strategy, micro: int, model: dict, *args: str,
         **trainer) -> Path:
    d.mkdir()
    strategy = ({**FSDP2, "init_args": {**FSDP2["init_args"], "data_parallel_size": ranks}}
                if strategy == "fsdp" else strategy)
    devices = {"devices": ranks, "strategy": strategy} if ranks > 1 else {}
    config = write_tiny_config(d, cache_dir, trainer={"max_steps": 4, "limit_val_batches": 0, **devices, **trainer},
                               model={"checkpoint_dir": str(base), "model": None, "base_dtype": "nf4", **model},
                               data={"micro_batch_size": micro})
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "test_sharded_qlora.NF4ShardReport",
                                        "init_args": {"out_dir": str(d)}})
    config.write_text(yaml.safe_dump(cfg))
    fit(config, *args)
    return d


@pytest.mark.slow
@needs_cpu_fsdp2
@pytest.mark.parametrize("ranks,dora,precision", [(2, False, "32-true"), (3, True, "bf16-mixed")],
                         ids=["2-ranks-lora", "3-ranks-dora-bf16-mixed"])
def test_fsdp2_on_an_nf4_base_computes_what_ddp_computes(tmp_path, cache_dir, ranks, dora, precision):
    """QLoRA (and QDoRA) under FSDP2, from a bf16 Meta checkpoint in 2 files: each rank holds about 1/W of the NF4
    bytes and reads no tensor whole; its logits are one process's; the per-rank losses and trained weights are DDP's
    on the same per-rank batches (each DDP rank quantizes its whole copy), and one process's with the same global
    batch as closely as DDP's are. The 2-rank run is stopped at step 2 and resumed, and still ends there."""
    from llama_lora.weights import build_model, save_meta

    config = tiny_family("llama", **WIDE)
    save_meta(build_model(config, plan=torch.bfloat16, seed=3).state_dict(), config, tmp_path / "base", 2)
    # the 3-rank run also with checkpointing: the recomputed forward gathers the 4-bit weights again
    lora = {"lora": {"targets": ["wq", "wv", "w2"], "r": 4, "alpha": 8, "dropout": 0.0, "use_dora": dora},
            "gradient_checkpointing": ranks == 3}
    common = {"precision": precision}
    runs = {}
    stop = ("--trainer.max_steps", "2") if ranks == 2 else ()  # the 2-rank run stopped at step 2, resumed to 4
    runs["fsdp"] = _run(tmp_path / "fsdp", cache_dir, tmp_path / "base", ranks, "fsdp", 2, lora, *stop, **common)
    reports = [torch.load(runs["fsdp"] / f"rank{r}.pt", weights_only=True) for r in range(ranks)]  # at step 0
    if stop:
        fit(runs["fsdp"] / "config.yaml", "--ckpt_path", "last")
    runs["ddp"] = _run(tmp_path / "ddp", cache_dir, tmp_path / "base", ranks, "ddp", 2, lora, **common)
    runs["single"] = _run(tmp_path / "single", cache_dir, tmp_path / "base", 1, None, 2 * ranks, lora, **common)

    single = torch.load(runs["single"] / "rank0.pt", weights_only=True)
    for report in reports:
        assert report["n"] == 7 * config.n_layers
        assert 0.9 / ranks * report["whole"] <= report["local"] <= 1.1 / ranks * report["whole"], report
        assert report["full_reads"] == 0, "a rank read whole tensors of the checkpoint"
        torch.testing.assert_close(report["logits"], single["logits"], rtol=0, atol=0)
    losses = {n: scalars(d / "logs", "train/loss_step") for n, d in runs.items()}
    assert len(losses["fsdp"]) == 4 and losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-6)
    w = {n: lora_weights(d / "ckpt" / "last.ckpt") for n, d in runs.items()}
    assert any(k.endswith("lora_magnitude") for k in w["fsdp"]) == dora
    assert max_relative_difference(w["fsdp"], w["ddp"]) < 1e-5
    assert max_relative_difference(w["fsdp"], w["single"]) <= 1.01 * max_relative_difference(
        w["ddp"], w["single"]) + 1e-5


def test_an_nf4_weight_fsdp2_cannot_split_by_rows_is_refused_in_one_line(tmp_path, cache_dir):
    """Tiny's w2 rows are 176 values wide, not whole blocks of 64: FSDP2 cannot split them by rows. Refused before
    any rank starts, in one line that says what to use."""
    strategy = FSDP2
    proc = fit(write_tiny_config(tmp_path, cache_dir, trainer={"devices": 2, "strategy": strategy},
                                 model={"base_dtype": "nf4"}), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "layers.0.feed_forward.w2.weight" in errors[0] and "use ddp" in errors[0]
    assert not (tmp_path / "ckpt").exists()


def test_the_meta_model_for_fsdp2_keeps_every_weight_trainable():
    """FSDP2's meta-device build leaves the base trainable (full fine-tuning, model.lora null, trains it; with LoRA
    the module freezes it); NF4 weights, frozen by nature, are the exception."""
    from llama_lora.plan import make_plan
    from llama_lora.weights import meta_model

    config = tiny_family("llama", **WIDE)
    full = meta_model(config, make_plan("cpu", "32-true", "fp32", lora=False))
    assert all(p.requires_grad for p in full.parameters())
    qlora = meta_model(config, make_plan("cpu", "32-true", "nf4"))
    assert all(isinstance(p, NF4Weight) != p.requires_grad for p in qlora.parameters())
