"""Histories of gradient norms and exact percentiles over them, on the device, without host sync.

Each history holds one row per clipping unit. A step's norms are recorded only where they are
valid (finite and non-zero); rows therefore fill at their own pace and every count is a tensor.
Empty slots hold ``+inf`` so that sorting puts the recorded values first.

``FullHistory`` keeps every norm (AutoClip's default) in two sorted blocks: a large one merged
every ``BLOCK`` steps and a small one that takes the new norms by a sorted insert. A percentile
is read from the two blocks without merging them, so one step costs O(BLOCK log n) plus the
amortised O(n log n / BLOCK) of the merges, not a sort of the whole history.

``WindowHistory`` keeps the last ``window`` norms in a ring and sorts the window to read it.
"""

from __future__ import annotations

import torch
from torch import Tensor

INF = float("inf")


def lerp_like_numpy(low: Tensor, high: Tensor, t: Tensor) -> Tensor:
    """``numpy.percentile``'s linear interpolation, including its form for ``t >= 0.5``."""
    diff = high - low
    return torch.where(t >= 0.5, high - diff * (1 - t), low + diff * t)


def percentile_ranks(counts: Tensor, q: float) -> tuple[Tensor, Tensor, Tensor]:
    """The two order statistics (0-based, shape ``(units, 2)``) and the weight for quantile ``q``."""
    last = (counts - 1).clamp(min=0)
    position = last.to(torch.float64 if counts.device.type != "mps" else torch.float32) * q
    low = position.floor().long()
    ranks = torch.stack([low, torch.minimum(low + 1, last)], dim=1)
    return ranks, (position - low).float(), counts > 0


def percentile_of_sorted(rows: Tensor, counts: Tensor, q: float) -> Tensor:
    """The ``q``-quantile of the first ``counts[u]`` values of each ascending row; ``inf`` if empty."""
    ranks, t, nonempty = percentile_ranks(counts, q)
    values = rows.gather(1, ranks)
    return torch.where(nonempty, lerp_like_numpy(values[:, 0], values[:, 1], t), INF)


def sorted_insert(rows: Tensor, values: Tensor) -> Tensor:
    """Insert ``values[u]`` into ascending row ``u`` of ``rows``, dropping each row's last slot."""
    at = torch.searchsorted(rows, values[:, None])
    column = torch.arange(rows.shape[1], device=rows.device)
    shifted = torch.cat([rows[:, :1], rows[:, :-1]], dim=1)
    return torch.where(column < at, rows, torch.where(column == at, values[:, None], shifted))


class FullHistory:
    """Every valid norm seen, per unit, with exact percentiles (``numpy.percentile``, linear)."""

    BLOCK = 256

    def __init__(self, num_units: int, device: torch.device) -> None:
        self.merged = torch.full((num_units, 1), INF, device=device)
        self.recent = torch.full((num_units, self.BLOCK), INF, device=device)
        self.counts = torch.zeros(num_units, dtype=torch.long, device=device)
        self._recent_steps = 0  # host-side: steps since the last merge, valid or not

    def record(self, values: Tensor, valid: Tensor) -> None:
        if self._recent_steps == self.BLOCK:
            self._merge()
        self.recent = sorted_insert(self.recent, torch.where(valid, values, INF))
        self.counts += valid
        self._recent_steps += 1

    def _merge(self) -> None:
        self.merged = torch.cat([self.merged, self.recent], dim=1).sort(dim=1).values
        self.recent = torch.full_like(self.recent, INF)
        self._recent_steps = 0

    def percentile(self, q: float) -> Tensor:
        ranks, t, nonempty = percentile_ranks(self.counts, q)
        values = self._order_statistics(ranks)
        return torch.where(nonempty, lerp_like_numpy(values[:, 0], values[:, 1], t), INF)

    def _order_statistics(self, ranks: Tensor) -> Tensor:
        """The ``ranks``-th smallest values of the union of ``merged`` and ``recent``, row by row."""
        block = self.recent.shape[1]
        # Where each recent value would stand in the merged union (after equal merged values).
        column = torch.arange(block, device=ranks.device)
        at = column + torch.searchsorted(self.merged, self.recent, right=True)
        before = torch.searchsorted(at, ranks)  # recent values standing before each rank
        first = before.clamp(max=block - 1)
        from_recent = (before < block) & (at.gather(1, first) == ranks)
        from_merged = (ranks - before).clamp(0, self.merged.shape[1] - 1)
        return torch.where(from_recent, self.recent.gather(1, first), self.merged.gather(1, from_merged))

    def state_dict(self) -> dict[str, Tensor]:
        values = torch.cat([self.merged, self.recent], dim=1).sort(dim=1).values
        kept = int(self.counts.max()) if self.counts.numel() else 0  # checkpoint time, not per step
        return {"values": values[:, :kept].cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        values, counts = state["values"], state["counts"]
        device = self.counts.device
        padding = torch.full((values.shape[0], 1), INF)
        self.merged = torch.cat([values.float(), padding], dim=1).to(device)
        self.recent = torch.full_like(self.recent, INF)
        self.counts = counts.to(device=device, dtype=torch.long)
        self._recent_steps = 0


class WindowHistory:
    """The last ``window`` valid norms of each unit, with exact percentiles over them."""

    def __init__(self, num_units: int, device: torch.device, window: int) -> None:
        self.ring = torch.full((num_units, window), INF, device=device)
        self.written = torch.zeros(num_units, dtype=torch.long, device=device)

    def record(self, values: Tensor, valid: Tensor) -> None:
        slot = (self.written % self.ring.shape[1])[:, None]
        kept = torch.where(valid, values, self.ring.gather(1, slot)[:, 0])
        self.ring.scatter_(1, slot, kept[:, None])
        self.written += valid

    @property
    def counts(self) -> Tensor:
        return self.written.clamp(max=self.ring.shape[1])

    def percentile(self, q: float) -> Tensor:
        return percentile_of_sorted(self.ring.sort(dim=1).values, self.counts, q)

    def state_dict(self) -> dict[str, Tensor]:
        return {"ring": self.ring.cpu(), "written": self.written.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.written.device
        self.ring = state["ring"].to(device=device, dtype=torch.float32)
        self.written = state["written"].to(device=device, dtype=torch.long)
