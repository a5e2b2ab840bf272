"""Several machines, on this one: two torchrun "nodes" of one process each (a c10d rendezvous on loopback,
``--trainer.num_nodes 2``), as docs/scaling.md launches them on two machines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FIT, FSDP2, ROOT, fit, free_port, lora_weights, needs_cpu_fsdp2, tiny_family, write_tiny_config


def two_nodes(config: Path, *args: str) -> list[subprocess.Popen]:
    """Start the two nodes' torchrun agents (node 0 hosts the rendezvous), one fit.py process each."""
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf",
                              f"is_host={int(node == 0)}", "--local-addr", "127.0.0.1", "--max-restarts", "0",
                              str(FIT), "--config", str(config), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for node in (0, 1)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, stderr = p.communicate(timeout=600)
        out.append((p.returncode, stderr))
    return out


def _base(tmp_path: Path) -> Path:
    from llama_lora.weights import build_model, save_meta

    config = tiny_family("llama", hidden_dim=192)  # rows of whole NF4 blocks (FSDP2 splits an NF4 weight by rows)
    save_meta(build_model(config, plan=torch.bfloat16, seed=3).state_dict(), config, tmp_path / "base", 2)
    return tmp_path / "base"


@pytest.mark.slow
@needs_cpu_fsdp2
@pytest.mark.parametrize("strategy,base_dtype", [("ddp", "fp32"), ("fsdp2", "fp32"), ("fsdp2", "nf4")])
def test_two_nodes_launched_by_torchrun_train_what_one_process_trains(tmp_path, cache_dir, strategy, base_dtype):
    """Two nodes x one process, micro-batch 2, against one process with micro-batch 4: the LoRA weights after 4
    steps agree within 1e-4, for DDP, FSDP2 and FSDP2 on an NF4 base (each node quantizing its own rows)."""
    base = _base(tmp_path)
    model = {"checkpoint_dir": str(base), "model": None, "base_dtype": base_dtype}
    common = {"max_steps": 4, "limit_val_batches": 0}
    nodes, single = tmp_path / "nodes", tmp_path / "single"
    nodes.mkdir(), single.mkdir()
    config = write_tiny_config(nodes, cache_dir, model=model, data={"micro_batch_size": 2},
                               trainer={**common, "devices": 1, "num_nodes": 2,
                                        "strategy": FSDP2 if strategy == "fsdp2" else strategy})
    results = finish(two_nodes(config))
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    fit(write_tiny_config(single, cache_dir, model=model, data={"micro_batch_size": 4}, trainer=common))
    a, b = lora_weights(nodes / "ckpt" / "last.ckpt"), lora_weights(single / "ckpt" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.all(v == 0) for k, v in a.items() if k.endswith("lora_b"))


@pytest.mark.slow
def test_sigterm_to_one_node_stops_both_at_the_same_step_with_a_checkpoint(tmp_path, cache_dir):
    """SIGTERM to the second node's training process (a preempted machine): both nodes finish the optimizer step,
    agree to stop at the same step, last.ckpt is saved there, and the run resumes from it on two nodes again."""
    import psutil

    config = write_tiny_config(tmp_path, cache_dir, data={"micro_batch_size": 2},
                               trainer={"max_steps": 200, "val_check_interval": 1000, "limit_val_batches": 0,
                                        "devices": 1, "num_nodes": 2, "strategy": "ddp"})
    procs = two_nodes(config)
    deadline = time.time() + 300
    while not (tmp_path / "ckpt" / "step00004.ckpt").exists() and time.time() < deadline:
        assert all(p.poll() is None for p in procs), finish(procs)
        time.sleep(0.05)
    worker = next(c for c in psutil.Process(procs[1].pid).children(recursive=True)
                  if "fit.py" in " ".join(c.cmdline()))
    worker.terminate()  # SIGTERM
    results = finish(procs)
    steps = [re.findall(r"Stopped by SIGTERM at step (\d+)", " ".join(stderr.split())) for _, stderr in results]
    assert all(len(s) == 1 for s in steps) and steps[0] == steps[1], [s[-3000:] for _, s in results]
    stopped = int(steps[0][0])
    assert 4 <= stopped < 200
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["global_step"] == stopped
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["max_steps"] = target = stopped + 2 - stopped % 2  # a step the checkpoints (every 2) are saved at
    config.write_text(yaml.safe_dump(cfg))
    results = finish(two_nodes(config, "--ckpt_path", "last"))
    assert all(code == 0 for code, _ in results), results[1][1][-3000:]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == target
