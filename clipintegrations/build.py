"""Build a clipper from a config: a dict from YAML or the command line, or a method name."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from clipintegrations.auto_clip import AutoClip
from clipintegrations.clipper import Clipper
from clipintegrations.fixed_clip import FixedClip
from clipintegrations.percentile_clip import PercentileClip
from clipintegrations.z_clip import ZClip

METHODS: dict[str, type[Clipper]] = {
    "autoclip": AutoClip,
    "fixed": FixedClip,
    "percentile": PercentileClip,
    "zclip": ZClip,
}


def build_clipper(config: Mapping[str, Any] | str) -> Clipper:
    """Make the clipper that ``config`` describes.

    Args:
        config: ``{"method": ..., **arguments}`` or just the method name, one of
            ``"autoclip"``, ``"fixed"``, ``"percentile"``, ``"zclip"``.

    Raises:
        ValueError: unknown method or key, or a value out of range (the message names it).
        TypeError: a value of the wrong type.

    Example::

        >>> build_clipper({"method": "autoclip", "percentile": 10, "granularity": "layer"})
        AutoClip(percentile=10.0, history_size=None, granularity='layer', nonfinite='zero')
        >>> build_clipper("zclip")
        ZClip(alpha=0.97, z_thresh=2.5, warmup_steps=25, granularity='global', nonfinite='zero')
    """
    if isinstance(config, str):
        config = {"method": config}
    if not isinstance(config, Mapping):
        raise TypeError(f"a clipper config must be a mapping or a method name; got {type(config).__name__}: {config!r}")
    arguments = dict(config)
    if "method" not in arguments:
        raise ValueError(f"a clipper config needs `method`, one of {sorted(METHODS)}; got keys {sorted(arguments)}")
    method = arguments.pop("method")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {sorted(METHODS)}; got {method!r}")
    cls = METHODS[method]
    allowed = [name for name in inspect.signature(cls).parameters]
    for key in arguments:
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} for method {method!r}; allowed keys: {allowed}")
    try:
        return cls(**arguments)
    except TypeError as error:
        if "missing" in str(error):
            raise TypeError(f"method {method!r} needs {error}".replace(cls.__init__.__qualname__ + "() ", "")) from None
        raise
