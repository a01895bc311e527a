"""Hugging Face checkpoints in and out, and the user-facing ``Model`` and ``forward``.

``load_pretrained`` reads ``config.json`` through transformers' ``AutoConfig`` (which normalises the many
historical spellings of the rope settings), then builds each stacked weight with
``jax.make_array_from_callback``: every device asks only for its own shard, which is sliced out of the
memory-mapped safetensors file(s) one tensor at a time. No full copy of the model is ever assembled on the
host. ``save_pretrained`` writes the reverse mapping, so transformers loads what we write.

A llama.cpp ``.gguf`` file (or a directory holding exactly one, and no ``config.json``) takes the same
path: ``io.gguf.GGUFCheckpoint`` gives the tensors (each device dequantizes only its shard), the config is
built from the file's metadata and the tokenizer and chat template from its ``tokenizer.*`` keys.
``convert_gguf`` writes a GGUF as a Hugging Face checkpoint directory, one tensor at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lora_merge_jax import sharding
from lora_merge_jax.adapters.common import fold
from lora_merge_jax.io import gguf as gguf_io
from lora_merge_jax.io.safetensors import CheckpointFiles, write_safetensors
from lora_merge_jax.models import weights as weights_lib
from lora_merge_jax.models.config import PROJECTIONS, ModelConfig, from_hf_config
from lora_merge_jax.models.model import Model

Array = jax.Array

_HF_PROJ_PREFIX = {p: "self_attn" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    p: "mlp" for p in ("gate_proj", "up_proj", "down_proj")
}
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def hf_names(cfg: ModelConfig) -> weights_lib.Weights:
    """The transformers tensor name(s) behind every weight: a tuple over layers for stacked weights."""

    def per_layer(fmt: str) -> tuple[str, ...]:
        return tuple(fmt.format(i=i) for i in range(cfg.num_hidden_layers))

    layers = weights_lib.LayerWeights(
        attn_norm_LxD=per_layer("model.layers.{i}.input_layernorm.weight"),
        mlp_norm_LxD=per_layer("model.layers.{i}.post_attention_layernorm.weight"),
        proj={p: per_layer(f"model.layers.{{i}}.{_HF_PROJ_PREFIX[p]}.{p}.weight") for p in PROJECTIONS},
        bias={p: per_layer(f"model.layers.{{i}}.{_HF_PROJ_PREFIX[p]}.{p}.bias") for p in cfg.biased_projections},
    )
    return weights_lib.Weights(
        embed_VxD="model.embed_tokens.weight",
        layers=layers,
        final_norm_D="model.norm.weight",
        lm_head_DxV=None if cfg.tie_word_embeddings else "lm_head.weight",
    )


def _is_name(x: Any) -> bool:
    return isinstance(x, (str, tuple))


def _transposed(spec: weights_lib.ParamSpec) -> bool:
    # transformers' Linear stores [out, in]; we keep [in, out] so that x @ W reads left to right.
    return len(spec.shape) == 3 or spec.axes == ("embed", "vocab")


def _read_hf_config(path: Path) -> Any:
    import transformers

    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing; a Hugging Face checkpoint directory needs config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(
            f"{config_file}: model_type '{model_type}' is not supported; supported: llama, mistral, qwen2"
        )
    return transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)


def _gguf_source(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the one ``.gguf`` of a directory without config.json."""
    if path.is_file():
        if gguf_io.is_gguf_file(path):
            return path
        raise ValueError(f"{path}: a file, but not a .gguf file; expected a checkpoint directory or a .gguf file")
    if (path / "config.json").exists():
        return None
    found = sorted(p for p in path.glob("*") if gguf_io.is_gguf_file(p))
    if len(found) > 1:
        raise ValueError(f"{path}: no config.json and {len(found)} .gguf files ({', '.join(p.name for p in found)}); "
                         "pass the .gguf file to load")
    return found[0] if found else None


