"""ZClip: clip norms whose z-score against an EMA of past norms is too high.

Kumar, Owen, Chowdhury, Güra. "ZClip: Adaptive Spike Mitigation for LLM Pre-Training." 2025.
https://arxiv.org/abs/2504.02507 ; reference code: https://github.com/bluorion-com/ZClip

    @article{kumar2025zclip,
      title={ZClip: Adaptive Spike Mitigation for LLM Pre-Training},
      author={Kumar, Abhay and Owen, Louis and Chowdhury, Nilabhra Roy and G{\"u}ra, Fabian},
      journal={arXiv preprint arXiv:2504.02507},
      year={2025}}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from clipintegrations.checks import check_float, check_int
from clipintegrations.clipper import Clipper

EPS = 1e-6


class ZClip(Clipper):
    """The reference's ``mode="zscore"``, ``clip_option="adaptive_scaling"``, ``clip_factor=1``.

    The first ``warmup_steps`` recorded norms set the mean and (population) variance; nothing is
    clipped until then. Afterwards, with ``z = (norm - mean) / (std + eps)``, a norm with
    ``z > z_thresh`` is clipped to ``mean + z_thresh**2 * std / z`` (the larger the spike, the
    harder the clip), and the EMA statistics are updated with the norm after clipping:
    ``mean = alpha * mean + (1 - alpha) * norm``, ``var = alpha * var + (1 - alpha) * (norm - mean)**2``.
    The threshold reported on a step with no spike is ``mean + z_thresh * (std + eps)``.

    Args:
        alpha: EMA smoothing factor, in (0, 1).
        z_thresh: z-score above which a norm is a spike, > 0.
        warmup_steps: recorded norms that initialise the statistics, >= 1.
        granularity: ``"global"``, ``"layer"`` or ``"parameter"`` (see ``Clipper``).
        nonfinite: ``"zero"`` or ``"keep"`` (see ``Clipper``).

    Raises:
        ValueError: an argument is out of its range.

    Example::

        >>> model = torch.nn.Linear(4, 1)
        >>> clipper = ZClip(warmup_steps=3)
        >>> for scale in (1.0, 1.1, 0.9, 1.0, 40.0):
        ...     model.zero_grad()
        ...     model(torch.ones(1, 4)).sum().mul(scale).backward()
        ...     stats = clipper.clip_(model)
        >>> bool(stats.clipped)
        True
    """

    method = "zclip"

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        granularity: str = "global",
        nonfinite: str = "zero",
    ) -> None:
        super().__init__(granularity, nonfinite)
        self.alpha = check_float("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        self.z_thresh = check_float("z_thresh", z_thresh, low=0.0, low_open=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)

    def _init_state(self, num_units: int, device: torch.device) -> None:
        zeros = torch.zeros(num_units, dtype=torch.float32, device=device)
        self.stats = {
            "count": torch.zeros(num_units, dtype=torch.long, device=device),
            "mean": zeros.clone(),
            "var": zeros.clone(),
            "m2": zeros.clone(),  # Welford's sum of squared deviations, during warm-up only
        }

    def _thresholds(self, norms: Tensor, valid: Tensor) -> Tensor:
        count, mean, var, m2 = (self.stats[k] for k in ("count", "mean", "var", "m2"))
        warming = count < self.warmup_steps
        std = var.sqrt()
        z = (norms - mean) / (std + EPS)
        spike = ~warming & (z > self.z_thresh)
        threshold = torch.where(
            spike, mean + self.z_thresh**2 * std / z, mean + self.z_thresh * (std + EPS)
        ).masked_fill(warming, float("inf"))

        # Warm-up: Welford's running mean and variance.
        seen = count + 1
        delta = norms - mean
        warm_mean = mean + delta / seen
        warm_m2 = m2 + delta * (norms - warm_mean)
        warm_var = torch.where(seen == self.warmup_steps, warm_m2 / seen, var)
        # Afterwards: EMA of the norm after clipping.
        kept = torch.where(spike, threshold, norms)
        ema_mean = self.alpha * mean + (1 - self.alpha) * kept
        ema_var = self.alpha * var + (1 - self.alpha) * (kept - ema_mean).square()

        self.stats = {
            "count": count + valid,
            "mean": torch.where(valid, torch.where(warming, warm_mean, ema_mean), mean),
            "var": torch.where(valid, torch.where(warming, warm_var, ema_var), var),
            "m2": torch.where(valid & warming, warm_m2, m2),
        }
        return threshold

    def _method_state(self) -> dict[str, Any]:
        return {k: v.cpu() for k, v in self.stats.items()}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self.stats = {k: state[k].to(device=v.device, dtype=v.dtype) for k, v in self.stats.items()}
