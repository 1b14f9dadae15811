"""What one clip step costs, as a ratio to ``torch.nn.utils.clip_grad_norm_`` timed in the same run.

    python benchmarks/clip_overhead.py                      # ~10M parameters in 100 tensors
    python benchmarks/clip_overhead.py --histories 100 1000 --rounds 3   # quicker

Every candidate is timed in interleaved rounds (this machine is shared and noisy) and the median
of all its calls is reported. Histories are filled through ``load_state_dict`` so that a history
of 100,000 norms needs no 100,000 steps. ``paper-style AutoClip`` is the reference code of the
AutoClip paper: a Python list of norms, ``.item()`` per parameter and ``numpy.percentile``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.nn.utils import clip_grad_norm_

from clipintegrations import AutoClip, Clipper, FixedClip, PercentileClip, ZClip


def make_model(width: int, layers: int) -> torch.nn.Module:
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def with_history(clipper: Clipper, model: torch.nn.Module, length: int) -> Clipper:
    """A clipper whose history already holds ``length`` norms (per unit)."""
    clipper.clip_(model)  # learn the units
    units = len(clipper.unit_names)
    state = clipper.state_dict()
    if "values" in state["state"]:  # full history
        values = torch.rand(units, length).sort(dim=1).values
        state["state"] = {"values": values, "counts": torch.full((units,), length)}
    elif "ring" in state["state"]:
        window = state["state"]["ring"].shape[1]
        state["state"] = {"ring": torch.rand(units, window), "written": torch.full((units,), length)}
    clipper.load_state_dict(state)
    return clipper


class PaperAutoClip:
    """The AutoClip paper's reference implementation, for comparison."""

    def __init__(self, percentile: float, length: int) -> None:
        self.percentile = percentile
        self.history = list(np.random.rand(length))

    def clip_(self, model: torch.nn.Module) -> None:
        total = 0.0
        for p in model.parameters():
            if p.grad is not None:
                total += p.grad.data.norm(2).item() ** 2
        self.history.append(total**0.5)
        clip_grad_norm_(model.parameters(), float(np.percentile(self.history, self.percentile)))


def time_interleaved(candidates: dict[str, Callable[[], None]], rounds: int, calls: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, step in candidates.items():
            step()  # warm
            for _ in range(calls):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--histories", type=int, nargs="+", default=[100, 10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--nonfinite", nargs="+", default=["keep", "zero"], help="policies to time")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    model = make_model(args.width, args.layers)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    print(
        f"model: {n_params / 1e6:.1f}M parameters in {len(params)} tensors; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    candidates: dict[str, Callable[[], None]] = {"clip_grad_norm_ (baseline)": lambda: clip_grad_norm_(params, 1.0)}
    for policy in args.nonfinite:
        configs = {
            "FixedClip": (lambda **kw: FixedClip(1.0, **kw), 0),
            "ZClip": (ZClip, 0),
            "PercentileClip w=1000": (PercentileClip, 1000),
            "AutoClip history_size=1000": (lambda **kw: AutoClip(history_size=1000, **kw), 1000),
            **{f"AutoClip h={n}": (AutoClip, n) for n in args.histories},
        }
        for name, (make, length) in configs.items():
            for granularity in ("global", "layer"):
                clipper = with_history(make(granularity=granularity, nonfinite=policy), model, length)
                candidates[f"{name} {granularity} nonfinite={policy}"] = lambda c=clipper: c.clip_(model)
    for length in args.histories:
        paper = PaperAutoClip(10, length)
        candidates[f"paper-style AutoClip h={length}"] = lambda c=paper: c.clip_(model)

    medians = time_interleaved(candidates, args.rounds, args.calls)
    baseline = medians["clip_grad_norm_ (baseline)"]
    print(f"\n{'candidate':<48} {'median ms':>10} {'x baseline':>11}")
    for name, seconds in medians.items():
        print(f"{name:<48} {seconds * 1e3:>10.2f} {seconds / baseline:>11.2f}")
    first, last = args.histories[0], args.histories[-1]
    growth = {
        policy: medians[f"AutoClip h={last} global nonfinite={policy}"]
        / medians[f"AutoClip h={first} global nonfinite={policy}"]
        for policy in args.nonfinite
    }
    for policy, ratio in growth.items():
        print(f"global AutoClip (nonfinite={policy}) cost at h={last} / at h={first}: {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baseline_s": baseline, "median_s": medians, "growth": growth}, f, indent=2)


if __name__ == "__main__":
    main()
