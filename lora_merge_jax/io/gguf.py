"""llama.cpp GGUF checkpoints (Llama, Mistral, Qwen2) read as Hugging Face-named float32 tensors.

``load_pretrained`` (io/hf.py) takes a ``.gguf`` file through this module: ``GGUFCheckpoint`` has the
interface of ``io.safetensors.CheckpointFiles`` (``names()``, ``in``, ``get(name) -> (tensor, path)``), so
the same ``jax.make_array_from_callback`` path builds every weight, each device dequantizing only its shard.

Design:
  * ``gguf.GGUFReader`` (the ``gguf`` package, also what transformers uses) memory-maps the file and parses
    the header; a tensor's bytes are read when it is dequantized (``gguf.quants.dequantize``).
  * GGUF stores a matrix with ggml dims ``[in, out]`` (fastest first), which read as a numpy array is
    ``[out, in]``: the Hugging Face ``nn.Linear`` orientation, so nothing is transposed here.
  * ``GGUFTensor`` is lazy: ``t[rows, cols]`` dequantizes only those rows, and of them only the
    quantization blocks (32 or 256 values along a row; blocks never cross a row) that cover ``cols``.
  * llama.cpp's converter permutes the rows of q/k (weights and biases) for the ``llama`` architecture so
    that its rotary embedding pairs adjacent dims; Hugging Face pairs dims ``i`` and ``i + Hd/2``. We undo
    it exactly as transformers' ``LlamaTensorProcessor`` does, as a row gather. ``qwen2`` is converted
    without the permutation (llama.cpp runs it with NeoX-style rope), so its q/k are left alone.
  * Everything is validated before anything is dequantized: architecture, tensor names, types and shapes,
    so a bad file fails fast with a ``ValueError`` naming the file (and the tensor, type or key).
  * The config is a Hugging Face ``config.json``-style dict (``read_gguf_config``), which
    ``transformers.AutoConfig.for_model(**cfg)`` turns into the config object ``from_hf_config`` takes,
    and which ``save_pretrained`` writes back as a normal ``config.json``.
  * Mistral GGUFs use the ``llama`` architecture; see ``_is_mistral`` for how they are told apart.

The ``gguf`` package is needed only here, and imported only when a GGUF file is read.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Every type gguf-py can dequantize among the float, classic and K quants (transformers reads the same).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_NAME = re.compile(r"(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|bias)")
_SKIPPED = ("rope_freqs.weight",)  # llama3 rope factors: read into the config, not a model weight
_HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                     "tokenizer.ggml.token_type")


def _gguf_lib():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install 'gguf>=0.10'") from None
    return gguf


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file named ``*.gguf`` (any case)."""
    path = Path(path)
    return path.suffix.lower() == ".gguf" and path.is_file()


def hf_name(gguf_name: str) -> str | None:
    """The transformers name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj
    .weight``), or None when the name is not one we map."""
    m = _NAME.fullmatch(gguf_name)
    if m is None:
        return None
    layer, leaf, kind = m.groups()
    if layer is None:
        return f"{_GLOBAL[leaf]}.{kind}" if leaf in _GLOBAL else None
    return f"model.layers.{int(layer)}.{_LAYER[leaf]}.{kind}" if leaf in _LAYER else None


def _open(path: str | os.PathLike):
    """(Path, GGUFReader), turning whatever the parser raises on a damaged file into one ValueError."""
    gguf = _gguf_lib()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        # A truncated file fails as a short read (reshape/view errors), a corrupt one as a bad magic,
        # version, type id (e.g. an unknown ggml type) or string: none of them name the file.
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if reader.byte_order != "I":
        raise ValueError(f"{path}: big-endian GGUF files are not supported")
    return path, reader


def field_value(field: Any) -> Any:
    """A metadata field's value as a Python object (str, int, float, bool, or a list of them).

    ``ReaderField.contents()`` where the installed gguf has it, else the same from its parts (older gguf).
    """
    if hasattr(field, "contents"):
        return field.contents()
    return _field_value_from_parts(field)


