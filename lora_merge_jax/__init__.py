"""lora_merge_jax: adaptive LoRA merging with pruning, and MELoRA, for Llama-family models in JAX.

Public API (see README.md):
    load_pretrained, save_pretrained, forward, Model    -- base models from Hugging Face checkpoints
    init_lora, init_melora, LoraAdapter, MeloraAdapter  -- adapters as pure pytrees
    fold                                                -- fold an adapter into the base weights
    make_mesh, MeshConfig                               -- the device mesh
"""

from lora_merge_jax.adapters.common import combine, fold, split
from lora_merge_jax.adapters.lora import LoraAdapter, init_lora
from lora_merge_jax.adapters.melora import MeloraAdapter, init_melora
from lora_merge_jax.model_config import ModelConfig
from lora_merge_jax.pretrained import Model, forward, load_pretrained, save_pretrained
from lora_merge_jax.sharding import MeshConfig, make_mesh

__all__ = [
    "LoraAdapter",
    "MeloraAdapter",
    "MeshConfig",
    "Model",
    "ModelConfig",
    "combine",
    "fold",
    "forward",
    "init_lora",
    "init_melora",
    "load_pretrained",
    "make_mesh",
    "save_pretrained",
    "split",
]
