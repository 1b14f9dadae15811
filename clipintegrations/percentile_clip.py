"""Spike guard: clip to a multiple of a percentile of the recent norms, the current one excluded."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from clipintegrations.auto_clip import load_history
from clipintegrations.checks import check_float, check_int
from clipintegrations.clipper import Clipper
from clipintegrations.history import WindowHistory


class PercentileClip(Clipper):
    """Threshold = ``factor`` x the ``percentile``-th percentile of the last ``window`` norms.

    The current norm is not counted, so a spike cannot raise its own threshold. Until
    ``warmup_steps`` norms have been recorded, nothing is clipped (threshold ``inf``).

    Args:
        percentile: in (0, 100].
        window: how many recent norms to keep, >= 1.
        warmup_steps: recorded norms needed before clipping starts, >= 1.
        factor: multiplier on the percentile, > 0.
        granularity: ``"global"``, ``"layer"`` or ``"parameter"`` (see ``Clipper``).
        nonfinite: ``"zero"`` or ``"keep"`` (see ``Clipper``).

    Raises:
        ValueError: an argument is out of its range.

    Example::

        >>> model = torch.nn.Linear(4, 1)
        >>> clipper = PercentileClip(percentile=100, window=10, warmup_steps=2, factor=2.0)
        >>> for scale in (1.0, 1.0, 50.0):
        ...     model.zero_grad()
        ...     model(torch.ones(1, 4)).sum().mul(scale).backward()
        ...     stats = clipper.clip_(model)
        >>> bool(stats.clipped), round(float(stats.threshold / stats.norm), 4)
        (True, 0.04)
    """

    method = "percentile"

    def __init__(
        self,
        percentile: float = 95.0,
        window: int = 1000,
        warmup_steps: int = 100,
        factor: float = 1.0,
        granularity: str = "global",
        nonfinite: str = "zero",
    ) -> None:
        super().__init__(granularity, nonfinite)
        self.percentile = check_float("percentile", percentile, low=0.0, high=100.0, low_open=True)
        self.window = check_int("window", window, minimum=1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.factor = check_float("factor", factor, low=0.0, low_open=True)

    def _init_state(self, num_units: int, device: torch.device) -> None:
        self.history = WindowHistory(num_units, device, self.window)

    def _thresholds(self, norms: Tensor, valid: Tensor) -> Tensor:
        threshold = self.factor * self.history.percentile(self.percentile / 100)
        threshold = torch.where(self.history.written >= self.warmup_steps, threshold, float("inf"))
        self.history.record(norms, valid)
        return threshold

    def _method_state(self) -> dict[str, Any]:
        return self.history.state_dict()

    def _load_method_state(self, state: dict[str, Any]) -> None:
        load_history(self.history, state, "window", self.window)
