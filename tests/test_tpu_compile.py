"""Ahead-of-time compilation of the train step for an abstract TPU topology (v5e:2x2), no TPU attached.

Runs only where libtpu is importable (``pip install "jax[tpu]"``); skipped otherwise. Nothing executes on a
TPU: the devices come from ``jax.experimental.topologies.get_topology_desc`` and are compile-only, and the
default backend stays CPU.
"""

import os

# Before libtpu loads (the first get_topology_desc call): without a worker list libtpu logs an ERROR about
# TPU_WORKER_HOSTNAMES; and every process that loads libtpu takes /tmp/libtpu_lockfile, so two such
# processes (pytest-xdist workers) fail with "Internal error when accessing libtpu multi-process lockfile"
# unless ALLOW_MULTIPLE_LIBTPU_LOAD is set.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("libtpu", reason="needs jax[tpu] (libtpu) to compile for an abstract TPU topology")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.topologies import get_topology_desc  # noqa: E402

import lora_merge_jax as lmj  # noqa: E402
from lora_merge_jax import sharding  # noqa: E402
from lora_merge_jax.models import weights as model_lib  # noqa: E402
from lora_merge_jax.models.config import ModelConfig  # noqa: E402
from lora_merge_jax.training.optim import OptimConfig, make_optimizer  # noqa: E402
from lora_merge_jax.training.step import (  # noqa: E402
    init_state,
    jit_train_step,
    make_train_step,
    state_shardings,
)

CFG = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  max_position_embeddings=512)
BATCH, SEQ = 8, 64


@pytest.fixture(scope="module")
def v5e_mesh():
    devices = get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    assert len(devices) == 4 and devices[0].device_kind == "TPU v5 lite"
    return sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4), devices)


def _bytes(tree):
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_lora_step_compiles_for_v5e_from_shapes(v5e_mesh):
    mesh = v5e_mesh
    weights = model_lib.abstract(CFG, jnp.bfloat16, mesh)
    adapter = jax.eval_shape(
        lambda: lmj.init_lora(CFG, jax.random.key(0), rank=4, target_modules=["q_proj", "v_proj"]))
    tx = make_optimizer(OptimConfig(learning_rate=1e-3), 10)
    state = jax.eval_shape(lambda a: init_state(a, tx, seed=0), adapter)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                         state_shardings(state, CFG, mesh, tx))
    step = make_train_step(CFG, tx, compute_dtype=jnp.bfloat16)
    jitted = jit_train_step(step, state, weights, CFG, mesh, BATCH).jitted
    ids = jax.ShapeDtypeStruct((1, BATCH, SEQ), jnp.int32,
                               sharding=sharding.named_sharding(mesh, (None, "batch", None)))
    compiled = jitted.lower(state, weights, {"input_ids": ids, "attention_mask": ids, "target_mask": ids}).compile()

    assert ":T(" in compiled.as_text()  # TPU tiled layouts: an XLA:TPU program, not XLA:CPU's
    mem = compiled.memory_analysis()
    # TPU pads small arrays to its tiles, so the buffers hold at least the logical per-device bytes: the
    # state, the weights and the three int32 batch arrays (sharded 4 ways over the batch).
    assert mem.argument_size_in_bytes >= _bytes(state) + _bytes(weights) + 3 * BATCH // 4 * SEQ * 4
    # The donated state is aliased to the new state: the output needs no second copy of it.
    assert mem.alias_size_in_bytes >= _bytes(state)
    assert mem.output_size_in_bytes >= mem.alias_size_in_bytes
    # temp_size_in_bytes can be 0 for a program this small (v5e keeps small temporaries out of HBM).
    assert mem.temp_size_in_bytes >= 0
    assert mem.generated_code_size_in_bytes > 0
