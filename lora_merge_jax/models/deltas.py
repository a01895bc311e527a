"""What an adapter contributes to one projection: a low-rank or block-diagonal update, never W + delta-W.

Every adapter type (LoRA, MELoRA, the adaptive merge) reduces, per targeted projection, to one of the two
pytrees below with a leading layer axis, so that the scanned transformer applies all of them with the
same code. ``apply`` is what the forward uses; ``weight`` materialises delta-W only for folding/export.

The rank products take their operands in the activations' dtype and accumulate in float32, which is also
what they return (the rank activations and the gradients stay float32, as PEFT keeps a float32 adapter on a
bfloat16 model): XLA's CPU backend runs a bfloat16 product fast only with a float32 result (``products.py``),
and with float32 operands the bfloat16 K=8 merge step (rank 64) took 1.28x the LoRA step against 1.17x.
Callers cast the update to the activations' dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lora_merge_jax.models.products import einsum_float32

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
        y_NxF = self.up(self.down(tokens_first(x_BxTxD)), x_BxTxD.dtype)
        return y_NxF.reshape(*x_BxTxD.shape[:-1], -1).astype(x_BxTxD.dtype)

    def down(self, x_NxD: Array) -> Array:
        """The rank activations x @ a [N, R] in float32, before the gain (what the backward keeps)."""
        return einsum_float32("nd,dr->nr", x_NxD, self.a_DxR, x_NxD.dtype)

    def up(self, h_NxR: Array, dtype: Any) -> Array:
        """(h * gain) @ b [N, F] in float32, its operands in ``dtype``."""
        return einsum_float32("nr,rf->nf", h_NxR * self.gain_R, self.b_RxF, dtype)

    def down_weight(self) -> Array:
        """The matrix of ``down``: down(x) = (x @ down_weight()).reshape(-1, *rank_shape)."""
        return self.a_DxR

    @property
    def rank_shape(self) -> tuple[int, ...]:
        return self.a_DxR.shape[-1:]

    def backward(self, x_NxD: Array, h_NxR: Array, dy_NxF: Array, need: LowRankDelta
                 ) -> tuple[Array, LowRankDelta]:
        """The VJP of ``up(down(x))`` at x (with ``h = down(x)``): (the cotangent of ``down(x)`` [N, R] in
        float32, which ``input_grad`` turns into dx; the factors' gradients, None where ``need``, a LowRankDelta
        of bools, is False).

        The product over the N tokens for a is taken as [R, D] and transposed: XLA's CPU backend runs the
        [D, R] form (an R-wide output) several times slower. Its algebraic simplifier folds a plain transpose
        back into the product, which makes it that form again; the optimization barrier keeps the [R, D]
        product (3.7x on SmolLM2's down_proj a, 2,048 tokens; ``bench/profile_step.py``).
        """
        dtype = dy_NxF.dtype
        gain_R = self.gain_R.astype(jnp.float32)
        dh_NxR = einsum_float32("nf,rf->nr", dy_NxF, self.b_RxF, dtype)
        d_gain = jnp.sum(h_NxR * dh_NxR, axis=0).astype(self.gain_R.dtype) if need.gain_R else None
        dh_NxR = dh_NxR * gain_R
        d_a = (jax.lax.optimization_barrier(einsum_float32("nr,nd->rd", dh_NxR, x_NxD, dtype)).T
               .astype(self.a_DxR.dtype) if need.a_DxR else None)
        d_b = (einsum_float32("nr,nf->rf", h_NxR * gain_R, dy_NxF, dtype).astype(self.b_RxF.dtype) if need.b_RxF
               else None)
        return dh_NxR, LowRankDelta(d_a, d_b, d_gain)

    def input_grad(self, dh_NxR: Array, dtype: Any) -> Array:
        """dx [N, D] in ``dtype`` from the cotangent of ``down(x)``."""
        return einsum_float32("nr,dr->nd", dh_NxR, self.a_DxR, dtype).astype(dtype)

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
        y_NxF = self.up(self.down(tokens_first(x_BxTxD)), x_BxTxD.dtype)
        return y_NxF.reshape(*x_BxTxD.shape[:-1], -1).astype(x_BxTxD.dtype)

    def down(self, x_NxD: Array) -> Array:
        """Each mini LoRA's rank activations [N, n, R] (input slice i @ a_i) in float32, before the gain."""
        n, dn, _ = self.a_NxDnxR.shape
        return einsum_float32("mnd,ndr->mnr", x_NxD.reshape(-1, n, dn), self.a_NxDnxR, x_NxD.dtype)

    def up(self, h_NxnxR: Array, dtype: Any) -> Array:
        """The output slices (h_i * gain_i) @ b_i, concatenated [N, F], in float32 (operands in ``dtype``)."""
        y_NxnxFn = einsum_float32("mnr,nrf->mnf", h_NxnxR * self.gain_NxR, self.b_NxRxFn, dtype)
        return y_NxnxFn.reshape(y_NxnxFn.shape[0], -1)

    def down_weight(self) -> Array:
        """The matrix of ``down`` (block-diagonal [D, n*R]): down(x) = (x @ down_weight()).reshape(-1, n, R)."""
        n, dn, r = self.a_NxDnxR.shape
        eye_NxN = jnp.eye(n, dtype=self.a_NxDnxR.dtype)
        return jnp.einsum("ndr,nm->ndmr", self.a_NxDnxR, eye_NxN).reshape(n * dn, n * r)

    @property
    def rank_shape(self) -> tuple[int, ...]:
        return (self.a_NxDnxR.shape[-3], self.a_NxDnxR.shape[-1])

    def backward(self, x_NxD: Array, h_NxnxR: Array, dy_NxF: Array, need: BlockDelta
                 ) -> tuple[Array, BlockDelta]:
        """As ``LowRankDelta.backward``, block by block (the cotangent of ``down(x)`` is [N, n, R])."""
        dtype = dy_NxF.dtype
        n, dn, _ = self.a_NxDnxR.shape
        x_NxnxDn = x_NxD.reshape(-1, n, dn)
        dy_NxnxFn = dy_NxF.reshape(dy_NxF.shape[0], n, -1)
        gain_NxR = self.gain_NxR.astype(jnp.float32)
        dh_NxnxR = einsum_float32("mnf,nrf->mnr", dy_NxnxFn, self.b_NxRxFn, dtype)
        d_gain = jnp.sum(h_NxnxR * dh_NxnxR, axis=0).astype(self.gain_NxR.dtype) if need.gain_NxR else None
        dh_NxnxR = dh_NxnxR * gain_NxR
        d_a = (jax.lax.optimization_barrier(einsum_float32("mnr,mnd->nrd", dh_NxnxR, x_NxnxDn, dtype))
               .transpose(0, 2, 1).astype(self.a_NxDnxR.dtype) if need.a_NxDnxR else None)
        d_b = (einsum_float32("mnr,mnf->nrf", h_NxnxR * gain_NxR, dy_NxnxFn, dtype).astype(self.b_NxRxFn.dtype)
               if need.b_NxRxFn else None)
        return dh_NxnxR, BlockDelta(d_a, d_b, d_gain)

    def input_grad(self, dh_NxnxR: Array, dtype: Any) -> Array:
        """dx [N, D] in ``dtype`` from the cotangent of ``down(x)``."""
        dx_NxnxDn = einsum_float32("mnr,ndr->mnd", dh_NxnxR, self.a_NxDnxR, dtype)
        return dx_NxnxDn.reshape(dx_NxnxDn.shape[0], -1).astype(dtype)

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
