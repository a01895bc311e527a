"""Small builders shared by the training and adapter tests."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lora_merge_jax import config
from lora_merge_jax.training.config import TrainConfig


def tiny_train_config(out, *overrides: str) -> TrainConfig:
    """The embedded tiny model and task with a short, fast run."""
    base = [f"output_dir={out}", "train.steps=6", "train.save_every=3", "train.log_every=1",
            "train.progress=false", "train.async_checkpoints=false", "data.batch_size=8",
            "optim.learning_rate=0.01", "adapter.rank=4"]
    return config.load_config(TrainConfig, None, base + list(overrides))


def random_batch(rng: np.random.Generator, micro: int = 1, batch: int = 8, length: int = 24, vocab: int = 100,
                 prompt: int = 8) -> dict[str, np.ndarray]:
    """A [M, B, T] batch whose last T - prompt tokens are targets."""
    ids = rng.integers(4, vocab, (micro, batch, length)).astype(np.int32)
    target = np.zeros_like(ids)
    target[..., prompt:] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "target_mask": target}


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def with_random_b(adapter, rng: np.random.Generator):
    """``adapter`` with its B factors drawn from N(0, 0.1) instead of PEFT's zeros, so that it changes the
    logits and every factor gets a gradient."""
    return dataclasses.replace(adapter, b={p: jnp.asarray(rng.normal(0, 0.1, b.shape), b.dtype)
                                           for p, b in adapter.b.items()})
