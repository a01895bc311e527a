"""Our forward against transformers' PyTorch models: tiny random configs, float32, seeded random tokens."""

import jax
import numpy as np
import pytest
import torch

import lora_merge_jax as lmj
from lora_merge_jax.sharding import MeshConfig, make_mesh
from tests import hf_models

TOL = 1e-4  # max absolute logit difference against transformers in float32


def _random_batch(rng, vocab=128, batch=3, length=13):
    ids = rng.integers(0, vocab, (batch, length))
    mask = np.ones_like(ids)
    mask[1, : rng.integers(1, length // 2)] = 0  # left padding
    mask[2, length - rng.integers(1, length // 2):] = 0  # right padding
    return ids, mask


def _reference(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("use_mask,length", [(False, 13), (True, 150)])  # 150: causal chunks of 64, 64, 22
def test_logits_match_transformers(hf_checkpoint, use_mask, length, rng):
    name, path = hf_checkpoint
    hf_model = hf_models.build(name)
    model = lmj.load_pretrained(path)
    ids, mask = _random_batch(rng, length=length)
    mask = mask if use_mask else None
    ours = np.asarray(lmj.forward(model, ids, attention_mask=mask))
    ref = _reference(hf_model, ids, mask)
    assert ours.shape == ref.shape == (3, length, 128)
    valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)  # padded rows are undefined
    assert np.abs(ours - ref)[valid].max() < TOL


def test_sharded_checkpoint_loads_same_logits(tmp_path, rng):
    hf_model = hf_models.save_tiny("llama3", tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = lmj.load_pretrained(tmp_path)
    ids, mask = _random_batch(rng)
    ours = np.asarray(lmj.forward(model, ids, attention_mask=mask))
    assert np.abs(ours - _reference(hf_model, ids, mask))[mask.astype(bool)].max() < TOL


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=8), MeshConfig(data=2, fsdp=2, tensor=2),
                                      MeshConfig(data=1, fsdp=4, tensor=2)])
def test_eight_devices_match_one(llama_checkpoint, mesh_cfg, rng):
    assert len(jax.devices()) == 8
    one = lmj.load_pretrained(llama_checkpoint, mesh=make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    many = lmj.load_pretrained(llama_checkpoint, mesh=make_mesh(mesh_cfg))
    q_proj = many.weights.layers.proj["q_proj"]
    assert len(q_proj.sharding.device_set) == 8
    ids, mask = _random_batch(rng, batch=8)
    a = np.asarray(lmj.forward(one, ids, attention_mask=mask))
    b = np.asarray(lmj.forward(many, ids, attention_mask=mask))
    assert np.abs(a - b).max() < 1e-5


def test_bfloat16_weights_give_close_logits(llama_checkpoint, rng):
    f32 = lmj.load_pretrained(llama_checkpoint)
    bf16 = lmj.load_pretrained(llama_checkpoint, dtype="bfloat16")
    assert bf16.weights.embed_VxD.dtype == np.dtype("bfloat16")
    ids, _ = _random_batch(rng)
    a, b = lmj.forward(f32, ids), lmj.forward(bf16, ids)
    assert b.dtype == np.float32  # logits are float32 whatever the compute dtype
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.05


def test_save_pretrained_round_trips_through_transformers(llama_checkpoint, tmp_path, rng):
    model = lmj.load_pretrained(llama_checkpoint)
    lmj.save_pretrained(model, tmp_path / "copy", max_shard_bytes=30_000)
    assert (tmp_path / "copy" / "model.safetensors.index.json").exists()
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "copy", dtype=torch.float32).eval()
    ids, mask = _random_batch(rng)
    ours = np.asarray(lmj.forward(model, ids, attention_mask=mask))
    assert np.abs(ours - _reference(reloaded, ids, mask))[mask.astype(bool)].max() < TOL


@pytest.mark.parametrize("length", [150, 512])
def test_causal_chunked_attention_gradients_match_jax(length, rng):
    """Our attention (queries in causal chunks, softmax statistics as residuals) against
    jax.nn.dot_product_attention, values and gradients, with left and right padding; float32, 2e-5."""
    from lora_merge_jax.models import attention as attention_lib

    b, h, kv, hd = 2, 4, 2, 16
    q, d_out = (rng.standard_normal((b, length, h, hd), np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, length, kv, hd), np.float32) for _ in range(2))
    valid = np.ones((b, length), bool)
    valid[0, : rng.integers(1, length // 2)] = False  # left padding: fully masked rows at the start
    valid[1, length - rng.integers(1, length // 2):] = False
    mask = np.tril(np.ones((length, length), bool))[None] & valid[:, None, :]

    def ours(q, k, v):
        return attention_lib.attention(q, k, v, mask, causal=True).reshape(b, length, h, hd)

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")

    rows = valid[:, :, None, None]  # a fully masked query row has no defined output
    outs = [jax.vjp(f, q, k, v) for f in (ours, reference)]
    np.testing.assert_allclose(np.where(rows, outs[0][0], 0), np.where(rows, outs[1][0], 0), atol=2e-5)
    d_out = np.where(rows, d_out, 0)
    for ours_grad, ref_grad in zip(outs[0][1](d_out), outs[1][1](d_out)):
        np.testing.assert_allclose(ours_grad, ref_grad, atol=2e-5)
