"""Adaptive gradient clipping for the trainers people already use.

Example::

    >>> import torch
    >>> from clipintegrations import AutoClip
    >>> model = torch.nn.Linear(4, 2)
    >>> model(torch.randn(8, 4)).pow(2).sum().backward()
    >>> stats = AutoClip(percentile=10).clip_(model)
    >>> sorted(stats._fields)
    ['clipped', 'norm', 'threshold']
"""

from clipintegrations.arguments import ClippingArguments
from clipintegrations.auto_clip import AutoClip
from clipintegrations.build import METHODS, build_clipper
from clipintegrations.clipper import Clipper, ClipStats
from clipintegrations.fixed_clip import FixedClip
from clipintegrations.percentile_clip import PercentileClip
from clipintegrations.z_clip import ZClip

__all__ = [
    "METHODS",
    "AutoClip",
    "ClipStats",
    "Clipper",
    "ClippingArguments",
    "FixedClip",
    "PercentileClip",
    "ZClip",
    "build_clipper",
]
__version__ = "0.1.0"
