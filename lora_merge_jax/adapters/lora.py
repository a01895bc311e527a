"""LoRA (Hu et al. 2022) as a pure pytree: per targeted projection, factors stacked over layers.

A projection adapted in only some layers (``layers``/``layers_to_transform``) still has stacked factors for
every layer, with scale 0 in the others; ranks that differ by layer (a per-layer ``rank_pattern``) are
zero-padded to the largest. Both keep the forward a single scan and are exact: zero rows and columns
contribute nothing and receive zero gradient, so they stay zero through training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_merge_jax.adapters import targets
from lora_merge_jax.models.config import ModelConfig
from lora_merge_jax.models.deltas import LowRankDelta
from lora_merge_jax.models.weights import ADAPTER_AXES

Array = jax.Array


@struct.dataclass
class LoraAdapter:
    """Low-rank updates ``delta_W = scale * A @ B`` for a set of projections.

    Attributes:
        a: projection -> A [L, in, R] (PEFT's ``lora_A.weight`` transposed).
        b: projection -> B [L, R, out] (PEFT's ``lora_B.weight`` transposed).
        scale: projection -> [L] float32 alpha/r (alpha/sqrt(r) for rsLoRA); 0 where a layer is not adapted.
        dropout: dropout rate on the adapter's input during training.
    """

    a: dict[str, Array]
    b: dict[str, Array]
    scale: dict[str, Array]
    dropout: float = struct.field(pytree_node=False, default=0.0)

    TRAINABLE = ("a", "b")

    def deltas(self, cfg: ModelConfig) -> dict[str, LowRankDelta]:
        """Per-projection low-rank deltas, stacked over layers, for ``model.apply_model``."""
        out = {}
        for name, a in self.a.items():
            gain_LxR = jnp.broadcast_to(self.scale[name][:, None], a.shape[::2])
            out[name] = LowRankDelta(a, self.b[name], gain_LxR)
        return out

    def logical_axes(self, cfg: ModelConfig) -> LoraAdapter:
        """The logical axes of every leaf: factors follow their base weight's input and output axes."""
        return LoraAdapter(
            a={n: ("layers", ADAPTER_AXES[n][0], "lora_rank") for n in self.a},
            b={n: ("layers", "lora_rank", ADAPTER_AXES[n][1]) for n in self.b},
            scale={n: ("layers",) for n in self.scale},
            dropout=self.dropout,
        )


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def init_lora(
    cfg: ModelConfig,
    key: Array,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    layers: Sequence[int] | None = None,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    dropout: float = 0.0,
    dtype: Any = jnp.float32,
) -> LoraAdapter:
    """A new LoRA initialised as in the paper and PEFT: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0.

    Args:
        cfg: the base model's architecture.
        key: PRNG key for A.
        rank, alpha: default rank and alpha.
        target_modules: projection names (suffix match) or a regex over module paths, as in PEFT.
        layers: only these layer indices (PEFT's ``layers_to_transform``); default all.
        use_rslora: scale alpha/sqrt(r) instead of alpha/r.
        rank_pattern, alpha_pattern: per-module overrides, regex keys as in PEFT.
        dropout: adapter-input dropout rate during training.
        dtype: factor dtype (float32 even with a bfloat16 base).

    Example:
        >>> adapter = init_lora(model.config, jax.random.key(0), rank=8, target_modules=["q_proj", "v_proj"])
    """
    chosen = targets.resolve(cfg, target_modules, layers)
    L = cfg.num_hidden_layers
    a, b, scale = {}, {}, {}
    for i, (proj, layer_ids) in enumerate(chosen.items()):
        d_in, d_out = cfg.projection_shape(proj)
        paths = {layer: targets.module_path(layer, proj) for layer in layer_ids}
        ranks = {layer: int(targets.pattern_value(rank_pattern, p, rank)) for layer, p in paths.items()}
        alphas = {layer: float(targets.pattern_value(alpha_pattern, p, alpha)) for layer, p in paths.items()}
        r_max = max(ranks.values())
        bound = 1.0 / math.sqrt(d_in)
        a_LxDxR = jax.random.uniform(jax.random.fold_in(key, i), (L, d_in, r_max), jnp.float32, -bound, bound)
        keep_LxR = np.zeros((L, r_max), np.float32)
        scale_L = np.zeros((L,), np.float32)
        for layer in layer_ids:
            keep_LxR[layer, : ranks[layer]] = 1.0
            scale_L[layer] = lora_scale(alphas[layer], ranks[layer], use_rslora)
        a[proj] = (a_LxDxR * keep_LxR[:, None, :]).astype(dtype)
        b[proj] = jnp.zeros((L, r_max, d_out), dtype)
        scale[proj] = jnp.asarray(scale_L)
    return LoraAdapter(a, b, scale, dropout)
