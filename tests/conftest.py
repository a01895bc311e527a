"""Test set-up: 8 fake CPU devices (before jax initialises), and tiny Hugging Face checkpoints on disk."""

import os

# 8 fake CPU devices; backend optimisation off halves compile time, which dominates tests of tiny models.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session", params=sorted(hf_models.TINY_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """(name, directory) of a tiny random transformers model saved with save_pretrained."""
    name = request.param
    path = tmp_path_factory.mktemp(name)
    hf_models.save_tiny(name, path)
    return name, path


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory):
    """A tiny Llama 3 checkpoint directory with a tokenizer."""
    path = tmp_path_factory.mktemp("llama3")
    hf_models.save_tiny("llama3", path)
    return path
