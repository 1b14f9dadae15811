"""The baseline: a fixed threshold, the same result as ``torch.nn.utils.clip_grad_norm_``."""

from __future__ import annotations

import torch
from torch import Tensor

from clipintegrations.checks import check_float
from clipintegrations.clipper import Clipper


class FixedClip(Clipper):
    """Scale the gradients down to norm ``max_norm`` when their norm exceeds it.

    Args:
        max_norm: the largest norm allowed, per unit of ``granularity``.
        granularity: ``"global"``, ``"layer"`` or ``"parameter"`` (see ``Clipper``).
        nonfinite: ``"zero"`` or ``"keep"`` (see ``Clipper``).

    Raises:
        ValueError: ``max_norm`` is not positive.

    Example::

        >>> model = torch.nn.Linear(4, 1)
        >>> model(torch.ones(1, 4)).sum().mul(100).backward()
        >>> stats = FixedClip(max_norm=1.0).clip_(model)
        >>> round(float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()), 4)
        1.0
    """

    method = "fixed"

    def __init__(self, max_norm: float, granularity: str = "global", nonfinite: str = "zero") -> None:
        super().__init__(granularity, nonfinite)
        self.max_norm = check_float("max_norm", max_norm, low=0.0, low_open=True)

    def _thresholds(self, norms: Tensor, valid: Tensor) -> Tensor:
        return torch.full_like(norms, self.max_norm)
