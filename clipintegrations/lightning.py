"""PyTorch Lightning adapter: clip with a core clipper once per optimizer step.

Example::

    >>> import lightning as L
    >>> from clipintegrations import AutoClip
    >>> trainer = L.Trainer(callbacks=[AdaptiveGradientClipping(AutoClip(percentile=10))], logger=False)
"""

from __future__ import annotations

from typing import Any

import torch

from clipintegrations.build import build_clipper
from clipintegrations.checks import check_bool
from clipintegrations.clipper import Clipper, ClipStats
from clipintegrations.norms import fsdp1_shard_group
from clipintegrations.runs import ClipHistory

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as error:  # pragma: no cover - Lightning is installed wherever the tests run
    raise ImportError(
        "clipintegrations.lightning needs Lightning: pip install 'clipintegrations[lightning]'"
    ) from error

__all__ = ["AdaptiveGradientClipping"]


class AdaptiveGradientClipping(Callback):
    """Clip gradients with ``clipper`` in ``on_before_optimizer_step`` and log what it did.

    The hook runs once per optimizer step, after gradient accumulation and after an fp16
    ``GradScaler`` has unscaled the gradients; an overflow step never enters the history and the
    scaler still skips it. Logs ``clip/norm``, ``clip/threshold`` and ``clip/clip_rate`` (the
    fraction of steps, or for per-layer clipping of layers, clipped so far) through
    ``pl_module.log``, so every Lightning logger receives them.

    Supported: a single device, DDP, FSDP2 (``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy``;
    global or per-parameter granularity with flat parameters). Refused at setup: DeepSpeed (it owns
    the optimizer step), ``Trainer(gradient_clip_val=...)`` (it would clip a second time), and a
    fused optimizer under fp16 (its gradients are still scaled in the hook).

    Args:
        clipper: the core clipper (``AutoClip``, ``PercentileClip``, ``ZClip``, ``FixedClip``).
            With several optimizers (manual optimization) each gets its own copy and state.
        log: log the statistics on every step (a host sync happens only when a logger writes).
        history: a ``ClipHistory`` that records every step, for a plot (not saved in checkpoints).
    """

    def __init__(self, clipper: Clipper, log: bool = True, history: ClipHistory | None = None) -> None:
        if not isinstance(clipper, Clipper):
            raise TypeError(
                f"`clipper` must be a clipintegrations clipper (AutoClip, PercentileClip, ZClip, FixedClip); "
                f"got {type(clipper).__name__}: use build_clipper(config) to make one from a config"
            )
        self.clipper = clipper
        self.log = check_bool("log", log)
        self.history = history
        self.last_stats: ClipStats | None = None
        self._clippers: list[Clipper] = [clipper]
        self._process_group: Any = None
        self._clipped = torch.zeros(())
        self._steps = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**{k: v for k, v in self.clipper.config().items() if k != "nonfinite"})

    # -- checks -----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip a second time, with a fixed "
                "threshold: either remove `gradient_clip_val` from the Trainer or remove AdaptiveGradientClipping"
            )
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            raise ValueError(
                "DeepSpeed owns the optimizer step and clips inside its engine, so AdaptiveGradientClipping cannot "
                "clip there: use strategy='ddp' or FSDP2 (ModelParallelStrategy), or DeepSpeed's own "
                "`gradient_clipping` setting"
            )
        supported = (SingleDeviceStrategy, DDPStrategy, FSDPStrategy, ModelParallelStrategy)
        if not isinstance(strategy, supported):
            raise ValueError(
                f"AdaptiveGradientClipping does not support {type(strategy).__name__}: use a single device, "
                "'ddp', 'fsdp' or ModelParallelStrategy (FSDP2)"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        precision = trainer.precision_plugin
        if isinstance(precision, MixedPrecision) and precision.scaler is not None:
            for optimizer in optimizers:
                if getattr(optimizer, "_step_supports_amp_scaling", False):
                    raise ValueError(
                        f"{type(optimizer).__name__} with fused=True unscales inside its step under "
                        f"precision={trainer.precision!r}, so its gradients are still scaled when clipping must "
                        "happen: use fused=False (foreach is as fast on most models) or precision='bf16-mixed'"
                    )
        if len(optimizers) > 1:
            if self.clipper.granularity == "layer":
                raise ValueError(
                    "granularity='layer' needs the whole module, but with several optimizers each clips only its "
                    "own parameters: use granularity='global' or 'parameter'"
                )
            self._add_clippers(len(optimizers))  # a resumed run already has them, with their state
        if isinstance(trainer.strategy, FSDPStrategy):
            self._process_group = fsdp1_shard_group(trainer.strategy.model, self.clipper.granularity)

    # -- the step ---------------------------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if len(self._clippers) == 1:
            clipper, target = self.clipper, pl_module
        else:
            index = next(i for i, opt in enumerate(trainer.optimizers) if opt is _unwrap(optimizer))
            clipper = self._clippers[index]
            target = [p for group in optimizer.param_groups for p in group["params"]]
        stats = clipper.clip_(target, process_group=self._process_group)
        self.last_stats = stats
        if self._clipped.device != stats.clipped.device:
            self._clipped = self._clipped.to(stats.clipped.device)
        self._clipped = self._clipped + stats.summary()[2]
        self._steps += 1
        if self.history is not None:
            self.history.record(stats)
        if self.log:
            self._log(pl_module, stats, suffix="" if len(self._clippers) == 1 else f"_{index}")

    def _log(self, pl_module: pl.LightningModule, stats: ClipStats, suffix: str) -> None:
        norm, threshold, _ = stats.summary()
        values = {"norm": norm, "threshold": threshold, "clip_rate": self._clipped / self._steps}
        for name, value in values.items():
            pl_module.log(f"clip/{name}{suffix}", value, on_step=True, on_epoch=False, batch_size=1)

    def _add_clippers(self, count: int) -> None:
        """Fresh clippers configured as ``clipper``, one per optimizer, up to ``count``."""
        while len(self._clippers) < count:
            self._clippers.append(build_clipper(self.clipper.config()))

    # -- checkpoints ------------------------------------------------------------------------------
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse a checkpoint whose clipping state is for another clipper; warn when it has none."""
        name = type(self).__qualname__
        saved = [key for key in checkpoint.get("callbacks", {}) if str(key).startswith(name)]
        if self.state_key in saved:
            return
        mine = {c.state_key for c in trainer.callbacks if isinstance(c, AdaptiveGradientClipping)}
        others = [key for key in saved if key not in mine]
        if others:
            raise ValueError(
                f"the checkpoint holds clipping state for {others[0]} but this run clips with {self.state_key}: "
                "configure the checkpoint's clipper to resume it, or resume without the checkpoint's callbacks"
            )
        rank_zero_warn(
            "the checkpoint has no clipping state (saved before AdaptiveGradientClipping was added): "
            "the clipper starts with an empty history"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "clippers": [c.state_dict() for c in self._clippers],
            "clipped": float(self._clipped),
            "steps": self._steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("clippers", [])
        self._add_clippers(len(saved))
        for clipper, state in zip(self._clippers, saved):
            clipper.load_state_dict(state)
        self._clipped = torch.tensor(state_dict.get("clipped", 0.0))
        self._steps = state_dict.get("steps", 0)


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a LightningOptimizer."""
    return getattr(optimizer, "_optimizer", optimizer)
