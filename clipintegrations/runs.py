"""What a recipe run needs around the clipper: its config, the clip history, and the run directory.

Example::

    >>> import torch
    >>> from clipintegrations import AutoClip
    >>> history = ClipHistory()
    >>> model = torch.nn.Linear(4, 1)
    >>> for _ in range(3):
    ...     model(torch.randn(8, 4)).sum().backward()
    ...     history.record(AutoClip().clip_(model))
    >>> sorted(history.as_dict())
    ['clipped', 'norm', 'threshold']
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from clipintegrations.clipper import ClipStats


class ClipHistory:
    """Every step's norm, threshold and clip decision, kept on the device until ``as_dict``.

    For per-layer clipping a step records the model's norm, the tightest threshold and the
    fraction of layers clipped, as the trainers' logs do.
    """

    def __init__(self) -> None:
        self._steps: list[torch.Tensor] = []

    def record(self, stats: ClipStats) -> None:
        self._steps.append(torch.stack(stats.summary()))

    def __len__(self) -> int:
        return len(self._steps)

    def as_dict(self) -> dict[str, list[float]]:
        """The history as lists (one host sync for the whole run)."""
        if not self._steps:
            return {"norm": [], "threshold": [], "clipped": []}
        norm, threshold, clipped = torch.stack(self._steps).T.tolist()
        return {"norm": norm, "threshold": threshold, "clipped": clipped}


def plot_clip_history(history: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """Draw the gradient norm and the clipping threshold over steps into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4))
    steps = range(1, len(history["norm"]) + 1)
    axes.plot(steps, history["norm"], lw=0.8, label="gradient norm (before clipping)")
    axes.plot(steps, history["threshold"], lw=1.5, label="threshold")
    clipped = [(s, n) for s, n, c in zip(steps, history["norm"], history["clipped"]) if c > 0]
    if clipped:
        axes.scatter(*zip(*clipped), s=6, c="tab:red", label="clipped", zorder=3)
    axes.set(xlabel="optimizer step", ylabel="L2 norm", yscale="log")
    axes.set_title(title, fontsize=8)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def parse_config(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Fill ``dataclass_types`` from ``--config file.yaml`` and then ``--key value`` overrides.

    Unknown keys, in the file or on the command line, are refused with their names; each
    dataclass validates its own values.
    """
    import yaml
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)  # a misspelt key must not pass as a prefix
    config_path = None
    if "--config" in argv:
        at = argv.index("--config")
        config_path, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
    if config_path:
        values = yaml.safe_load(Path(config_path).read_text()) or {}
        known = {action.dest for action in parser._actions} - {"help"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown keys in {config_path}: {unknown}; see `--help` for the keys a recipe takes")
        parser.set_defaults(**values)
    *parsed, remaining = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if remaining:
        raise ValueError(f"unknown command-line arguments: {remaining}; see `--help` for the keys a recipe takes")
    return tuple(parsed)


def evaluate_before_training(trainer: Any) -> dict[str, float]:
    """A transformers ``Trainer``'s eval metrics before ``train()``, measured by a second Trainer.

    Calling ``trainer.evaluate()`` first makes transformers 5.23 skip the DDP wrap in ``train()``
    (accelerate marks the model prepared), so gradients are never averaged across processes. A
    second Trainer on a copy of the model leaves ``trainer`` and its model as they were.
    """
    import copy
    from dataclasses import replace

    from transformers import Trainer

    probe = Trainer(
        model=copy.deepcopy(trainer.model),
        args=replace(trainer.args, report_to="none"),
        eval_dataset=trainer.eval_dataset,
        data_collator=trainer.data_collator,
        compute_metrics=trainer.compute_metrics,
    )
    return probe.evaluate()


def write_run(
    output_dir: str | Path,
    *,
    rank: int,
    config: Sequence[Any],
    metrics: dict[str, Any],
    history: ClipHistory,
    title: str = "",
) -> Path | None:
    """Write the run directory: rank 0 writes the resolved config, metrics, clip history and plot.

    Other ranks write only ``clip_history.rank{r}.json``, so that a test can check that every rank
    clipped alike. Returns the plot's path on rank 0.
    """
    import yaml

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clip_history = history.as_dict()
    if rank != 0:
        (output_dir / f"clip_history.rank{rank}.json").write_text(json.dumps(clip_history))
        return None
    resolved: dict[str, Any] = {}
    for part in config:
        values = part.to_dict() if hasattr(part, "to_dict") else asdict(part)  # TrainingArguments hides tokens
        resolved.update({k: v for k, v in values.items() if not k.startswith("_")})
    (output_dir / "config.yaml").write_text(yaml.safe_dump(_plain(resolved), sort_keys=False))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / "clip_history.json").write_text(json.dumps(clip_history))
    return plot_clip_history(clip_history, output_dir / "clip_history.png", title)


def _plain(value: Any) -> Any:
    """Enums, paths and the like as YAML can write them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(getattr(value, "value", value))
