"""Worker processes for the 2-process gloo tests (spawned, so they live in an importable module)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from helpers import all_clippers, tiny_model

STEPS = 12


def batch(step: int, rank: int) -> torch.Tensor:
    """Each rank's data for a step."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 6, generator=generator)


def loss_of(model: torch.nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
    """Every fifth step is a spike, so that every method clips."""
    return model(x).square().mean() * (30.0 if step % 5 == 4 else 1.0)


def full_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    grads = (p.grad for p in model.parameters())
    return [(g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone() for g in grads]


def wrap(model: torch.nn.Module, scenario: str) -> torch.nn.Module:
    if scenario == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if scenario == "fsdp2":
        mesh = init_device_mesh("cpu", (2,))
    else:  # hsdp: replicated across the 2 ranks, sharded over a group of 1
        mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def clip_worker(rank: int, world: int, init_file: str, scenario: str, granularity: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = []
    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    results = []
    for clipper in all_clippers(granularity):
        model = wrap(tiny_model(), scenario)
        clip_target = model.module if scenario == "ddp" else model
        record = {"norm": [], "threshold": [], "grads": [], "collectives": []}
        for step in range(STEPS):
            model.zero_grad()
            loss_of(model, batch(step, rank), step).backward()
            calls.clear()
            dist.all_reduce = counting_all_reduce
            try:
                stats = clipper.clip_(clip_target)
            finally:
                dist.all_reduce = original
            record["collectives"].append(list(calls))
            record["norm"].append(stats.norm.clone())
            record["threshold"].append(stats.threshold.clone())
            record["grads"].append(full_grads(model))
        record["config"] = clipper.config()
        results.append(record)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
