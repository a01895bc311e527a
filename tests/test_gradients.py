"""The adapter's training gradients against PyTorch + PEFT's ``loss.backward()`` on the same tiny checkpoint.

Our layers have a hand-written backward (``decoder._layer``); this checks it, through the real train step,
against autodiff we did not write: in float32 to 1e-4 of the gradient's scale, and with bfloat16 weights
and activations (float32 adapter), where our gradient must be as close to PEFT's float32 gradient as PEFT's
own bfloat16 gradient is (a bound measured in the same test, not a tolerance picked for us). The LM head's
hand-written backward is checked against JAX's autodiff of the plain product, and the layers' (for every
adapter kind, with and without dropout) against JAX's autodiff of their plain forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import lora_merge_jax as lmj
from lora_merge_jax.io import peft_import
from lora_merge_jax.merge import adaptive
from lora_merge_jax.models.config import PROJECTIONS
from lora_merge_jax.models.decoder import apply_model
from lora_merge_jax.sharding import MeshConfig, make_mesh
from lora_merge_jax.training.step import init_state, jit_train_step, make_train_step
from tests import hf_models
from tests.train_helpers import with_random_b

TOL = 1e-4  # float32: largest difference over the largest gradient entry of each tensor
BF16_SLACK = 2.0  # bfloat16: our relative error may be at most this multiple of PEFT's own bfloat16 error
# Hand-written layer backward against autodiff of the forward: relative error (norm of the difference over
# the norm of the reference) of each gradient tensor. Float32 differs only in summation order (measured
# up to 1e-6); bfloat16 rounds products' operands and results at different points in the two (measured
# 5e-3 to 1.5e-2 over four seeds, largest for the gains, sums over every token). A lost or doubled term
# gives errors near 1.
LAYER_TOL = {"float32": 1e-5, "bfloat16": 4e-2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny Llama 3 checkpoint, a PEFT LoRA on all projections with random A and B (saved), and a batch
    with left padding whose last 6 tokens are the target."""
    path = tmp_path_factory.mktemp("llama3")
    hf_models.save_tiny("llama3", path / "model")
    seed = 20261202
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(hf_models.build("llama3"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(PROJECTIONS), lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:  # PEFT starts B at 0, which would zero A's gradient
                torch.nn.init.normal_(p, std=0.1)
    peft_model.save_pretrained(path / "adapter")
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 128, (3, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    target = np.zeros_like(ids)
    target[:, -6:] = 1
    return path, {"input_ids": ids, "attention_mask": mask, "target_mask": target}


@pytest.fixture(scope="module")
def peft_float32(setup):
    """PEFT's float32 gradients: the reference of both the float32 and the bfloat16 comparison."""
    return _peft_gradients(*setup, torch.float32)


def _peft_gradients(path, batch, dtype):
    """{(projection, "a" | "b"): [L, ...]} of PEFT's LoRA on the checkpoint in ``dtype`` (adapter float32), in
    our orientation (a: [D, R], b: [R, F])."""
    base = transformers.AutoModelForCausalLM.from_pretrained(path / "model", dtype=dtype)
    model = peft.PeftModel.from_pretrained(base, path / "adapter", is_trainable=True)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    labels = torch.where(torch.tensor(batch["target_mask"]) == 1, ids, torch.tensor(-100))
    model(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]), labels=labels).loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            layer = int(name.split(".layers.")[1].split(".")[0])
            proj = next(n for n in PROJECTIONS if f".{n}." in name)
            key = (proj, "a" if ".lora_A." in name else "b")
            grads.setdefault(key, {})[layer] = p.grad.float().numpy().T
    return {key: np.stack([by_layer[i] for i in sorted(by_layer)]) for key, by_layer in grads.items()}


def _our_gradients(path, batch, dtype):
    """The same gradients from one SGD step of learning rate 1 through our train step (before - after)."""
    model = lmj.load_pretrained(path / "model", dtype=dtype, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))
    adapter = peft_import.load_peft_adapter(path / "adapter", model)
    tx = optax.sgd(1.0)
    state = init_state(adapter, tx, seed=0)
    step = jit_train_step(make_train_step(model.config, tx, compute_dtype=model.compute_dtype), state,
                          model.weights, model.config, model.mesh, batch["input_ids"].shape[0])
    before = jax.device_get(state.trainable)
    state, _ = step(jax.device_put(state, step.state_shardings), {k: v[None] for k, v in batch.items()})
    after = jax.device_get(state.trainable)
    grads = {}
    for proj in before.a:
        grads[(proj, "a")] = np.asarray(before.a[proj] - after.a[proj])
        grads[(proj, "b")] = np.asarray(before.b[proj] - after.b[proj])
    return grads


def _relative_error(ours, reference):
    """||ours - reference|| / ||reference|| over every tensor together."""
    diff = sum(float(np.sum((ours[k] - reference[k]) ** 2)) for k in reference)
    return (diff / sum(float(np.sum(reference[k] ** 2)) for k in reference)) ** 0.5


def test_float32_gradients_equal_peft(setup, peft_float32):
    path, batch = setup
    ours, reference = _our_gradients(path, batch, jnp.float32), peft_float32
    assert sorted(ours) == sorted(reference)
    for key, ref in reference.items():
        assert np.abs(ref).max() > 0, key
        np.testing.assert_allclose(ours[key], ref, atol=TOL * np.abs(ref).max(), err_msg=str(key))


