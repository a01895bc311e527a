"""What an adapter contributes to one projection: a low-rank or block-diagonal update, never W + delta-W.

Every adapter type (LoRA, MELoRA, the adaptive merge) reduces, per targeted projection, to one of the two
pytrees below with a leading layer axis, so that the scanned transformer applies all of them with the
same code. ``apply`` is what the forward uses; ``weight`` materialises delta-W only for folding/export.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


def _dropout(x: Array, rate: float, rng: Array | None) -> Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def tokens_first(x_BxTxD: Array) -> Array:
    """[B, T, D] -> [B*T, D] (free: a bitcast). XLA's CPU backend turns the weight gradient of a product with
    two contracted token axes (b, t) into a transposed copy of the activations, four times slower than the
    same product over one token axis; so the low-rank products run on the flattened tokens."""
    return x_BxTxD.reshape(-1, x_BxTxD.shape[-1])


@struct.dataclass
class LowRankDelta:
    """x -> ((x @ a) * gain) @ b: a LoRA, or K merged LoRAs concatenated along the rank axis.

    Shapes are given for one layer; stacked deltas carry a leading [L] axis on every field.
    """

    a_DxR: Array  # input projection (PEFT lora_A transposed)
    b_RxF: Array  # output projection (PEFT lora_B transposed)
    gain_R: Array  # per rank-1 component scale: alpha/r for LoRA, c_k * s_k for a merge

    def apply(self, x_BxTxD: Array, rate: float = 0.0, rng: Array | None = None) -> Array:
        x_BxTxD = _dropout(x_BxTxD, rate, rng)
        dtype = x_BxTxD.dtype
        x_NxD = tokens_first(x_BxTxD)
        h_NxR = jnp.einsum("nd,dr->nr", x_NxD, self.a_DxR.astype(dtype))
        h_NxR = h_NxR * self.gain_R.astype(dtype)
        y_NxF = jnp.einsum("nr,rf->nf", h_NxR, self.b_RxF.astype(dtype))
        return y_NxF.reshape(*x_BxTxD.shape[:-1], -1)

    def weight(self) -> Array:
        """delta-W [D, F] (or [L, D, F] when stacked) in float32."""
        return jnp.einsum("...dr,...r,...rf->...df", self.a_DxR, self.gain_R, self.b_RxF)


@struct.dataclass
class BlockDelta:
    """MELoRA: N mini LoRAs on N equal slices of the input and output features (block-diagonal delta-W)."""

    a_NxDnxR: Array  # mini LoRA i maps input slice i [D/N] to rank R
    b_NxRxFn: Array  # and back to output slice i [F/N]
    gain_NxR: Array  # alpha_i / r_i per mini LoRA, broadcast over its rank

    def apply(self, x_BxTxD: Array, rate: float = 0.0, rng: Array | None = None) -> Array:
        x_BxTxD = _dropout(x_BxTxD, rate, rng)
        dtype = x_BxTxD.dtype
        n, dn, _ = self.a_NxDnxR.shape
        x_MxNxDn = tokens_first(x_BxTxD).reshape(-1, n, dn)  # M = B*T tokens
        h_MxNxR = jnp.einsum("mnd,ndr->mnr", x_MxNxDn, self.a_NxDnxR.astype(dtype))
        h_MxNxR = h_MxNxR * self.gain_NxR.astype(dtype)
        y_MxNxFn = jnp.einsum("mnr,nrf->mnf", h_MxNxR, self.b_NxRxFn.astype(dtype))
        return y_MxNxFn.reshape(*x_BxTxD.shape[:-1], -1)

    def weight(self) -> Array:
        """Block-diagonal delta-W [D, F] (or [L, D, F] when stacked) in float32."""
        blocks_NxDnxFn = jnp.einsum("...ndr,...nr,...nrf->...ndf", self.a_NxDnxR, self.gain_NxR, self.b_NxRxFn)
        n = blocks_NxDnxFn.shape[-3]
        eye_NxN = jnp.eye(n, dtype=blocks_NxDnxFn.dtype)
        # Place block i at (i, i): [.., N, Dn, N, Fn] -> [.., D, F].
        full = jnp.einsum("...ndf,nm->...ndmf", blocks_NxDnxFn, eye_NxN)
        *lead, _, dn, _, fn = full.shape
        return full.reshape(*lead, n * dn, n * fn)


Delta = LowRankDelta | BlockDelta
