"""Small models, gradient makers and independent references shared by the tests."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from clipintegrations import AutoClip, FixedClip, PercentileClip, ZClip

GRANULARITIES = ["global", "layer", "parameter"]


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def all_clippers(granularity: str = "global", **overrides) -> list:
    """One clipper of each method, with short warm-ups so that every path runs in a few steps."""
    return [
        FixedClip(max_norm=0.5, granularity=granularity, **overrides),
        AutoClip(percentile=10, granularity=granularity, **overrides),
        AutoClip(percentile=90, history_size=5, granularity=granularity, **overrides),
        PercentileClip(percentile=50, window=6, warmup_steps=3, factor=1.5, granularity=granularity, **overrides),
        ZClip(alpha=0.9, z_thresh=1.0, warmup_steps=3, granularity=granularity, **overrides),
    ]


def backward(model: nn.Module, step: int, seed: int = 0) -> None:
    """Fresh gradients whose scale wanders over orders of magnitude, with spikes."""
    generator = torch.Generator().manual_seed(seed * 100_003 + step)
    model.zero_grad()
    x = torch.randn(5, 6, generator=generator).to(next(model.parameters()).dtype)
    scale = math.exp(torch.randn((), generator=generator).item()) * (30.0 if step % 7 == 6 else 1.0)
    (model(x).square().sum() * scale).backward()


def unit_norms_reference(model: nn.Module, granularity: str) -> np.ndarray:
    """Per-unit L2 norms in float64 numpy, grouped by hand."""
    if granularity == "global":
        groups = [[p for p in model.parameters()]]
    elif granularity == "parameter":
        groups = [[p] for p in model.parameters()]
    else:
        groups = [list(m.parameters(recurse=False)) for m in model.modules() if list(m.parameters(recurse=False))]
    return np.array(
        [math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in g if p.grad is not None)) for g in groups]
    )


def zclip_reference(norms: list[float], alpha: float, z_thresh: float, warmup: int) -> list[float]:
    """Thresholds of the ZClip paper's algorithm (zscore mode, adaptive scaling), in plain Python floats."""
    buffer, mean, var, thresholds = [], None, None, []
    for g in norms:
        if mean is None:
            thresholds.append(math.inf)
            buffer.append(g)
            if len(buffer) == warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            continue
        std = var**0.5
        z = (g - mean) / (std + 1e-6)
        if z > z_thresh:
            threshold = mean + z_thresh**2 * std / z
            kept = threshold
        else:
            threshold = mean + z_thresh * (std + 1e-6)
            kept = g
        thresholds.append(threshold)
        mean = alpha * mean + (1 - alpha) * kept
        var = alpha * var + (1 - alpha) * (kept - mean) ** 2
    return thresholds
