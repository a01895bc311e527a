"""The frozen base weights: each weight described once, everything else derived from that description.

Every layer is stacked along a leading [L] axis so that the transformer (``decoder.py``) is one scan.
``describe`` gives each weight's shape and logical axes; ``abstract`` (ShapeDtypeStructs), ``shardings``
and ``init_random`` are derived from it, as are the checkpoint readers in ``io/``.

Shapes use suffixes: D hidden, F ffw, V vocab, L layers, B batch, S cache slots, K kv heads, Hd head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from lora_merge_jax import sharding
from lora_merge_jax.models import bits
from lora_merge_jax.models.config import PROJECTIONS, ModelConfig

Array = jax.Array


@struct.dataclass
class LayerWeights:
    """One transformer block's weights, stacked over layers: every leaf has a leading [L] axis."""

    attn_norm_LxD: Array
    mlp_norm_LxD: Array
    proj: dict[str, Array]  # projection name -> [L, in, out] (transformers stores [out, in])
    bias: dict[str, Array]  # projection name -> [L, out], only for biased projections


@struct.dataclass
class Weights:
    """The frozen base model."""

    embed_VxD: Array
    layers: LayerWeights
    final_norm_D: Array
    lm_head_DxV: Array | None  # None when the embeddings are tied


@struct.dataclass
class KVCache:
    """Key/value cache for generation, slot-indexed: slot s of row b holds the token at column s. bfloat16
    keys and values are held as uint16 bits (``bits.py``): read them with ``bits.from_storage``."""

    k_LxBxSxKxHd: Array
    v_LxBxSxKxHd: Array


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Description of one weight: its shape and the logical axis of each dimension."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]


PROJ_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "ffw"),
    "up_proj": ("embed", "ffw"),
    "down_proj": ("ffw", "embed"),
}
# The same for an adapter's factors (a: [D, R], b: [R, F]): the side that is not ``embed`` has its own name,
# sharded over fsdp too (see sharding.SHARDING_RULES).
ADAPTER_AXES = {name: tuple(a if a == "embed" else "adapter_features" for a in axes)
                for name, axes in PROJ_AXES.items()}


def describe(cfg: ModelConfig) -> Weights:
    """The single description of every base weight, as a Weights tree of ParamSpec."""
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    layers = LayerWeights(
        attn_norm_LxD=ParamSpec((L, D), ("layers", None)),
        mlp_norm_LxD=ParamSpec((L, D), ("layers", None)),
        proj={p: ParamSpec((L, *cfg.projection_shape(p)), ("layers", *PROJ_AXES[p])) for p in PROJECTIONS},
        bias={
            p: ParamSpec((L, cfg.projection_shape(p)[1]), ("layers", PROJ_AXES[p][1]))
            for p in cfg.biased_projections
        },
    )
    return Weights(
        embed_VxD=ParamSpec((V, D), ("vocab", "embed")),
        layers=layers,
        final_norm_D=ParamSpec((D,), (None,)),
        lm_head_DxV=None if cfg.tie_word_embeddings else ParamSpec((D, V), ("embed", "vocab")),
    )


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def abstract(cfg: ModelConfig, dtype: Any = jnp.float32, mesh: Mesh | None = None) -> Weights:
    """ShapeDtypeStructs of the weights (with shardings when a mesh is given); nothing is allocated."""

    def one(spec: ParamSpec) -> jax.ShapeDtypeStruct:
        shard = sharding.named_sharding(mesh, spec.axes) if mesh is not None else None
        return jax.ShapeDtypeStruct(spec.shape, dtype, sharding=shard)

    return jax.tree.map(one, describe(cfg), is_leaf=_is_spec)


def shardings(cfg: ModelConfig, mesh: Mesh) -> Weights:
    """The NamedSharding of every weight on ``mesh``; checks the mesh divides every dimension."""

    def one(path: Any, spec: ParamSpec) -> jax.sharding.NamedSharding:
        sharding.check_divisible(mesh, jax.tree_util.keystr(path), spec.shape, spec.axes)
        return sharding.named_sharding(mesh, spec.axes)

    return jax.tree_util.tree_map_with_path(one, describe(cfg), is_leaf=_is_spec)


def init_random(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32, mesh: Mesh | None = None,
                std: float = 0.02) -> Weights:
    """Random weights (normal(0, std), norms at 1), built directly in their shardings.

    Used for tiny test models and pretraining from scratch; real models come from ``load_pretrained``.
    """
    specs = describe(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)

    def build(key: Array) -> Weights:
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, spec in zip(keys, leaves):
            if spec.axes[-1] is None:  # norm scales start at one
                out.append(jnp.ones(spec.shape, dtype))
            else:
                out.append((std * jax.random.normal(k, spec.shape)).astype(dtype))
        return jax.tree.unflatten(treedef, out)

    out_shardings = shardings(cfg, mesh) if mesh is not None else None
    return jax.jit(build, out_shardings=out_shardings)(key)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any) -> KVCache:
    """An empty cache of ``length`` slots for ``dtype`` keys and values (bfloat16 ones held as uint16 bits:
    ``bits.py``)."""
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
    stored = bits.storage_dtype(dtype)
    return KVCache(jnp.zeros(shape, stored), jnp.zeros(shape, stored))
