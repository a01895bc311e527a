"""Sequence packing: a packed batch trains exactly as the same examples unpacked, and the packing iterator is
deterministic and resumable."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_merge_jax as lmj
from lora_merge_jax import tiny
from lora_merge_jax.data.batching import TrainIterator, pack, pad_batch, pad_packed
from lora_merge_jax.data.prompts import TokenizedExample
from lora_merge_jax.data.records import DataConfig
from lora_merge_jax.models.config import PROJECTIONS
from lora_merge_jax.sharding import MeshConfig, make_mesh
from lora_merge_jax.training.step import init_state, jit_train_step, make_train_step

TOL = 2e-5  # float32: the packed forward sums the same terms in another order (attention over longer rows)


def _examples(rng, count, vocab, low=6, high=20):
    out = []
    for _ in range(count):
        n = int(rng.integers(low, high))
        prompt = int(rng.integers(2, n - 2))
        ids = rng.integers(4, vocab, n).astype(np.int32)
        mask = np.zeros(n, np.int32)
        mask[prompt:] = 1
        out.append(TokenizedExample(ids, mask))
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tiny.make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=1, hidden=32, ffw=64, layers=2)
    return lmj.load_pretrained(path, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))


def _grad_and_loss(model, adapter, batch, bound):
    """One SGD step of lr 1 through the real train step: (loss, gradient = before - after)."""
    tx = optax.sgd(1.0)
    state = init_state(jax.tree.map(jnp.array, adapter), tx, seed=0)  # fresh buffers: the step donates them
    step = make_train_step(model.config, tx, max_target_tokens=bound)
    rows = batch["input_ids"].shape[0]
    fn = jit_train_step(step, state, model.weights, model.config, model.mesh, rows)
    before = jax.device_get(state.trainable)
    state, metrics = fn(jax.device_put(state, fn.state_shardings), {k: v[None] for k, v in batch.items()})
    after = jax.device_get(state.trainable)
    return float(metrics["loss"]), jax.tree.map(lambda b, a: b - a, before, after)


@pytest.mark.parametrize("selective", [False, True], ids=["full-head", "target-head"])
def test_packed_batch_has_the_loss_and_gradients_of_the_unpacked_batch(model, rng, selective):
    examples = _examples(rng, 7, model.config.vocab_size)
    lengths = np.array([len(e.input_ids) for e in examples])
    targets = np.array([int(e.target_mask.sum()) for e in examples])
    rows = pack(range(len(examples)), lengths, targets, max_length=48, max_targets=48)
    assert len(rows) < len(examples)  # several examples share rows
    packed = pad_packed([[examples[i] for i in r] for r in rows], 48, pad_id=0)
    unpacked = pad_batch([e.input_ids for e in examples], int(lengths.max()), 0,
                         masks=[e.target_mask for e in examples])
    lora = lmj.init_lora(model.config, jax.random.key(int(rng.integers(2**31))), rank=4, target_modules=list(PROJECTIONS))
    lora = lora.replace(b={n: jnp.asarray(rng.normal(0, 0.1, v.shape), jnp.float32) for n, v in lora.b.items()})
    lora = jax.device_get(lora)
    bound = int(packed["target_mask"].sum(axis=1).max()) if selective else None
    loss_p, grad_p = _grad_and_loss(model, lora, packed, bound)
    loss_u, grad_u = _grad_and_loss(model, lora, unpacked, int(targets.max()) if selective else None)
    np.testing.assert_allclose(loss_p, loss_u, rtol=TOL)
    for gp, gu in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_u), strict=True):
        np.testing.assert_allclose(gp, gu, rtol=TOL, atol=TOL * np.abs(gu).max())


def test_packed_rows_restart_positions_and_separate_segments(rng):
    examples = _examples(rng, 5, 100)
    batch = pad_packed([examples[:3], examples[3:]], 64, pad_id=0)
    for r, row in enumerate([examples[:3], examples[3:]]):
        segments = batch["segment_ids"][r]
        for k, example in enumerate(row, 1):
            where = np.flatnonzero(segments == k)
            np.testing.assert_array_equal(batch["input_ids"][r, where], example.input_ids)
            np.testing.assert_array_equal(batch["positions"][r, where], np.arange(len(example.input_ids)))
            np.testing.assert_array_equal(batch["target_mask"][r, where], example.target_mask)
        assert np.all(batch["attention_mask"][r] == (segments > 0))


def test_packing_iterator_covers_each_epoch_once_and_resumes_exactly(rng):
    examples = _examples(rng, 60, 100, low=5, high=30)
    cfg = DataConfig(max_length=64, max_target_length=8, batch_size=4, packing=True, shuffle_seed=3)
    it = TrainIterator(examples, cfg, 0)
    steps = it.steps_per_epoch
    seen = []
    for _ in range(steps):
        batch = next(it)
        assert batch["input_ids"].shape[1] <= cfg.max_length
        assert batch["target_mask"].sum(axis=1).max() <= it.max_target_tokens
        for r in range(batch["input_ids"].shape[0]):
            for k in range(1, batch["segment_ids"][r].max() + 1):
                seen.append(tuple(batch["input_ids"][r, batch["segment_ids"][r] == k]))
    assert len(set(seen)) == len(seen)  # nobody twice in an epoch
    assert len(seen) >= len(examples) - 3 * max(len(r) for r in it._epoch_rows(0))  # only the last partial batch is dropped

    first = TrainIterator(examples, cfg, 0)
    for _ in range(steps + 2):
        next(first)
    saved = first.state()
    want = [next(first) for _ in range(3)]
    resumed = TrainIterator(examples, cfg, 0)
    resumed.restore(saved)
    for w in want:
        got = next(resumed)
        for key in w:
            np.testing.assert_array_equal(got[key], w[key])
    with pytest.raises(ValueError, match="packing=0, this iterator has 1"):
        TrainIterator(examples, cfg, 0).restore({**saved, "packing": 0})
    unpacked = TrainIterator(examples, dataclasses.replace(cfg, packing=False), 0)
    assert unpacked.steps_per_epoch > steps  # packing takes fewer, fuller batches


def test_pack_length_makes_shorter_rows_and_a_long_example_sits_alone(rng):
    examples = _examples(rng, 40, 100, low=5, high=30)
    long_one = len(examples) // 2
    ids = rng.integers(3, 100, size=50).astype(np.int32)
    examples[long_one] = TokenizedExample(ids, np.r_[np.zeros(44, np.int32), np.ones(6, np.int32)])
    cfg = DataConfig(max_length=64, max_target_length=8, batch_size=4, packing=True, pack_length=40,
                     length_buckets=(40,))
    it = TrainIterator(examples, cfg, 0)
    rows = it._epoch_rows(0)
    lengths = [sum(len(examples[i].input_ids) for i in r) for r in rows]
    alone = [r for r in rows if long_one in r]
    assert alone == [[long_one]], alone  # 50 tokens: over pack_length, so nothing joins it
    assert all(n <= 40 for r, n in zip(rows, lengths) if r != [long_one]), lengths
    shapes = {next(it)["input_ids"].shape[1] for _ in range(it.steps_per_epoch)}
    assert shapes <= {40, 64} and 40 in shapes  # rows padded to the bucket of the batch's longest row
    assert it.packed_target_tokens >= max(int(e.target_mask.sum()) for e in examples)
    saved = it.state()
    with pytest.raises(ValueError, match="pack_length=40, this iterator has 64"):
        TrainIterator(examples, dataclasses.replace(cfg, pack_length=None), 0).restore(saved)
    older = {k: v for k, v in saved.items() if k != "pack_length"} | {"batch_index": 0}  # before pack_length
    TrainIterator(examples, dataclasses.replace(cfg, pack_length=None), 0).restore(older)
    with pytest.raises(ValueError, match=r"need 0 < pack_length \(65\) <= max_length \(64\)"):
        dataclasses.replace(cfg, pack_length=65)
    dataclasses.replace(cfg, pack_length=65, packing=False)  # unpacked, pack_length is unused: no error
    with pytest.raises(ValueError, match=r"need 0 < pack_length \(0\)"):
        dataclasses.replace(cfg, pack_length=0, packing=False)
