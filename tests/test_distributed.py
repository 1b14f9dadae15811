"""Rule 3 on 2 real gloo processes: one true norm on every rank, equal to a single-process run."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from distributed_workers import STEPS, batch, clip_worker, loss_of
from helpers import tiny_model

from clipintegrations import build_clipper

pytestmark = pytest.mark.distributed

# scenario -> collectives one clip_ must issue: FSDP2 and HSDP sum over the shard group once,
# DDP gradients are already averaged and need none.
EXPECTED_COLLECTIVES = {"fsdp2": 1, "hsdp": 1, "ddp": 0}


def single_process_reference(config: dict) -> dict:
    """The same clipper on one process, on the gradient of the mean loss over both ranks' data."""
    model, clipper = tiny_model(), build_clipper(config)
    record = {"norm": [], "threshold": [], "grads": []}
    for step in range(STEPS):
        model.zero_grad()
        loss_of(model, torch.cat([batch(step, 0), batch(step, 1)]), step).backward()
        stats = clipper.clip_(model)
        record["norm"].append(stats.norm)
        record["threshold"].append(stats.threshold)
        record["grads"].append([p.grad.clone() for p in model.parameters()])
    return record


@pytest.mark.parametrize("granularity", ["global", "layer"])
@pytest.mark.parametrize("scenario", ["fsdp2", "hsdp", "ddp"])
def test_every_rank_clips_with_the_single_process_norm(tmp_path, scenario, granularity):
    init_file = tmp_path / "init"
    mp.spawn(clip_worker, args=(2, str(init_file), scenario, granularity, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank0, rank1 in zip(*ranks):
        reference = single_process_reference(rank0["config"])
        for step in range(STEPS):
            # identical on every rank, to the bit
            assert torch.equal(rank0["norm"][step], rank1["norm"][step])
            assert torch.equal(rank0["threshold"][step], rank1["threshold"][step])
            # equal to the single-process run, within float reassociation
            torch.testing.assert_close(rank0["norm"][step], reference["norm"][step], rtol=1e-5, atol=0)
            torch.testing.assert_close(rank0["threshold"][step], reference["threshold"][step], rtol=1e-5, atol=0)
            for got, expected in zip(rank0["grads"][step], reference["grads"][step]):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
            # one fused all-reduce (a vector when per layer), or none when replicated
            collectives = rank0["collectives"][step]
            assert len(collectives) == EXPECTED_COLLECTIVES[scenario], collectives
            units = 1 if granularity == "global" else 3
            assert all(shape == (units,) for shape in collectives)
        clipped = [bool((n > t).any()) for n, t in zip(rank0["norm"], rank0["threshold"])]
        assert any(clipped), f"{rank0['config']} never clipped: the test would not see a wrong scale"
