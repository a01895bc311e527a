"""The architecture of a Llama-family model, read from a Hugging Face ``config.json``.

One frozen, hashable dataclass covers Llama 2/3/3.1/3.2, Mistral and Qwen2: they differ only in which
projections carry biases, the rotary-embedding variant, tied embeddings and the sliding window. Being
hashable, it is passed to jitted functions as a static argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = PROJECTIONS[:4]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (names follow transformers' LlamaConfig)."""

    model_type: str  # one of SUPPORTED_MODEL_TYPES
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # K (grouped-query attention when K < H)
    head_dim: int  # Hd
    rms_norm_eps: float
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    biased_projections: tuple[str, ...] = ()  # projections with a bias (Qwen2: q, k, v)
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    sliding_windows: tuple[int, ...] = ()  # per layer, 0 = full attention; empty = all full
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection of a layer."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }[name]

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [Hd/2] in float32, computed as transformers computes them."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        if self.rope_type == "linear":
            return (inv / np.float32(self.rope_factor)).astype(np.float32)
        if self.rope_type == "llama3":
            factor = self.rope_factor
            low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
            old_len = self.rope_original_max_positions
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    def num_params(self) -> int:
        """Parameter count of the base model (embeddings included once when tied)."""
        per_layer = sum(i * o for i, o in map(self.projection_shape, PROJECTIONS)) + 2 * self.hidden_size
        per_layer += sum(self.projection_shape(p)[1] for p in self.biased_projections)
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_hidden_layers * per_layer + self.vocab_size * self.hidden_size + head + self.hidden_size


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def from_hf_config(hf: Any, source: str = "config.json") -> ModelConfig:
    """Builds a ModelConfig from a transformers ``PretrainedConfig``.

    Args:
        hf: the config object (``AutoConfig.from_pretrained(path)``), whose loader already normalises the
            old ``rope_scaling`` key into ``rope_parameters``.
        source: where it came from, for error messages.

    Raises:
        ValueError: for an architecture or option this implementation does not compute exactly.
    """
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = getattr(hf, "hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act '{act}' is not supported")
    if getattr(hf, "mlp_bias", False):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    biased: tuple[str, ...] = ()
    if model_type == "qwen2":
        biased = ("q_proj", "k_proj", "v_proj")
    elif getattr(hf, "attention_bias", False):
        biased = ATTENTION_PROJECTIONS

    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope_type '{rope_type}' is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))

    layers = hf.num_hidden_layers
    window = getattr(hf, "sliding_window", None) or 0
    layer_types = getattr(hf, "layer_types", None)
    if model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
        windows: tuple[int, ...] = ()
    elif layer_types is not None and window:
        windows = tuple(window if t == "sliding_attention" else 0 for t in layer_types)
    else:
        windows = (int(window),) * layers if window else ()
    if not any(windows):
        windows = ()

    eos = _as_tuple(getattr(hf, "eos_token_id", None))
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        hidden_act=act,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        biased_projections=biased,
        rope_type=rope_type,
        rope_theta=float(theta),
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_positions=int(
            rope.get("original_max_position_embeddings", getattr(hf, "max_position_embeddings", 8192))
        ),
        sliding_windows=windows,
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 4096)),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=eos,
        pad_token_id=getattr(hf, "pad_token_id", None),
    )