def test_bfloat16_gradients_are_as_close_to_float32_as_peft_bfloat16(setup, peft_float32):
    path, batch = setup
    reference = peft_float32
    peft_error = _relative_error(_peft_gradients(path, batch, torch.bfloat16), reference)
    our_error = _relative_error(_our_gradients(path, batch, jnp.bfloat16), reference)
    print(f"relative error against PEFT float32: ours bfloat16 {our_error:.2e}, PEFT bfloat16 {peft_error:.2e}")
    assert 0 < peft_error < 0.1  # bfloat16 rounding, not a different gradient
    assert our_error <= BF16_SLACK * peft_error


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "lm_head"])
def test_lm_head_backward_equals_autodiff_of_the_product(tied):
    """``decoder.lm_logits``'s hand-written backward (cotangent in the activations' dtype) against JAX's
    autodiff of the plain float32 product, for the hidden states and the head's weights."""
    from lora_merge_jax.models import decoder
    from lora_merge_jax.models.weights import Weights

    seed = 1202
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (2, 5, 16))
    w = jax.random.normal(keys[1], (40, 16) if tied else (16, 40))
    d_logits = jax.random.normal(keys[2], (2, 5, 40))
    weights = Weights(embed_VxD=w if tied else jnp.zeros((40, 16)), layers=None, final_norm_D=None,
                      lm_head_DxV=None if tied else w)
    subscripts = "btd,vd->btv" if tied else "btd,dv->btv"

    def ours(x, w):
        swapped = weights.replace(embed_VxD=w) if tied else weights.replace(lm_head_DxV=w)
        return decoder.lm_logits(swapped, x)

    out, vjp = jax.vjp(ours, x, w)
    ref_out, ref_vjp = jax.vjp(lambda x, w: jnp.einsum(subscripts, x, w), x, w)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, err_msg=f"seed {seed}")
    for got, want in zip(vjp(d_logits), ref_vjp(d_logits), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"seed {seed}")


# LoRA without dropout (folded in float32, appended in bfloat16) is the PEFT tests' case above.
@pytest.mark.parametrize("kind, dtype, dropout", [
    ("lora", "float32", 0.2), ("lora", "bfloat16", 0.2), ("melora", "bfloat16", 0.0), ("merge", "float32", 0.0),
    ("merge", "bfloat16", 0.0)])
def test_layer_backward_equals_autodiff_of_the_forward(llama_checkpoint, kind, dtype, dropout, seed, rng):
    """The adapter's gradients (a, b and the gains) of a random cotangent of the logits, through the layers'
    hand-written backward and through JAX's autodiff of the same forward (``reference_backward``): with
    dropout the adapters read their own input; without it, in float32 they are folded into the weights,
    in bfloat16 their ``down`` products join the projections' products, forward and backward. The weights
    are frozen, as in training (bfloat16 ones pass through the layers as bits)."""
    model = lmj.load_pretrained(llama_checkpoint, load_tokenizer=False, dtype=dtype)
    cfg = model.config
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    if kind == "lora":
        adapter = with_random_b(lmj.init_lora(cfg, next(keys), rank=4, alpha=8.0, target_modules=PROJECTIONS), rng)
    elif kind == "melora":
        adapter = with_random_b(lmj.init_melora(cfg, next(keys), num_blocks=4, rank=2, alpha=4.0,
                                            target_modules=PROJECTIONS), rng)
    else:
        loras = [with_random_b(lmj.init_lora(cfg, next(keys), rank=r, alpha=8.0, target_modules=PROJECTIONS), rng)
                 for r in (2, 4, 3)]
        adapter = adaptive.merge_for_training(loras, "task_layer", init_coefficients=0.7)
    deltas = adapter.deltas(cfg)
    ids = jnp.asarray(rng.integers(4, 128, (2, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    cotangent = jnp.asarray(rng.normal(size=(2, 12, cfg.vocab_size)), jnp.float32)
    dropout_rng = next(keys) if dropout else None

    def grads(reference):
        def loss(deltas):
            logits, _ = apply_model(cfg, model.weights, ids, deltas=deltas, dropout=dropout, dropout_rng=dropout_rng,
                                    attention_mask_BxS=mask, compute_dtype=model.compute_dtype,
                                    reference_backward=reference, frozen_weights=True)
            return jnp.sum(logits * cotangent)
        return jax.device_get(jax.jit(jax.grad(loss))(deltas))

    ours, reference = grads(False), grads(True)
    errors = {jax.tree_util.keystr(path): float(np.linalg.norm(np.float32(got) - np.float32(want))
                                                / np.linalg.norm(np.float32(want)))
              for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(reference),
                                           strict=True)}
    assert len(errors) == 3 * len(PROJECTIONS), sorted(errors)  # a, b and the gain of every projection
    worst = max(errors, key=errors.get)
    print(f"{kind} {dtype} dropout {dropout}: worst relative error {errors[worst]:.1e} ({worst})")
    assert errors[worst] <= LAYER_TOL[dtype], f"seed {seed}: {worst} {errors[worst]:.2e}"