def _field_value_from_parts(field: Any) -> Any:
    kind = _gguf_lib().GGUFValueType

    def one(part: np.ndarray, t: Any) -> Any:
        return part.tobytes().decode("utf-8") if t == kind.STRING else part.tolist()[0]

    if field.types[0] == kind.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], field.types[0])


def _metadata(path: Path, reader) -> dict[str, Any]:
    """Metadata values as Python objects; the big tokenizer arrays are skipped (transformers reads them)."""
    try:
        return {k: field_value(f) for k, f in reader.fields.items() if k not in _TOKENIZER_ARRAYS}
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt GGUF metadata: {type(e).__name__}: {e}") from None


def _f32(x: float) -> float:
    # GGUF stores float hyper-parameters as float32 (1e-5 reads back as 9.99999974e-06); the shortest
    # decimal that rounds to the same float32 is what the original config.json said.
    return float(str(np.float32(x)))


def _is_mistral(meta: dict[str, Any]) -> bool:
    """Whether a ``llama``-architecture file is a Mistral model.

    llama.cpp converts MistralForCausalLM to the ``llama`` architecture and records nothing else, so the
    evidence is circumstantial: a sliding window (no Llama has one), Mistral's "tekken" pre-tokenizer, or
    "mistral" in the model's name fields. transformers only checks ``general.name == "mistral"`` exactly,
    so it loads e.g. "Mistral 7B Instruct v0.3" as llama. The weights and the computation are the same
    either way; only ``model_type`` (and the window) differ.
    """
    if meta.get("llama.attention.sliding_window"):
        return True
    if meta.get("tokenizer.ggml.pre") == "tekken":
        return True
    names = [meta.get(k) for k in ("general.name", "general.basename", "general.base_model.0.name")]
    return any(isinstance(n, str) and "mistral" in n.lower() for n in names)


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, where: str) -> dict[str, Any] | None:
    """Recovers HF ``rope_scaling`` (llama3) from llama.cpp's ``rope_freqs`` tensor of per-dim divisors.

    llama.cpp writes 1 / (HF's frequency / base frequency) for each of the Hd/2 frequencies instead of
    the four llama3 parameters. (orig, low, high) only enter as orig/low and orig/high, so we fix
    orig = 8192 (every Llama 3.x) and solve for low/high; any fit is checked by recomputing the factors.
    """
    factors = np.asarray(factors, np.float64)
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    wavelen = 2 * math.pi / inv.astype(np.float32).astype(np.float64)
    factor, orig = float(factors.max()), 8192
    if np.allclose(factors, factors[0], rtol=1e-6):  # uniform: no scaling at all, or plain linear
        return None if factors[0] == 1 else {"rope_type": "linear", "factor": _f32(factor)}

    def predict(low: float, high: float) -> np.ndarray:
        smooth = (orig / wavelen - low) / (high - low)
        mid = 1.0 / ((1 - smooth) / factor + smooth)
        return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))

    candidates = [(1.0, 4.0)]  # what every released Llama 3.x uses
    middle = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if middle.sum() >= 2:  # smooth = a / wavelen + b with a = orig / (high - low), b = -low / (high - low)
        smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[middle], smooth[middle], 1)
        low = -b * orig / a
        candidates.append((low, low + orig / a))
    elif not middle.any() and (factors < factor * (1 - 1e-6)).any() and (factors > 1 + 1e-6).any():
        # no frequency in the smooth band: any two boundaries inside the gap between the unscaled and
        # the fully scaled wavelengths reproduce the factors exactly
        gap = wavelen[factors < factor * (1 - 1e-6)].max(), wavelen[factors > 1 + 1e-6].min()
        ratio = gap[1] / gap[0]
        candidates.append((orig / (gap[0] * ratio ** (2 / 3)), orig / (gap[0] * ratio ** (1 / 3))))
    for low, high in candidates:
        low, high = float(f"{low:.6g}"), float(f"{high:.6g}")
        if 0 < low < high and np.allclose(predict(low, high), factors, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise ValueError(f"{where}: tensor 'rope_freqs.weight' does not match any llama3 rope scaling")


def _config(path: Path, reader) -> dict[str, Any]:
    meta = _metadata(path, reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture '{arch}' is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if int(meta.get("split.count", 1) or 1) > 1:
        raise ValueError(f"{path}: part {int(meta.get('split.no', 0)) + 1} of a GGUF split into "
                         f"{meta['split.count']} files; merge them first (llama-gguf-split --merge)")
    tensors = {t.name: t for t in reader.tensors}

    def get(key: str, default: Any = None, per_layer: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # llama.cpp may write per-layer arrays; we need them uniform
            if not per_layer or len(set(value)) != 1:
                raise ValueError(f"{path}: metadata '{arch}.{key}' = {value} varies per layer; not supported")
            value = value[0]
        if value is None:
            raise ValueError(f"{path}: metadata key '{arch}.{key}' is missing")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count", per_layer=True))
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    key_len = meta.get(f"{arch}.attention.key_length")
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    head_dim = int(key_len or rope_dims or hidden // heads)
    if meta.get(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{path}: attention.value_length != key_length is not supported")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(f"{path}: partial rotary embedding (rope.dimension_count {rope_dims} < head_dim "
                         f"{head_dim}) is not supported")
    model_type = "mistral" if arch == "llama" and _is_mistral(meta) else arch
    theta = _f32(get("rope.freq_base", 10000.0))
    cfg: dict[str, Any] = {
        "architectures": [_HF_CLASS[model_type]],
        "model_type": model_type,
        # the embedding's rows are the truth; metadata vocab_size / token lists can be shorter or absent
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", per_layer=True)),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads, per_layer=True)),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if key_len is not None or rope_dims is not None:
        cfg["head_dim"] = head_dim
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    else:
        has_bias = {p: f"blk.0.{p}.bias" in tensors for p in ("attn_q", "attn_k", "attn_v", "attn_output")}
        if any(has_bias.values()) and not all(has_bias.values()):
            raise ValueError(f"{path}: llama attention biases on only some of q/k/v/o are not supported")
        cfg["attention_bias"] = all(has_bias.values())
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    if model_type == "mistral":
        # MistralConfig defaults to a 4096 window; GGUF Mistrals (v0.2+) have none unless it is recorded
        cfg["sliding_window"] = meta.get("llama.attention.sliding_window") or None

    scaling, factor = meta.get(f"{arch}.rope.scaling.type"), meta.get(f"{arch}.rope.scaling.factor")
    if scaling is None and meta.get(f"{arch}.rope.scale_linear"):  # the pre-2024 key
        scaling, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if "rope_freqs.weight" in tensors:
        if scaling not in (None, "none"):
            raise ValueError(f"{path}: both rope_freqs.weight and rope scaling '{scaling}'; not supported")
        t = tensors["rope_freqs.weight"]
        if t.tensor_type.name not in ("F32", "F16", "BF16") or tuple(t.shape.tolist()) != (head_dim // 2,):
            raise ValueError(f"{path}: tensor 'rope_freqs.weight' is {t.tensor_type.name} {tuple(t.shape.tolist())}, "
                             f"expected float ({head_dim // 2},)")
        rope = _llama3_rope(_gguf_lib().quants.dequantize(t.data, t.tensor_type), theta, head_dim, str(path))
        if rope is not None:
            cfg["rope_scaling"] = rope
    elif scaling not in (None, "none"):
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": _f32(factor or 1.0)}
        if meta.get(f"{arch}.rope.scaling.original_context_length"):
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(
                meta[f"{arch}.rope.scaling.original_context_length"])
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[hf] = int(meta[f"tokenizer.ggml.{key}"])
    return cfg


def read_gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """A Hugging Face ``config.json``-style dict from a GGUF file's metadata.

    ``transformers.AutoConfig.for_model(**cfg)`` gives the config object ``from_hf_config`` takes.

    Raises:
        ValueError: unsupported architecture, missing/inconsistent metadata, or a damaged file.
    """
    path, reader = _open(path)
    return _config(path, reader)


def transformers_config(cfg: dict[str, Any]) -> Any:
    """The transformers config object (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``) of a
    ``read_gguf_config`` dict."""
    import transformers

    return transformers.AutoConfig.for_model(**cfg)


class GGUFTensor:
    """One GGUF tensor, dequantized lazily in HF orientation ``[out, in]``.

    ``t[rows, cols]`` dequantizes only the rows asked for and, when ``cols`` is a contiguous slice, only
    the quantization blocks covering it; ``np.asarray(t)`` the whole tensor. Values are float32 (what
    ``gguf.quants.dequantize`` gives) cast to ``dtype`` (float32 unless made with ``with_dtype``).
    """

    def __init__(self, raw: np.ndarray, shape: tuple[int, ...], qtype: Any, row_order: np.ndarray | None,
                 dtype: Any = np.float32):
        self._raw, self._qtype, self._rows = raw, qtype, row_order
        self.shape, self.ndim, self.dtype = tuple(shape), len(shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def with_dtype(self, dtype: Any) -> GGUFTensor:
        """The same lazy tensor, giving values cast to ``dtype``."""
        return GGUFTensor(self._raw, self.shape, self._qtype, self._rows, dtype)

    def _dequantize(self, raw: np.ndarray, width: int) -> np.ndarray:
        gguf = _gguf_lib()
        if raw.size == 0:  # gguf's K-quant code cannot reshape an empty block array
            return np.zeros((*raw.shape[:-1], width), self.dtype)
        out = gguf.quants.dequantize(np.ascontiguousarray(raw), self._qtype)
        if out.dtype != self.dtype or not out.flags.writeable:  # F32 comes back as a view of the read-only map
            out = out.astype(self.dtype)
        return out

    def _column_window(self, cols: Any) -> tuple[slice, slice, int] | None:
        """For a contiguous column slice: (raw columns to read, the slice of their dequantized values,
        how many values they hold); None for any other column index."""
        if not isinstance(cols, slice):
            return None
        start, stop, step = cols.indices(self.shape[1])
        if step != 1 or start >= stop:
            return None
        if self._raw.dtype == np.uint8:  # quantized (and BF16): blocks of `block` values in `size` bytes
            block, size = _gguf_lib().GGML_QUANT_SIZES[self._qtype]
        else:  # F32 / F16 arrays hold one value per column
            block, size = 1, 1
        first, end = start // block, -(-stop // block)
        return slice(first * size, end * size), slice(start - first * block, stop - first * block), (end - first) * block

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if self.ndim != 2 or not 1 <= len(index) <= 2 or any(i is None or i is Ellipsis for i in index):
            return self.__array__()[index]
        cols = index[1] if len(index) == 2 else slice(None)
        rows = np.arange(self.shape[0])[index[0]]
        single = np.ndim(rows) == 0
        rows = np.atleast_1d(rows)
        if self._rows is not None:
            rows = self._rows[rows]  # HF row r lives in GGUF row row_order[r]
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            rows = slice(int(rows[0]), int(rows[-1]) + 1)  # a view of the map, no gather
        raw, width = self._raw[rows], self.shape[1]
        window = self._column_window(cols)
        if window is not None:
            raw_cols, cols, width = window
            raw = raw[:, raw_cols]
        out = self._dequantize(raw, width)[:, cols]
        return out[0] if single else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = slice(None) if self._rows is None else self._rows
        out = self._dequantize(self._raw[rows], self.shape[-1])
        return out if dtype is None else out.astype(dtype, copy=False)


def _unpermute_order(rows: int, heads: int) -> np.ndarray:
    # llama.cpp: w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2); this is the inverse, applied
    # to row indices so that it can be used to gather any subset of rows.
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


class GGUFCheckpoint:
    """A GGUF file seen as HF-named tensors, with the interface of ``io.safetensors.CheckpointFiles``.

    Attributes:
        path: the file.
        config: the ``read_gguf_config`` dict.
        reader: the ``gguf.GGUFReader`` (its ``fields`` hold all metadata, tokenizer arrays included).
    """

    def __init__(self, path: str | os.PathLike):
        gguf = _gguf_lib()
        self.path, self.reader = _open(path)
        reader = self.reader
        self.config = _config(self.path, reader)
        cfg, arch = self.config, field_value(reader.fields["general.architecture"])
        d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg.get("head_dim")
        hd = hd or d // cfg["num_attention_heads"]
        q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
        shapes = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                  "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
                  "embed_tokens": (v, d), "lm_head": (v, d)}
        self._tensors: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            if t.name in _SKIPPED:
                continue
            name = hf_name(t.name)
            if name is None:
                raise ValueError(f"{self.path}: tensor '{t.name}' is not part of a {arch} model we can read")
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise ValueError(f"{self.path}: tensor '{t.name}' has GGML type {t.tensor_type.name}, which is not "
                                 f"supported; supported: {', '.join(SUPPORTED_TYPES)}")
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml dims are fastest-first
            leaf = name.split(".")[-2]
            want = shapes.get(leaf, (d,)) if name.endswith(".weight") else (shapes[leaf][0],)
            if shape != want:
                raise ValueError(f"{self.path}: tensor '{t.name}' has shape {shape}, expected {want} from the metadata")
            order = None
            if arch == "llama" and leaf in ("q_proj", "k_proj"):
                order = _unpermute_order(shape[0], cfg["num_attention_heads"] if leaf == "q_proj"
                                         else cfg["num_key_value_heads"])
            self._tensors[name] = GGUFTensor(t.data, shape, gguf.GGMLQuantizationType(t.tensor_type), order)
        biased = (["q_proj", "k_proj", "v_proj"] if arch == "qwen2" else
                  ["q_proj", "k_proj", "v_proj", "o_proj"] * cfg["attention_bias"]
                  + ["gate_proj", "up_proj", "down_proj"] * cfg["mlp_bias"])
        expected = {"model.embed_tokens.weight", "model.norm.weight"} | (
            set() if cfg["tie_word_embeddings"] else {"lm_head.weight"})
        for i in range(cfg["num_hidden_layers"]):
            expected |= {f"model.layers.{i}.{leaf}.weight" for leaf in _LAYER.values()}
            expected |= {f"model.layers.{i}.{_LAYER[g]}.bias" for g in _LAYER if _LAYER[g].split(".")[-1] in biased}
        missing = sorted(expected - set(self._tensors))
        extra = sorted(set(self._tensors) - expected)
        if missing or extra:
            raise ValueError(f"{self.path}: tensors do not match the metadata: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")

    def names(self) -> Iterator[str]:
        return iter(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> tuple[GGUFTensor, Path]:
        """The tensor ``name`` (lazy, float32 on indexing) and the file it lives in."""
        return self._tensors[name], self.path

    def tokenizer(self) -> Any:
        """The transformers tokenizer of this file (see ``gguf_tokenizer``)."""
        return gguf_tokenizer(self.path, reader=self.reader)


def iter_gguf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, float32 array [out, in])`` one tensor at a time, in file order.

    Everything is validated before the first tensor is yielded. Raises ``ValueError`` for an unsupported
    architecture or tensor type, unknown tensors, shapes that contradict the metadata, or a damaged file.
    """
    ckpt = GGUFCheckpoint(path)
    for name in ckpt.names():
        yield name, np.asarray(ckpt.get(name)[0])


def gguf_tokenizer(path: str | os.PathLike, reader: Any = None) -> Any:
    """The transformers fast tokenizer described by a GGUF's metadata, with its chat template.

    transformers rebuilds it from ``tokenizer.ggml.*`` (model, tokens, merges, token types, special ids);
    we make sure the chat template from ``tokenizer.chat_template`` is set (older versions dropped it).

    Raises:
        ValueError: the metadata does not describe a tokenizer transformers can build (message names the file).
    """
    import transformers

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        folder, name = str(path.parent), path.name
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    except (ValueError, KeyError, IndexError, TypeError, OSError, AttributeError) as e:
        raise ValueError(f"{path}: cannot build a tokenizer from this GGUF: {type(e).__name__}: {e}") from None
    if not getattr(tok, "chat_template", None):
        field = (reader if reader is not None else _open(path)[1]).fields.get("tokenizer.chat_template")
        if field is not None:
            tok.chat_template = field_value(field)
    return tok
