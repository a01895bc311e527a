"""MELoRA (Ren et al., ACL 2024): a mini-ensemble of N small LoRAs on disjoint feature slices.

Mini LoRA i sees input features [i*D/N, (i+1)*D/N) and writes output features [i*F/N, (i+1)*F/N), so
delta-W is block-diagonal: rank N*r for the parameter count of one rank-r LoRA. As in the authors' code
each mini LoRA has its own rank r_i and alpha_i (scale alpha_i / r_i); unequal ranks are zero-padded to the
largest so the forward stays one reshape and two einsums (``BlockDelta.apply``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_merge_jax.adapters import targets
from lora_merge_jax.models.config import ModelConfig
from lora_merge_jax.models.deltas import BlockDelta

Array = jax.Array


@struct.dataclass
class MeloraAdapter:
    """Block-diagonal mini-ensemble updates for a set of projections.

    Attributes:
        a: projection -> A [L, N, in/N, R].
        b: projection -> B [L, N, R, out/N].
        scale: projection -> [L, N] float32 alpha_i / r_i; 0 where a layer is not adapted.
        dropout: dropout rate on the adapter's input during training.
    """

    a: dict[str, Array]
    b: dict[str, Array]
    scale: dict[str, Array]
    dropout: float = struct.field(pytree_node=False, default=0.0)

    TRAINABLE = ("a", "b")

    def deltas(self, cfg: ModelConfig) -> dict[str, BlockDelta]:
        """Per-projection block deltas, stacked over layers, for ``model.apply_model``."""
        out = {}
        for name, a in self.a.items():
            l, n, _, r = a.shape
            gain_LxNxR = jnp.broadcast_to(self.scale[name][..., None], (l, n, r))
            out[name] = BlockDelta(a, self.b[name], gain_LxNxR)
        return out

    def logical_axes(self, cfg: ModelConfig) -> MeloraAdapter:
        """Logical axes: the mini LoRAs are small, so only the layer axis is named (kept replicated)."""
        return MeloraAdapter(
            a={n: ("layers", "lora_block", None, "lora_rank") for n in self.a},
            b={n: ("layers", "lora_block", "lora_rank", None) for n in self.b},
            scale={n: ("layers", "lora_block") for n in self.scale},
            dropout=self.dropout,
        )


def init_melora(
    cfg: ModelConfig,
    key: Array,
    num_blocks: int = 4,
    rank: int | Sequence[int] = 2,
    alpha: float | Sequence[float] = 4.0,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    layers: Sequence[int] | None = None,
    dropout: float = 0.0,
    dtype: Any = jnp.float32,
) -> MeloraAdapter:
    """A new MELoRA: each mini A ~ U(-1/sqrt(in/N), 1/sqrt(in/N)), each mini B = 0.

    Args:
        cfg: the base model's architecture.
        key: PRNG key.
        num_blocks: N, the number of mini LoRAs; must divide every targeted projection's in and out.
        rank: r, or one r_i per mini LoRA.
        alpha: alpha, or one alpha_i per mini LoRA (scale alpha_i / r_i).
        target_modules, layers: as in ``init_lora``.
        dropout: adapter-input dropout rate.
        dtype: factor dtype.

    Raises:
        ValueError: naming the projection and dimension that N does not divide.
    """
    n = num_blocks
    ranks = [rank] * n if isinstance(rank, int) else list(rank)
    alphas = [float(alpha)] * n if isinstance(alpha, (int, float)) else [float(x) for x in alpha]
    if len(ranks) != n or len(alphas) != n:
        raise ValueError(f"MELoRA: {n} mini LoRAs need {n} ranks and alphas, got {len(ranks)} and {len(alphas)}")
    chosen = targets.resolve(cfg, target_modules, layers)
    L, r_max = cfg.num_hidden_layers, max(ranks)
    keep_NxR = np.zeros((n, r_max), np.float32)
    for i, r in enumerate(ranks):
        keep_NxR[i, :r] = 1.0
    block_scale_N = np.array([al / r for al, r in zip(alphas, ranks)], np.float32)
    a, b, scale = {}, {}, {}
    for i, (proj, layer_ids) in enumerate(chosen.items()):
        d_in, d_out = cfg.projection_shape(proj)
        for dim_name, dim in (("in_features", d_in), ("out_features", d_out)):
            if dim % n:
                raise ValueError(f"MELoRA on {proj}: {dim_name}={dim} is not divisible by num_blocks={n}")
        bound = 1.0 / math.sqrt(d_in // n)
        a_full = jax.random.uniform(jax.random.fold_in(key, i), (L, n, d_in // n, r_max), jnp.float32, -bound, bound)
        a[proj] = (a_full * keep_NxR[None, :, None, :]).astype(dtype)
        b[proj] = jnp.zeros((L, n, r_max, d_out // n), dtype)
        scale_LxN = np.zeros((L, n), np.float32)
        scale_LxN[layer_ids] = block_scale_N
        scale[proj] = jnp.asarray(scale_LxN)
    return MeloraAdapter(a, b, scale, dropout)
