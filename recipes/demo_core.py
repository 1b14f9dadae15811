"""Core demo: a plain PyTorch loop with outlier batches, trained with and without adaptive clipping.

    python recipes/demo_core.py                      # AutoClip(percentile=10), 400 steps
    python recipes/demo_core.py --method zclip --steps 600

A small MLP fits a smooth function; every 50th batch has corrupted targets (x1000), the kind of
outlier that blows up a run. The same seeds train once with no clipping and once with the chosen
clipper; the script prints the held-out loss of each and a trace of norm vs threshold, and writes
``runs/demo_core/clip_history.json``.

Features: the core API with no trainer (``clipper.clip_(model)`` between ``backward`` and
``step``), ``build_clipper`` from a method name, and the returned statistics as tensors.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from clipintegrations import build_clipper


def data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 4, generator=generator) * 4 - 2
    return x, torch.sin(x[:, :1] * x[:, 1:2]) + 0.5 * x[:, 2:3] - x[:, 3:4] ** 2 / 4


def train(clipper, steps: int, lr: float, seed: int) -> tuple[float, list[dict]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    trace = []
    for step in range(steps):
        x, y = data(32, generator)
        if step % 50 == 49:
            y = y * 1000  # an outlier batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if clipper is not None:
            stats = clipper.clip_(model)
            trace.append(
                {
                    "step": step,
                    "norm": float(stats.norm),
                    "threshold": float(stats.threshold),
                    "clipped": bool(stats.clipped),
                }
            )
        optimizer.step()
    x, y = data(2048, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        held_out = torch.nn.functional.mse_loss(model(x), y).item()
    return held_out, trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="autoclip", help="autoclip, percentile, zclip or fixed")
    parser.add_argument("--percentile", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo_core")
    args = parser.parse_args()

    config = {"method": args.method}
    if args.method in ("autoclip", "percentile"):
        config["percentile"] = args.percentile
    if args.method == "fixed":
        config["max_norm"] = 1.0
    clipper = build_clipper(config)

    unclipped, _ = train(None, args.steps, args.lr, args.seed)
    clipped, trace = train(clipper, args.steps, args.lr, args.seed)
    _, baseline_y = data(2048, torch.Generator().manual_seed(args.seed + 1))
    predict_mean = baseline_y.var(unbiased=False).item()

    print(f"{'step':>6} {'grad norm':>12} {'threshold':>12}  clipped")
    for row in trace[:: max(1, len(trace) // 16)] + [r for r in trace if r["step"] % 50 == 49][:2]:
        print(f"{row['step']:>6} {row['norm']:>12.4g} {row['threshold']:>12.4g}  {row['clipped']}")
    print(f"\nheld-out MSE after {args.steps} steps (outlier batch every 50):")
    print(f"  predict the mean:   {predict_mean:.4f}")
    print(f"  no clipping:        {unclipped:.4f}" + ("  (diverged)" if not math.isfinite(unclipped) else ""))
    print(f"  {clipper!r}: {clipped:.4f}")
    print(f"  clipped on {sum(r['clipped'] for r in trace)} of {len(trace)} steps")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clip_history.json").write_text(json.dumps({"config": clipper.config(), "trace": trace}))
    print(f"clip history: {out / 'clip_history.json'}")


if __name__ == "__main__":
    main()
