"""Operations every adapter type shares: trainable/frozen split, shardings, folding into the base.

An adapter is any registered dataclass with ``deltas(cfg)``, ``logical_axes(cfg)`` and a ``TRAINABLE``
tuple of field names. ``split`` returns two adapters of the same type with complementary fields set to
None, so ``jax.value_and_grad`` sees only the trainable one and the optimizer state is built for it alone.

Example:
    >>> trainable, frozen = split(adapter)            # a, b  |  scale
    >>> adapter == combine(trainable, frozen)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lora_merge_jax import sharding
from lora_merge_jax.models import weights as weights_lib
from lora_merge_jax.models.config import ModelConfig


def _array_fields(adapter: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(adapter) if f.metadata.get("pytree_node", True)]


def split(adapter: Any, trainable_fields: Sequence[str] | None = None) -> tuple[Any, Any]:
    """(trainable, frozen): the same adapter type, each with the other's fields set to None.

    Args:
        adapter: any adapter.
        trainable_fields: fields to train (default: the type's ``TRAINABLE``).
    """
    fields = tuple(trainable_fields if trainable_fields is not None else adapter.TRAINABLE)
    unknown = set(fields) - set(_array_fields(adapter))
    if unknown:
        raise ValueError(f"{type(adapter).__name__} has no field(s) {sorted(unknown)} to train")
    names = _array_fields(adapter)
    trainable = dataclasses.replace(adapter, **{n: None for n in names if n not in fields})
    frozen = dataclasses.replace(adapter, **{n: None for n in names if n in fields})
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of ``split``: fields set in ``trainable`` win over ``frozen``'s."""
    values = {n: getattr(trainable, n) for n in _array_fields(trainable) if getattr(trainable, n) is not None}
    return dataclasses.replace(frozen, **values)


def shardings(adapter: Any, cfg: ModelConfig, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of ``adapter``, from its logical axes."""
    axes = adapter.logical_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
    arrays, treedef = jax.tree.flatten(adapter)
    axes_leaves = jax.tree.leaves(axes, is_leaf=is_axes)

    # A dimension the mesh does not divide (a small rank, an odd block) stays replicated.
    return jax.tree.unflatten(treedef, [sharding.named_sharding(mesh, sharding.fit_axes(mesh, a.shape, ax))
                                        for a, ax in zip(arrays, axes_leaves, strict=True)])


def place(adapter: Any, cfg: ModelConfig, mesh: Mesh) -> Any:
    """The adapter with every leaf moved to its sharding on ``mesh``."""
    return jax.device_put(adapter, shardings(adapter, cfg, mesh))


def num_params(adapter: Any, trainable_fields: Sequence[str] | None = None) -> int:
    """Number of trainable scalars."""
    trainable, _ = split(adapter, trainable_fields)
    return sum(x.size for x in jax.tree.leaves(trainable))


def fold(model: Any, adapter: Any) -> weights_lib.Weights:
    """Base weights with the adapter folded in: W + delta_W for every adapted projection.

    The result has the base weights' dtype and sharding; use it for export or adapter-free inference.

    Example:
        >>> merged = fold(model, adapter)
        >>> save_pretrained(model, "out/merged", weights=merged)
    """
    return _fold(model.config, model.weights, adapter)


@functools.partial(jax.jit, static_argnames="cfg")
def _fold(cfg: ModelConfig, weights: weights_lib.Weights, adapter: Any) -> weights_lib.Weights:
    proj = dict(weights.layers.proj)
    for name, delta in adapter.deltas(cfg).items():
        w = proj[name]
        proj[name] = (w.astype(jnp.float32) + delta.weight()).astype(w.dtype)
    return dataclasses.replace(weights, layers=dataclasses.replace(weights.layers, proj=proj))
