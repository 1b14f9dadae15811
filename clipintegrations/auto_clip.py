"""AutoClip: clip to a percentile of the gradient norms seen so far.

Seetharaman, Wichern, Pardo, Le Roux. "AutoClip: Adaptive Gradient Clipping for Source
Separation Networks." IEEE MLSP 2020. https://arxiv.org/abs/2007.14469 ;
reference code: https://github.com/pseeth/autoclip

    @inproceedings{seetharaman2020autoclip,
      title={AutoClip: Adaptive gradient clipping for source separation networks},
      author={Seetharaman, Prem and Wichern, Gordon and Pardo, Bryan and Le Roux, Jonathan},
      booktitle={IEEE International Workshop on Machine Learning for Signal Processing},
      year={2020}}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from clipintegrations.checks import check_float, check_int
from clipintegrations.clipper import Clipper
from clipintegrations.history import FullHistory, WindowHistory


class AutoClip(Clipper):
    """Threshold = the ``percentile``-th percentile of every norm recorded, this step's included.

    Percentiles are exact, with ``numpy.percentile``'s linear interpolation. NaN, Inf and zero
    norms (no gradient) are not recorded.

    Args:
        percentile: in (0, 100]; the paper recommends 10.
        history_size: keep only the last ``history_size`` norms; ``None`` keeps them all.
        granularity: ``"global"``, ``"layer"`` or ``"parameter"`` (see ``Clipper``).
        nonfinite: ``"zero"`` or ``"keep"`` (see ``Clipper``).

    Raises:
        ValueError: ``percentile`` outside (0, 100] or ``history_size`` < 1.

    Example::

        >>> model = torch.nn.Linear(4, 1)
        >>> clipper = AutoClip(percentile=50)
        >>> for scale in (1.0, 2.0, 30.0):
        ...     model.zero_grad()
        ...     model(torch.ones(1, 4)).sum().mul(scale).backward()
        ...     stats = clipper.clip_(model)
        >>> bool(stats.clipped), round(float(stats.threshold / stats.norm), 4)  # median 2 of (1, 2, 30)
        (True, 0.0667)
    """

    method = "autoclip"

    def __init__(
        self,
        percentile: float = 10.0,
        history_size: int | None = None,
        granularity: str = "global",
        nonfinite: str = "zero",
    ) -> None:
        super().__init__(granularity, nonfinite)
        self.percentile = check_float("percentile", percentile, low=0.0, high=100.0, low_open=True)
        self.history_size = None if history_size is None else check_int("history_size", history_size, minimum=1)

    def _init_state(self, num_units: int, device: torch.device) -> None:
        if self.history_size is None:
            self.history: FullHistory | WindowHistory = FullHistory(num_units, device)
        else:
            self.history = WindowHistory(num_units, device, self.history_size)

    def _thresholds(self, norms: Tensor, valid: Tensor) -> Tensor:
        self.history.record(norms, valid)
        return self.history.percentile(self.percentile / 100)

    def _method_state(self) -> dict[str, Any]:
        return self.history.state_dict()

    def _load_method_state(self, state: dict[str, Any]) -> None:
        load_history(self.history, state, "history_size", self.history_size)


def load_history(history: FullHistory | WindowHistory, state: dict[str, Any], name: str, size: int | None) -> None:
    """Load a history's state, refusing one kept with another window size."""
    saved = state["ring"].shape[1] if "ring" in state else None
    if saved != size:
        raise ValueError(
            f"the checkpoint's clipper has {name}={saved} but this clipper has {name}={size}: "
            f"configure {name}={saved} to resume, or start a fresh clipper"
        )
    history.load_state_dict(state)
