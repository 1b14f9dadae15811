"""A soak run: 20,000 clip steps per clipper; memory stays what the history keeps, and per-step time stays flat.

    python benchmarks/soak.py                     # 20,000 steps each (~2 minutes)
    python benchmarks/soak.py --steps 3000        # quicker

Each clipper runs in a fresh process on a small model (8 layers of 256x256, one clip per step,
fresh random gradients every step). Reported per clipper: the bytes of every tensor it holds against the
bytes its history must keep (4 per kept norm and unit, plus per-unit counters), the process's peak
resident memory before and after the run, and the median step time of the first and of the last
1,000 steps. Writes ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch

from clipintegrations import build_clipper

RESULTS = Path(__file__).with_name("results")
CLIPPERS = {
    "AutoClip full history, global": ({"method": "autoclip", "percentile": 10}, lambda steps: steps),
    "AutoClip full history, layer": ({"method": "autoclip", "percentile": 10, "granularity": "layer"}, lambda s: s),
    "AutoClip history_size=1000, layer": (
        {"method": "autoclip", "percentile": 10, "history_size": 1000, "granularity": "layer"},
        lambda steps: 1000,
    ),
    "PercentileClip window=1000, layer": (
        {"method": "percentile", "window": 1000, "granularity": "layer"},
        lambda steps: 1000,
    ),
    "ZClip, layer": ({"method": "zclip", "granularity": "layer"}, lambda steps: 0),
}


def live_bytes(value, seen=None) -> int:
    """Bytes of every tensor the clipper holds (its buffers as they are, not the trimmed state_dict)."""
    seen = set() if seen is None else seen
    if id(value) in seen or isinstance(value, (torch.nn.Module, torch.nn.Parameter)):  # the model's, not its
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(live_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(live_bytes(v, seen) for v in value)
    if hasattr(value, "__dict__"):
        return live_bytes(vars(value), seen)
    return 0


def soak(name: str, steps: int, queue) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config, kept = CLIPPERS[name]
    model = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(8)))
    gradients = [torch.randn(64, *p.shape) for p in model.parameters()]  # drawn once, cycled
    clipper = build_clipper(config)
    times = []
    peak_before = 0
    for step in range(steps):
        for p, g in zip(model.parameters(), gradients):
            p.grad = g[step % 64].clone()
        started = time.perf_counter()
        clipper.clip_(model)
        times.append(time.perf_counter() - started)
        if step == 999:
            peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    units = len(clipper.unit_names)
    queue.put(
        {
            "clipper": name,
            "steps": steps,
            "units": units,
            "state_bytes": live_bytes(clipper),
            "history_bytes_expected": 4 * units * kept(steps),
            "peak_rss_kib_after_1000_steps": peak_before,
            "peak_rss_kib_at_end": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "median_ms_first_1000": 1e3 * statistics.median(times[:1000]),
            "median_ms_last_1000": 1e3 * statistics.median(times[-1000:]),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    rows = []
    for name in CLIPPERS:
        queue = context.Queue()
        process = context.Process(target=soak, args=(name, args.steps, queue))
        process.start()
        rows.append(queue.get())
        process.join()
    print(
        "| clipper | state bytes | history must keep | peak RSS after 1k steps -> end (MiB) "
        "| median step, first 1k -> last 1k (ms) |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['clipper']} | {r['state_bytes']:,} | {r['history_bytes_expected']:,} "
            f"| {r['peak_rss_kib_after_1000_steps'] / 1024:.1f} -> {r['peak_rss_kib_at_end'] / 1024:.1f} "
            f"| {r['median_ms_first_1000']:.3f} -> {r['median_ms_last_1000']:.3f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
