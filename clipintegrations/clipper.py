"""The clipping step shared by every method: measure, update the history, threshold, scale."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from clipintegrations.checks import check_choice
from clipintegrations.norms import EPS, GRANULARITIES, GradientLayout, device_index, scale_, unit_norms, zero_nonfinite_

NONFINITE_POLICIES = ("keep", "zero")
STATE_FORMAT = 1


class ClipStats(NamedTuple):
    """What one ``clip_`` did: 0-d tensors for ``"global"``, one entry per unit otherwise."""

    norm: Tensor
    """The gradient norm before clipping."""
    threshold: Tensor
    """The norm allowed this step (``inf`` while a method is warming up)."""
    clipped: Tensor
    """Whether the gradients were scaled down (``norm > threshold``)."""

    def summary(self) -> tuple[Tensor, Tensor, Tensor]:
        """What the trainers log, as fp32 0-d tensors: the norm, the threshold and the fraction clipped.

        For per-layer (or per-parameter) clipping: the model's norm, the tightest threshold and
        the fraction of units clipped.
        """
        norm, threshold, clipped = self.norm.float(), self.threshold.float(), self.clipped.float()
        if norm.dim() == 0:
            return norm, threshold, clipped
        return norm.square().sum().sqrt(), threshold.min(), clipped.mean()


class Clipper:
    """Base class: subclasses say how a threshold follows from the norms (``_thresholds``).

    Args:
        granularity: ``"global"`` (one norm for all gradients), ``"layer"`` (one per module that
            owns parameters; needs ``clip_(model)``) or ``"parameter"`` (one per tensor).
        nonfinite: what happens to the gradients of a step whose norm is NaN or Inf. Such a
            norm never enters the history. ``"zero"`` zeroes every gradient of that step, so the
            optimizer takes a harmless step (this costs one more pass over the gradients on every
            step, since no step may wait on the host to know). ``"keep"`` leaves them as they are,
            for a ``GradScaler`` (which skips that step) or your own handling.
    """

    method: ClassVar[str]

    def __init__(self, granularity: str = "global", nonfinite: str = "zero") -> None:
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        self.nonfinite = check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self._layout: GradientLayout | None = None
        self._param_ids: tuple[int, ...] = ()
        self._index_cache: dict = {}
        self._device: torch.device | None = None
        self._pending_state: dict[str, Any] | None = None

    # -- what a method defines ------------------------------------------------------------------
    def _init_state(self, num_units: int, device: torch.device) -> None:
        """Create the method's state tensors for ``num_units`` units on ``device``."""

    def _thresholds(self, norms: Tensor, valid: Tensor) -> Tensor:
        """Record ``norms`` where ``valid`` and return this step's threshold per unit."""
        raise NotImplementedError

    def _method_state(self) -> dict[str, Any]:
        return {}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        pass

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as ``build_clipper`` takes them (each is kept as an attribute)."""
        names = [name for name in inspect.signature(type(self).__init__).parameters if name != "self"]
        return {"method": self.method, **{name: getattr(self, name) for name in names}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({args})"

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_(
        self, parameters: nn.Module | Iterable[Tensor] | Tensor, *, process_group: dist.ProcessGroup | None = None
    ) -> ClipStats:
        """Clip the gradients of ``parameters`` in place and return what was done.

        Args:
            parameters: a module (needed for ``granularity="layer"``) or tensors whose ``.grad``
                is clipped; gradients that are ``None`` are skipped.
            process_group: only for plain-tensor shards (FSDP1 flat parameters): the group over
                which the shards' squared norms are summed. DTensor gradients (FSDP2, tensor
                parallel) find their groups themselves; DDP gradients need none.
        """
        layout = self._layout_for(parameters)
        present = [(g, u) for g, u in zip((p.grad for p in layout.params), layout.unit_of) if g is not None]
        grads = [g for g, _ in present]
        units = [u for _, u in present]
        if self._device is None:
            device = grads[0].device if grads else layout.params[0].device
            self._start(layout.num_units, device)
        norms = unit_norms(grads, units, layout.num_units, self._device, self._index_cache, process_group)
        finite_step = norms.isfinite().all()
        thresholds = self._thresholds(norms, finite_step & (norms > 0))
        scale = (thresholds / (norms + EPS)).clamp(max=1.0)
        scale = torch.where(finite_step, scale, 0.0 if self.nonfinite == "zero" else 1.0)
        per_tensor = None if self.granularity == "global" else device_index(self._index_cache, units, self._device)
        scale_(grads, scale, per_tensor)
        if self.nonfinite == "zero":
            zero_nonfinite_(grads)
        stats = ClipStats(norms, thresholds, norms > thresholds)
        return ClipStats(*(t[0] for t in stats)) if self.granularity == "global" else stats

    def _layout_for(self, parameters: nn.Module | Iterable[Tensor] | Tensor) -> GradientLayout:
        if isinstance(parameters, nn.Module):
            ids = tuple(id(p) for p in parameters.parameters())
            source: nn.Module | list[Tensor] = parameters
        else:
            source = [parameters] if isinstance(parameters, Tensor) else list(parameters)
            ids = tuple(id(p) for p in source)
        if self._layout is None or ids != self._param_ids:
            layout = GradientLayout.build(source, self.granularity)
            if not layout.params:
                raise ValueError("clip_ got no trainable parameters: pass the model or its parameters")
            if self._layout is not None and layout.unit_names != self._layout.unit_names:
                raise ValueError(
                    f"the clipping units changed from {self._layout.unit_names} to {layout.unit_names}: "
                    "one clipper serves one model; make a new clipper for another"
                )
            self._layout, self._param_ids = layout, ids
        return self._layout

    def _start(self, num_units: int, device: torch.device) -> None:
        self._device = device
        self._init_state(num_units, device)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._check_units(state)
            self._load_method_state(state["state"])

    @property
    def unit_names(self) -> tuple[str, ...]:
        """The name of each clipping unit (``("global",)``, module names, or parameter names)."""
        if self._layout is None:
            raise RuntimeError("the clipping units are known after the first clip_")
        return self._layout.unit_names

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data and CPU tensors (loadable with ``torch.load(weights_only=True)``)."""
        if self._pending_state is not None:
            return self._pending_state
        started = self._layout is not None and self._device is not None
        return {
            "format": STATE_FORMAT,
            "config": self.config(),
            "units": list(self._layout.unit_names) if started else None,
            "state": self._method_state() if started else {},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict``, on whatever device the gradients are; checked against this clipper."""
        fmt = state_dict.get("format")
        if fmt != STATE_FORMAT:
            raise ValueError(f"clipper state has format {fmt!r}; this version reads format {STATE_FORMAT}")
        saved = state_dict.get("config", {})
        for key in ("method", "granularity"):
            if saved.get(key) != self.config()[key]:
                raise ValueError(
                    f"the checkpoint's clipper has {key}={saved.get(key)!r} but this clipper has "
                    f"{key}={self.config()[key]!r}: configure the same {key} to resume, or start a fresh clipper"
                )
        if state_dict.get("units") is None:
            self._pending_state = None  # saved before its first step: nothing to restore
        elif self._device is None:
            self._pending_state = state_dict
        else:
            self._check_units(state_dict)
            self._load_method_state(state_dict["state"])

    def _check_units(self, state_dict: dict[str, Any]) -> None:
        saved, mine = tuple(state_dict["units"]), self.unit_names
        if saved != mine:
            raise ValueError(
                f"the checkpoint's clipper has {len(saved)} units {saved[:4]}... but this model has "
                f"{len(mine)} units {mine[:4]}...: resume with the same model and granularity"
            )
