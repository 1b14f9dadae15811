"""Gradient norms: which tensors form one clipping unit, their true norms, and the scaling.

Everything here is free of host-device synchronisation: no ``.item()``, no tensor in
an ``if``. Norms are computed in fp32 with ``torch._foreach_norm``; the squared norms of
sharded gradients are summed over exactly the group that holds the shards, in one
all-reduce per group, then the root is taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from clipintegrations.checks import check_choice

GRANULARITIES = ("global", "layer", "parameter")
EPS = 1e-6  # as in torch.nn.utils.clip_grad_norm_


@dataclass(frozen=True)
class GradientLayout:
    """The parameters to clip and the unit (model, layer or tensor) each belongs to.

    Example::

        >>> layout = GradientLayout.build(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), "layer")
        >>> layout.unit_names, layout.unit_of
        (('0', '1'), (0, 0, 1, 1))
    """

    params: tuple[Tensor, ...]
    unit_of: tuple[int, ...]
    unit_names: tuple[str, ...]

    @classmethod
    def build(cls, source: nn.Module | Iterable[Tensor], granularity: str) -> GradientLayout:
        check_choice("granularity", granularity, GRANULARITIES)
        if isinstance(source, nn.Module):
            owners = _owned_parameters(source)
        elif granularity == "layer":
            raise TypeError(
                "granularity='layer' needs the module to see its layers: call clip_(model), "
                "not clip_(model.parameters())"
            )
        else:
            owners = [(f"param{i}", [p]) for i, p in enumerate(_as_tensors(source))]
        if granularity == "layer":
            units = owners
        else:
            named = [(f"{owner}.{i}" if len(ps) > 1 else owner, p) for owner, ps in owners for i, p in enumerate(ps)]
            if granularity == "parameter":
                units = [(name, [p]) for name, p in named]
            else:
                units = [("global", [p for _, p in named])]
        params = tuple(p for _, ps in units for p in ps)
        unit_of = tuple(u for u, (_, ps) in enumerate(units) for _ in ps)
        return cls(params, unit_of, tuple(name for name, _ in units))

    @property
    def num_units(self) -> int:
        return len(self.unit_names)


def _as_tensors(params: Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params, Tensor):
        return [params]
    params = list(params)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"clip_ takes a module or an iterable of tensors; got an item of type {type(p).__name__}")
    return params


def _owned_parameters(module: nn.Module) -> list[tuple[str, list[Tensor]]]:
    """Trainable parameters grouped by the module that owns them; a tied weight counts once."""
    seen: set[int] = set()
    owners = []
    for name, sub in module.named_modules():
        ps = [p for p in sub.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in ps)
        if ps:
            owners.append((name or "<root>", ps))
    return owners


def _local(grad: Tensor) -> Tensor:
    """The tensor this rank holds: the local shard of a DTensor, the tensor itself otherwise."""
    return grad._local_tensor if hasattr(grad, "_local_tensor") else grad


def _reduction_groups(grad: Tensor, process_group: dist.ProcessGroup | None) -> tuple:
    """The process groups whose sum of squared local norms gives this gradient's squared norm.

    A DTensor is summed over the mesh dimensions it is sharded on and never over those it is
    replicated on (HSDP); a plain tensor is a shard of ``process_group`` when one is given
    (FSDP1 flat parameters) and complete otherwise (single device, DDP).
    """
    placements = getattr(grad, "placements", None)
    if placements is None:
        return () if process_group is None else (process_group,)
    if any(p.is_partial() for p in placements):
        raise ValueError(
            f"a gradient has a Partial placement {tuple(placements)}: its norm needs the reduced gradient; "
            "clip after the gradient reduction (FSDP2 and DDP do this before the optimizer step)"
        )
    mesh = grad.device_mesh
    return tuple(mesh.get_group(dim) for dim, p in enumerate(placements) if p.is_shard())


def unit_norms(
    grads: Sequence[Tensor],
    unit_of: Sequence[int],
    num_units: int,
    device: torch.device,
    index_cache: dict,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """L2 norm of each unit's gradients, over every shard, in fp32, shape ``(num_units,)``.

    ``grads`` may be DTensors (their local shards are measured, and the squares summed over
    the shard groups) or plain tensors. ``index_cache`` keeps the unit-index tensors on the
    device so that no step copies an index from the host.
    """
    buckets: dict[tuple, tuple[list[Tensor], list[int]]] = {}
    for grad, unit in zip(grads, unit_of):
        tensors, units = buckets.setdefault(_reduction_groups(grad, process_group), ([], []))
        tensors.append(_local(grad))
        units.append(unit)
    total = torch.zeros(num_units, dtype=torch.float32, device=device)
    for groups, (tensors, units) in buckets.items():
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        squares = torch.stack([n.to(device) for n in norms]).square()
        partial = torch.zeros(num_units, dtype=torch.float32, device=device)
        partial.index_add_(0, device_index(index_cache, units, device), squares)
        for group in groups:
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
        total += partial
    return total.sqrt()


def device_index(cache: dict, index: Sequence[int], device: torch.device) -> Tensor:
    """An int64 index tensor on ``device``, made once per distinct index."""
    key = (tuple(index), device)
    if key not in cache:
        cache[key] = torch.tensor(index, dtype=torch.long, device=device)
    return cache[key]


def scale_(grads: Sequence[Tensor], scale: Tensor, per_tensor_index: Tensor | None) -> None:
    """Multiply each gradient in place by its unit's factor (one factor when ``per_tensor_index`` is None)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(_local(g).device, []).append(i)
    for device, positions in by_device.items():
        tensors = [_local(grads[i]) for i in positions]
        if per_tensor_index is None:
            torch._foreach_mul_(tensors, scale[0].to(device))
        else:
            factors = scale.index_select(0, per_tensor_index).to(device).unbind()
            torch._foreach_mul_(tensors, [factors[i] for i in positions])


def zero_nonfinite_(grads: Sequence[Tensor]) -> None:
    """Replace NaN and ±Inf by zero in place (after scaling by zero this zeroes the step)."""
    for g in grads:
        torch.nan_to_num_(_local(g), nan=0.0, posinf=0.0, neginf=0.0)


def fsdp1_shard_group(root: nn.Module, granularity: str) -> dist.ProcessGroup | None:
    """The group over which FSDP1 (``FullyShardedDataParallel``) shards ``root``'s gradients.

    Its squared local norms sum to the true norm over this group; ``None`` when nothing is
    sharded (``NO_SHARD``). Per-layer clipping needs ``use_orig_params=True``, since flat
    parameters hide the layers.
    """
    from torch.distributed.fsdp import ShardingStrategy

    if root.sharding_strategy == ShardingStrategy.NO_SHARD:
        return None
    if granularity == "layer" and not getattr(root, "_use_orig_params", False):
        raise ValueError(
            "granularity='layer' cannot see layers inside FSDP1's flat parameters: wrap with "
            "use_orig_params=True, use FSDP2 (fully_shard), or granularity='global'"
        )
    return root.process_group
