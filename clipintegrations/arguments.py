"""The clipping config as script arguments, for ``HfArgumentParser`` (command line or YAML).

Example::

    >>> arguments = ClippingArguments(clip_method="percentile", clip_percentile=90, clip_window=500)
    >>> arguments.build_clipper()
    PercentileClip(percentile=90.0, window=500, warmup_steps=100, factor=1.0, granularity='global', nonfinite='zero')
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, fields
from typing import Any

from clipintegrations.build import METHODS, build_clipper
from clipintegrations.clipper import Clipper

PREFIX = "clip_"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ClippingArguments:
    """Adaptive gradient clipping, configured by plain keys (``clip_`` keeps them apart from ``TrainingArguments``).

    A key left at ``None`` takes the method's default; a key that the method does not take is refused.
    ``HfArgumentParser((ClippingArguments, TrainingArguments)).parse_yaml_file("config.yaml")`` reads it.
    """

    clip_method: str = field(default="autoclip", metadata=_help(f"Clipping method, one of {sorted(METHODS)}."))
    clip_percentile: float | None = field(
        default=None, metadata=_help("autoclip, percentile: the percentile of past norms used as threshold.")
    )
    clip_history_size: int | None = field(
        default=None, metadata=_help("autoclip: keep only the last N norms (default: every norm seen).")
    )
    clip_window: int | None = field(default=None, metadata=_help("percentile: the number of past norms kept."))
    clip_warmup_steps: int | None = field(
        default=None, metadata=_help("percentile, zclip: steps that only record norms before clipping starts.")
    )
    clip_factor: float | None = field(default=None, metadata=_help("percentile: threshold = factor x percentile."))
    clip_alpha: float | None = field(default=None, metadata=_help("zclip: EMA smoothing of the norm statistics."))
    clip_z_thresh: float | None = field(default=None, metadata=_help("zclip: z-score above which a norm is clipped."))
    clip_max_norm: float | None = field(default=None, metadata=_help("fixed: the constant threshold."))
    clip_granularity: str | None = field(
        default=None, metadata=_help("global (one norm for the model), layer (one per module) or parameter.")
    )
    clip_nonfinite: str | None = field(
        default=None, metadata=_help("A step with a NaN/Inf norm: zero its gradients (zero) or keep them (keep).")
    )
    clip_log: bool = field(default=True, metadata=_help("Log clip/norm, clip/threshold and clip/clip_rate."))

    def __post_init__(self) -> None:
        self.build_clipper()  # validates every key, naming it as the user wrote it

    def clipper_config(self) -> dict[str, Any]:
        """The config that ``build_clipper`` takes: the method and every key that is set."""
        config: dict[str, Any] = {"method": self.clip_method}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("clip_method", "clip_log") and value is not None:
                config[f.name.removeprefix(PREFIX)] = value
        return config

    def build_clipper(self) -> Clipper:
        config = self.clipper_config()
        cls = METHODS.get(config["method"])
        if cls is not None:
            parameters = inspect.signature(cls).parameters
            missing = [name for name, p in parameters.items() if p.default is p.empty and name not in config]
            if missing:
                needed = ", ".join(PREFIX + name for name in missing)
                raise TypeError(f"clip_method={config['method']!r} needs {needed}")
            allowed = list(parameters)
            for key, value in config.items():
                if key != "method" and key not in allowed:
                    raise ValueError(
                        f"{PREFIX}{key}={value!r} does not apply to clip_method={config['method']!r}; "
                        f"it takes {', '.join(PREFIX + name for name in allowed)}"
                    )
        try:
            return build_clipper(config)
        except (TypeError, ValueError) as error:
            raise type(error)(re.sub(r"`(\w+)`", rf"`{PREFIX}\1`", str(error))) from None
