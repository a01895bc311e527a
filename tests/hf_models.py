"""Tiny random-weight transformers models for parity tests, saved as real checkpoints."""

from __future__ import annotations

import torch
import transformers

from lora_merge_jax import tiny

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, rms_norm_eps=1e-5)

TINY_CONFIGS = {
    "llama3": lambda: transformers.LlamaConfig(
        **_COMMON, num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, rope_theta=500000.0),
    "llama_tied": lambda: transformers.LlamaConfig(**_COMMON, num_key_value_heads=4, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, num_key_value_heads=2, tie_word_embeddings=False),
}


def build(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A float32 transformers model with random weights (norms and biases randomised too)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_tiny(name: str, path, seed: int = 0, **save_kwargs) -> transformers.PreTrainedModel:
    model = build(name, seed)
    model.save_pretrained(path, **save_kwargs)
    tiny.build_tokenizer(model.config.vocab_size).save_pretrained(path)
    return model
