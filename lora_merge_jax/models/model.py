"""The user-facing ``Model`` (architecture, weights on a mesh, tokenizer) and ``forward``."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lora_merge_jax import sharding
from lora_merge_jax.models import decoder
from lora_merge_jax.models.config import ModelConfig
from lora_merge_jax.models.weights import Weights

Array = jax.Array


@dataclasses.dataclass
class Model:
    """A loaded base model: architecture, frozen weights on a mesh, and its tokenizer when present."""

    config: ModelConfig
    weights: Weights
    mesh: Mesh
    hf_config: Any  # the transformers config, kept to write it back on export
    tokenizer: Any | None = None
    compute_dtype: Any = None  # activations' dtype; None = the weights' dtype
    path: str | None = None

    @property
    def activation_dtype(self) -> Any:
        """The dtype the model computes in: ``compute_dtype``, else its weights' dtype."""
        return jnp.dtype(self.compute_dtype or self.weights.embed_VxD.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def _forward(cfg, weights, input_ids, adapter, attention_mask, compute_dtype):
    deltas = None if adapter is None else adapter.deltas(cfg)
    logits, _ = decoder.apply_model(cfg, weights, input_ids, deltas=deltas, attention_mask_BxS=attention_mask,
                                      compute_dtype=compute_dtype)
    return logits


def forward(model: Model, input_ids: Array, adapter: Any = None, attention_mask: Array | None = None) -> Array:
    """Float32 logits [batch, length, vocab] of the base model, with an adapter applied when given.

    Args:
        model: from ``load_pretrained``.
        input_ids: int array [batch, length].
        adapter: any adapter (LoRA, MELoRA, merged) or None for the base model.
        attention_mask: [batch, length], 1 for tokens and 0 for padding.

    Example:
        >>> logits = forward(model, ids, adapter=init_lora(model.config, key, rank=8))
    """
    input_ids = np.asarray(input_ids, np.int32)
    rows = input_ids.shape[0]
    shards = sharding.batch_shards(model.mesh)
    # Rows of padding up to a multiple of the batch shards (sliced off again), so that any batch runs sharded.
    padded = -(-rows // shards) * shards
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    fill = ((0, padded - rows), (0, 0))
    batch_shard = sharding.batch_sharding(model.mesh, padded)
    ids = jax.device_put(np.pad(input_ids, fill), batch_shard)
    mask = jax.device_put(np.pad(mask, fill, constant_values=1), batch_shard)
    return _forward(model.config, model.weights, ids, adapter, mask, model.compute_dtype)[:rows]