def load_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32, mesh: Mesh | None = None,
                    compute_dtype: Any = None, load_tokenizer: bool = True) -> Model:
    """Loads a Llama/Mistral/Qwen2 checkpoint (safetensors directory or llama.cpp GGUF) onto ``mesh``.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or a sharded index; or a ``.gguf``
            file (architectures ``llama``, which covers Mistral, and ``qwen2``; types F32, F16, BF16, Q8_0,
            Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K), or a directory holding exactly one ``.gguf`` and no
            ``config.json``. A GGUF's weights are dequantized to float32 and then cast to ``dtype``; its
            config and tokenizer (with chat template) come from its metadata, and ``Model.path`` is the file.
        dtype: parameter dtype of the frozen weights (float32 or bfloat16).
        mesh: device mesh (default: every device on the ``data`` axis).
        compute_dtype: activations' dtype (default: ``dtype``).
        load_tokenizer: also load the tokenizer with ``AutoTokenizer`` when its files are present (for a
            GGUF: when its metadata describes one).

    Returns:
        A Model whose weights are sharded on ``mesh``.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a directory lacks config.json / weights.
        ValueError: unsupported architecture, tensor or quantization type, or a damaged file (the message
            names the file).

    Example:
        >>> model = load_pretrained("checkpoints/Llama-3.2-1B", dtype=jnp.bfloat16)
        >>> model = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
        >>> logits = forward(model, jnp.array([[1, 2, 3]]))
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory or .gguf file")
    gguf_file = _gguf_source(path)
    files: CheckpointFiles | gguf_io.GGUFCheckpoint
    if gguf_file is not None:
        files = gguf_io.GGUFCheckpoint(gguf_file)
        hf_config = gguf_io.transformers_config(files.config)
        source, origin = str(gguf_file), "the GGUF metadata"
    else:
        hf_config = _read_hf_config(path)
        source, origin = str(path / "config.json"), "config.json"
    cfg = from_hf_config(hf_config, source=source)
    mesh = mesh or sharding.make_mesh()
    if gguf_file is None:
        files = CheckpointFiles(path)
    specs = weights_lib.describe(cfg)
    names = hf_names(cfg)
    shards = weights_lib.shardings(cfg, mesh)
    np_dtype = np.dtype(jnp.dtype(dtype))

    expected: set[str] = set()
    for name in jax.tree.leaves(names, is_leaf=_is_name):
        expected.update(name if isinstance(name, tuple) else (name,))
    unexpected = [
        n for n in files.names()
        if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
        and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    ]
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors for a {cfg.model_type} model of this config: "
                         f"{', '.join(sorted(unexpected)[:5])}")

    def fetch(name: str, want: tuple[int, ...]) -> np.ndarray:
        if name not in files:
            raise ValueError(f"{path}: tensor '{name}' is missing from the checkpoint")
        arr, file = files.get(name)
        if tuple(arr.shape) != want:
            raise ValueError(f"{file}: tensor '{name}' has shape {tuple(arr.shape)}, expected {want} from {origin}")
        return arr

    def load(spec: weights_lib.ParamSpec, name: str | tuple[str, ...], shard: jax.sharding.Sharding) -> Array:
        stacked = isinstance(name, tuple)
        per_shape = spec.shape[1:] if stacked else spec.shape
        hf_shape = per_shape[::-1] if _transposed(spec) else per_shape
        layer_names = name if stacked else (name,)
        sources = [fetch(n, tuple(hf_shape)) for n in layer_names]

        def callback(index: tuple[slice, ...]) -> np.ndarray:
            inner = index[1:] if stacked else index
            picks = sources[index[0]] if stacked else sources
            parts = [(src[inner[::-1]].T if _transposed(spec) else src[inner]).astype(np_dtype) for src in picks]
            return np.stack(parts) if stacked else parts[0]

        return jax.make_array_from_callback(spec.shape, shard, callback)

    weights = jax.tree.map(load, specs, names, shards, is_leaf=lambda x: isinstance(x, weights_lib.ParamSpec))
    tokenizer = None
    if isinstance(files, gguf_io.GGUFCheckpoint):
        if load_tokenizer and "tokenizer.ggml.tokens" in files.reader.fields:
            tokenizer = files.tokenizer()
        return Model(cfg, weights, mesh, hf_config, tokenizer, compute_dtype, str(gguf_file))
    if load_tokenizer and any((path / f).exists() for f in TOKENIZER_FILES):
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    return Model(cfg, weights, mesh, hf_config, tokenizer, compute_dtype, str(path))


def _hf_tensors(cfg: ModelConfig, weights: weights_lib.Weights, dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
    specs = weights_lib.describe(cfg)
    is_spec = lambda x: isinstance(x, weights_lib.ParamSpec)
    flat_specs = jax.tree.leaves(specs, is_leaf=is_spec)
    flat_names = jax.tree.leaves(hf_names(cfg), is_leaf=_is_name)
    flat_weights = jax.tree.leaves(weights)
    np_dtype = np.dtype(jnp.dtype(dtype))
    for spec, name, value in zip(flat_specs, flat_names, flat_weights, strict=True):
        host = np.asarray(jax.device_get(value)).astype(np_dtype)
        if isinstance(name, tuple):
            for i, n in enumerate(name):
                yield n, (host[i].T if _transposed(spec) else host[i])
        else:
            yield name, (host.T if _transposed(spec) else host)


def _write_checkpoint(path: Path, tensors: Iterable[tuple[str, Any]], hf_config: Any, tokenizer: Any,
                      dtype: Any, max_shard_bytes: int) -> Path:
    """Writes ``tensors`` (numpy arrays, or lazy ones with ``shape``/``dtype``/``nbytes`` that become arrays
    only when written), ``hf_config`` and ``tokenizer`` as a Hugging Face checkpoint directory."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, arr in tensors:
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, arr))
        size += arr.nbytes
    if len(shards) == 1:
        write_safetensors(path / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(path / file, shard)
            weight_map.update({name: file for name, _ in shard})
        total = sum(a.nbytes for s in shards for _, a in s)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config.dtype = str(jnp.dtype(dtype))
    hf_config.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def save_pretrained(model: Model, path: str | os.PathLike, weights: weights_lib.Weights | None = None,
                    dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes a Hugging Face checkpoint directory (config, safetensors, tokenizer) that transformers loads.

    Works the same for a model loaded from a GGUF: its config (built from the GGUF metadata) is written as
    ``config.json`` and its tokenizer (built from the GGUF) as ``tokenizer.json`` etc.

    Args:
        model: supplies the config and tokenizer (and the weights unless ``weights`` is given).
        path: output directory (created).
        weights: weights to write instead of ``model.weights``, e.g. ``fold(model, adapter)``.
        dtype: dtype of the written tensors (default: the weights' dtype).
        max_shard_bytes: above this, tensors are split into ``model-0000i-of-0000n.safetensors`` + index.
    """
    weights = model.weights if weights is None else weights
    dtype = dtype or weights.embed_VxD.dtype
    return _write_checkpoint(Path(path), _hf_tensors(model.config, weights, dtype), model.hf_config, model.tokenizer,
                             dtype, max_shard_bytes)


def convert_gguf(gguf_path: str | os.PathLike, path: str | os.PathLike, dtype: Any = jnp.float32,
                 max_shard_bytes: int = 5 * 2**30, write_tokenizer: bool = True) -> Path:
    """Writes a llama.cpp GGUF file as a Hugging Face checkpoint directory that transformers loads.

    The same checkpoint as ``save_pretrained(load_pretrained(gguf_path), path, dtype=dtype)``
    (config.json, safetensors, tokenizer files with the chat template), written one dequantized tensor at
    a time: neither JAX devices nor more host memory than about one tensor are used.

    Args:
        gguf_path: the ``.gguf`` file (or a directory holding exactly one).
        path: output directory (created).
        dtype: dtype of the written tensors (float32 keeps the dequantized values exactly).
        max_shard_bytes: above this, tensors are split into ``model-0000i-of-0000n.safetensors`` + index.
        write_tokenizer: also write the tokenizer built from the GGUF metadata.

    Example:
        >>> convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "checkpoints/smollm2", dtype=jnp.bfloat16)
    """
    src = Path(gguf_path)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such .gguf file")
    gguf_file = _gguf_source(src)
    if gguf_file is None:
        raise ValueError(f"{src}: not a .gguf file or a directory holding one")
    files = gguf_io.GGUFCheckpoint(gguf_file)
    hf_config = gguf_io.transformers_config(files.config)
    from_hf_config(hf_config, source=str(gguf_file))  # refuse what load_pretrained would refuse
    tokenizer = files.tokenizer() if write_tokenizer and "tokenizer.ggml.tokens" in files.reader.fields else None
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = ((name, files.get(name)[0].with_dtype(np_dtype)) for name in files.names())
    return _write_checkpoint(Path(path), tensors, hf_config, tokenizer, np_dtype, max_shard_bytes)


def save_merged_model(model: Model, adapter: Any, path: str | os.PathLike) -> Path:
    """Writes base + adapter folded into one Hugging Face checkpoint that transformers loads directly.

    Args:
        model: the base model (config, tokenizer and weights).
        adapter: any adapter; ``fold`` adds its delta-W to the base weights, in their dtype.
        path: output directory (created).

    Returns:
        The output directory.

    Example:
        >>> save_merged_model(model, adapter, "out/merged")
        >>> AutoModelForCausalLM.from_pretrained("out/merged")
    """
    return save_pretrained(model, path, weights=fold(model, adapter))
