"""FSDP2 on an NF4 base in one process (a mesh of 1: what one GPU can check): the sharded build's logits against the
unsharded NF4 model's, on the same random weights. Prints one JSON line.

    python benchmarks/fsdp_nf4_check.py --device cuda --shape llama2-7b      (gpu_check.sh)
    python benchmarks/fsdp_nf4_check.py --device cpu --shape small           (a CPU dry run)
"""

from __future__ import annotations

import argparse
import json
import os
import socket

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from llama_lora.config import LlamaConfig
from llama_lora.plan import make_plan
from llama_lora.weights import build_model, fill_shards, meta_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--precision", default="auto")
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args()
    device = torch.device(args.device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = LlamaConfig.from_name(args.shape)
    plan = make_plan(device, args.precision, "nf4")
    tokens = torch.arange(args.seq, device=device).view(1, -1) * 7 % config.vocab_size
    with torch.no_grad(), plan.autocast_context():
        whole = build_model(config, plan=plan, device=device, seed=0)
        expected = whole(tokens).float()
        del whole
        sharded = meta_model(config, plan)
        for layer in sharded.layers:
            fully_shard(layer, mesh=init_device_mesh(device.type, (1,)))
        fully_shard(sharded, mesh=init_device_mesh(device.type, (1,)))
        sharded.to_empty(device=device)
        fill_shards(sharded, None, seed=0)
        got = sharded(tokens).float()
        again = sharded(tokens).float()  # the 4-bit buffers freed after the first forward and gathered again
    diff = max(float((got - expected).abs().max()), float((again - expected).abs().max()))
    print(json.dumps({"cell": f"FSDP2 + NF4, 1 rank, {args.shape}", "device": str(device), "plan": plan.describe(),
                      "max_abs_logit_difference": diff, "equal": diff == 0.0,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
