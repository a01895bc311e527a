"""lora_merge_jax: adaptive LoRA merging with pruning, and MELoRA, for Llama-family models in JAX.

Public API (see README.md):
    load_pretrained, save_pretrained, forward, Model    -- base models from Hugging Face checkpoints or GGUF
    convert_gguf                                        -- a GGUF file into a Hugging Face checkpoint
    init_lora, init_melora, LoraAdapter, MeloraAdapter  -- adapters as pure pytrees
    fold                                                -- fold an adapter into the base weights
    load_peft_adapter, save_peft_adapter, save_merged_model -- PEFT format in and out
    merge_for_training, MergedLoraAdapter, PruneConfig  -- the adaptive merge with pruning
    merge_adapters, lorahub_merge, lorahub_search       -- static merges (PEFT semantics) and LoraHub
    make_mesh, MeshConfig                               -- the device mesh
"""

from lora_merge_jax.adapters.common import combine, fold, split
from lora_merge_jax.adapters.lora import LoraAdapter, init_lora
from lora_merge_jax.adapters.melora import MeloraAdapter, init_melora
from lora_merge_jax.io.hf import convert_gguf, load_pretrained, save_merged_model, save_pretrained
from lora_merge_jax.io.peft_export import save_peft_adapter
from lora_merge_jax.io.peft_import import load_peft_adapter
from lora_merge_jax.merge.adaptive import MergedLoraAdapter, merge_for_training
from lora_merge_jax.merge.lorahub import lorahub_merge, lorahub_search
from lora_merge_jax.merge.pruning import PruneConfig
from lora_merge_jax.merge.static import merge_adapters
from lora_merge_jax.models.config import ModelConfig
from lora_merge_jax.models.model import Model, forward
from lora_merge_jax.sharding import MeshConfig, make_mesh

__all__ = [
    "LoraAdapter",
    "MeloraAdapter",
    "MergedLoraAdapter",
    "PruneConfig",
    "MeshConfig",
    "Model",
    "ModelConfig",
    "combine",
    "convert_gguf",
    "fold",
    "forward",
    "init_lora",
    "init_melora",
    "load_peft_adapter",
    "load_pretrained",
    "lorahub_merge",
    "lorahub_search",
    "merge_adapters",
    "merge_for_training",
    "make_mesh",
    "save_merged_model",
    "save_peft_adapter",
    "save_pretrained",
    "split",
]
