"""Sharding policy: one table from logical axes to mesh axes, and the mesh itself.

Every array in the project names its dimensions with logical axes (``embed``, ``ffw``, ``lora_rank``...).
This module alone decides how those map onto the physical mesh ``(data, fsdp, tensor)``, so the math in
``model.py`` and ``adapters/`` never mentions devices. The default mesh is pure data parallelism
(``data=-1``: every device), which runs unchanged on one CPU and on eight fake ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None for replicated). The single place where policy lives.
SHARDING_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "ffw": "tensor",
    "head_dim": None,
    "lora_rank": None,
    # An adapter factor's side that is not ``embed`` (heads or ffw features). Its weight's dimension is split
    # over ``tensor`` only, so on an fsdp mesh the factor, its AdamW moments, masks and pruning statistics would
    # be whole on every device (25 of 63 GiB per device for a K=8 merge at Llama-3-70B shapes); splitting it
    # over ``fsdp`` as well stores each once per fsdp group, and the step gathers a factor before its product.
    "adapter_features": ("tensor", "fsdp"),
    "lora_block": None,
    "task": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Shape of the device mesh; -1 on one axis means 'all devices left'."""

    data: int = -1  # data parallelism: batch split across devices, weights replicated
    fsdp: int = 1  # fully sharded data parallelism: batch and the embed dimension of weights split
    tensor: int = 1  # tensor parallelism: heads, ffw and vocab dimensions split


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 and checks that the mesh divides the device count.

    Raises:
        ValueError: naming the mesh and the device count when they do not fit.
    """
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh {cfg}: at most one of data/fsdp/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {cfg}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {cfg} does not divide the {num_devices} devices: the fixed axes take {known}"
            )
        sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"but {num_devices} are available"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh described by ``cfg`` over ``devices`` (default: all).

    Example:
        >>> mesh = make_mesh(MeshConfig(data=-1))
        >>> mesh.axis_names
        ('data', 'fsdp', 'tensor')
    """
    cfg = cfg or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None]) -> PartitionSpec:
    """Maps a tuple of logical axis names to a PartitionSpec through SHARDING_RULES."""
    return PartitionSpec(*(None if a is None else SHARDING_RULES[a] for a in axes))


def named_sharding(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
    """The NamedSharding of an array whose dimensions carry the logical ``axes``."""
    return NamedSharding(mesh, logical_to_spec(axes))


def mesh_axis_size(mesh: Mesh, logical_axis: str | None) -> int:
    """How many shards a dimension with this logical axis is cut into on ``mesh``."""
    rule = None if logical_axis is None else SHARDING_RULES[logical_axis]
    if rule is None:
        return 1
    names = (rule,) if isinstance(rule, str) else rule
    return int(np.prod([mesh.shape[n] for n in names]))


def check_divisible(mesh: Mesh, name: str, shape: Sequence[int], axes: Sequence[str | None]) -> None:
    """Raises a ValueError naming ``name`` when the mesh does not divide one of its dimensions."""
    for dim, axis in zip(shape, axes, strict=True):
        parts = mesh_axis_size(mesh, axis)
        if dim % parts:
            raise ValueError(
                f"{name}: dimension '{axis}' of size {dim} is not divisible by the {parts} shards the mesh "
                f"{dict(mesh.shape)} gives it; choose a mesh whose axes divide the model's dimensions"
            )


def fit_axes(mesh: Mesh, shape: Sequence[int], axes: Sequence[str | None]) -> tuple[str | None, ...]:
    """``axes`` with every logical axis that the mesh does not divide dropped (that dimension replicated).

    For arrays whose small dimensions need not divide the mesh: a LoRA rank of 8 on a 16-way axis, 3 kv
    heads on 2 tensor shards. The base weights and the batch are checked instead (``check_divisible``,
    ``batch_sharding``), since replicating those would silently multiply memory or work.
    """
    return tuple(a if a is None or d % mesh_axis_size(mesh, a) == 0 else None for d, a in zip(shape, axes, strict=True))


def batch_shards(mesh: Mesh) -> int:
    """How many parts the batch axes (``data`` x ``fsdp``) cut a batch into."""
    return mesh_axis_size(mesh, "batch")


def batch_sharding(mesh: Mesh, batch_size: int, ndim: int = 2, leading: int = 0) -> NamedSharding:
    """Sharding of a [..., batch, ...] array (``leading`` axes before the batch), split over the batch axes.

    Raises:
        ValueError: the batch axes do not divide ``batch_size`` (naming both), rather than silently
            replicating the batch on every device.
    """
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ValueError(f"batch size {batch_size} is not divisible by the {shards} batch shards of the mesh "
                         f"{dict(mesh.shape)} (data x fsdp); use a batch size that is a multiple of {shards} "
                         "or a mesh with fewer data/fsdp devices")
    return named_sharding(mesh, (None,) * leading + ("batch",) + (None,) * (ndim - leading - 1))
