"""Adapter math without PEFT: MELoRA against a plain block loop, folding, and sharding on 8 devices.

Every numerical test draws random factors and tokens from its seed; logits are float32 and compared on the
non-padded positions only.
"""

import dataclasses

import jax
import numpy as np
import pytest

import lora_merge_jax as lmj
from lora_merge_jax.adapters import common
from lora_merge_jax.io import peft_export
from lora_merge_jax.io import peft_import as peft_io
from lora_merge_jax.io.safetensors import SafetensorsFile
from lora_merge_jax.models.config import PROJECTIONS
from lora_merge_jax.sharding import MeshConfig, make_mesh
from tests.train_helpers import with_random_b

TOL = 1e-4  # max absolute logit difference between two computations of the same function, float32
WEIGHT_TOL = 1e-6  # max absolute difference of delta-W entries
# The adapters most tests use; the same shapes as in test_peft_io, so compiled forwards are reused.
LORA = dict(rank=4, alpha=8.0, target_modules=PROJECTIONS)
MELORA = dict(num_blocks=4, rank=2, alpha=4.0)


def _random_batch(rng, vocab=128, batch=3, length=11):
    ids = rng.integers(0, vocab, (batch, length))
    mask = np.ones_like(ids)
    mask[1, : rng.integers(1, length // 2)] = 0  # left padding
    mask[-1, length - rng.integers(1, length // 2):] = 0  # right padding
    return ids, mask


def _max_diff(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


def _logits(model, ids, mask, adapter=None):
    return np.asarray(lmj.forward(model, ids, adapter=adapter, attention_mask=mask))


def _init(init, cfg, rng, **kwargs):
    """``init(cfg, key, **kwargs)`` with a fresh key, its zero B factors replaced by N(0, 0.1) so that the
    adapter changes the logits."""
    return with_random_b(init(cfg, jax.random.key(int(rng.integers(2**31))), **kwargs), rng)


@pytest.fixture(scope="module")
def model(llama_checkpoint):
    return lmj.load_pretrained(llama_checkpoint, load_tokenizer=False)


def test_melora_delta_matches_block_loop(model, rng):
    cfg = model.config
    adapter = _init(lmj.init_melora, cfg, rng, num_blocks=4, rank=[1, 2, 3, 2], alpha=[2, 4, 1, 3],
                    target_modules=["q_proj", "k_proj", "down_proj"], layers=[1])
    folded = lmj.fold(model, adapter)
    for proj in PROJECTIONS:
        base = np.asarray(model.weights.layers.proj[proj])
        if proj not in adapter.a:
            np.testing.assert_array_equal(np.asarray(folded.layers.proj[proj]), base)
            continue
        a, b, scale = (np.asarray(x) for x in (adapter.a[proj], adapter.b[proj], adapter.scale[proj]))
        layers, n, dn, _ = a.shape
        fn = b.shape[-1]
        ref = np.zeros((layers, n * dn, n * fn), np.float32)
        for layer in range(layers):
            for i in range(n):
                ref[layer, i * dn:(i + 1) * dn, i * fn:(i + 1) * fn] = scale[layer, i] * a[layer, i] @ b[layer, i]
        assert not ref[0].any() and ref[1].any()  # adapted in layer 1 only
        weight = np.asarray(adapter.deltas(cfg)[proj].weight())
        np.testing.assert_allclose(weight, ref, atol=WEIGHT_TOL, err_msg=proj)
        np.testing.assert_allclose(np.asarray(folded.layers.proj[proj]) - base, ref, atol=WEIGHT_TOL, err_msg=proj)


def test_melora_with_one_block_is_lora(model, rng):
    cfg = model.config
    lora = _init(lmj.init_lora, cfg, rng, **LORA)
    melora = lmj.MeloraAdapter(a={p: x[:, None] for p, x in lora.a.items()},
                               b={p: x[:, None] for p, x in lora.b.items()},
                               scale={p: x[:, None] for p, x in lora.scale.items()})
    for proj in lora.a:
        np.testing.assert_allclose(np.asarray(melora.deltas(cfg)[proj].weight()),
                                   np.asarray(lora.deltas(cfg)[proj].weight()), atol=WEIGHT_TOL, err_msg=proj)
    ids, mask = _random_batch(rng)
    assert _max_diff(_logits(model, ids, mask, melora), _logits(model, ids, mask, lora), mask) < TOL


@pytest.mark.parametrize("kind", ["lora", "melora"])
def test_folded_weights_give_adapter_logits(model, kind, rng):
    if kind == "lora":
        adapter = _init(lmj.init_lora, model.config, rng, **LORA)
    else:
        adapter = _init(lmj.init_melora, model.config, rng, **MELORA)
    folded = dataclasses.replace(model, weights=lmj.fold(model, adapter))
    ids, mask = _random_batch(rng)
    ours = _logits(model, ids, mask, adapter)
    assert _max_diff(ours, _logits(folded, ids, mask), mask) < TOL
    assert _max_diff(ours, _logits(model, ids, mask), mask) > 10 * TOL  # the adapter really changes the logits


@pytest.mark.parametrize("proj, blocks, message", [("gate_proj", 3, "gate_proj: in_features=64"),
                                                   ("k_proj", 64, "k_proj: out_features=32")])
def test_melora_needs_blocks_that_divide_features(model, proj, blocks, message):
    with pytest.raises(ValueError, match=f"MELoRA on {message} is not divisible by num_blocks={blocks}"):
        lmj.init_melora(model.config, jax.random.key(0), num_blocks=blocks, rank=1, alpha=1.0, target_modules=[proj])


def _spec(array):
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (array.ndim - len(spec))


def test_lora_follows_base_sharding_and_eight_devices_match_one(llama_checkpoint, tmp_path, rng):
    assert len(jax.devices()) == 8
    one = lmj.load_pretrained(llama_checkpoint, mesh=make_mesh(MeshConfig(), devices=jax.devices()[:1]),
                              load_tokenizer=False)
    many = lmj.load_pretrained(llama_checkpoint, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
                               load_tokenizer=False)
    adapter = _init(lmj.init_lora, one.config, rng, **LORA, dropout=0.05)
    peft_export.save_peft_adapter(adapter, tmp_path, one)
    placed = common.place(adapter, many.config, many.mesh)
    loaded = peft_io.load_peft_adapter(tmp_path, many)
    assert loaded.dropout == 0.05
    # A factor's embed side is split as the base weight's (fsdp); its heads/ffw side, which the base splits over
    # tensor only, over tensor and fsdp, so that no device holds a whole factor; the rank is replicated.
    adapter_side = lambda base_axis: ("tensor", "fsdp") if base_axis == "tensor" else base_axis  # noqa: E731
    for sharded in (placed, loaded):
        for proj in PROJECTIONS:
            base = _spec(many.weights.layers.proj[proj])  # (layers, in, out), e.g. (None, fsdp, tensor) for q_proj
            a, b = sharded.a[proj], sharded.b[proj]
            assert _spec(a) == (None, adapter_side(base[1]), None), proj  # A [L, in, R]
            assert _spec(b) == (None, None, adapter_side(base[2])), proj  # B [L, R, out]
            assert len(a.sharding.device_set) == len(b.sharding.device_set) == 8
    assert _spec(many.weights.layers.proj["o_proj"])[1:] == ("tensor", "fsdp")  # the check above is not vacuous
    # Exporting the sharded adapter gathers it and writes the very same tensors.
    first = SafetensorsFile(tmp_path / peft_io.WEIGHTS_NAME)
    again = SafetensorsFile(peft_export.save_peft_adapter(loaded, tmp_path / "again", many) / peft_io.WEIGHTS_NAME)
    assert sorted(again.keys()) == sorted(first.keys())
    for key in first.keys():
        np.testing.assert_array_equal(again[key], first[key], err_msg=key)

    ids, mask = _random_batch(rng, batch=8)
    ref = _logits(one, ids, mask, common.place(adapter, one.config, one.mesh))
    assert np.abs(ref - _logits(many, ids, mask, placed)).max() < 1e-5
    assert np.abs(ref - _logits(many, ids, mask, loaded)).max() < 1e-5
