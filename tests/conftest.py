"""Test set-up: 8 fake CPU devices (before jax initialises), seeded randomness, tiny checkpoints on disk.

Randomness: every test (or module-scoped fixture) that draws random inputs takes its seed from ``seed`` /
``rng`` (or ``module_seed`` / ``module_rng``). The seed is a hash of the test's id and ``TEST_SEED``
(default 0), so runs repeat exactly; a failing test's report names its seeds and ``TEST_SEED=k`` draws a
different set of inputs for every test.
"""

import os
import zlib

# 8 fake CPU devices; backend optimisation off halves compile time, which dominates tests of tiny models.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
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


def _seed_for(node) -> int:
    seed = zlib.crc32(f"{os.environ.get('TEST_SEED', '0')}:{node.nodeid}".encode()) & 0x7FFFFFFF
    node.stash.setdefault(_SEEDS, []).append(seed)
    return seed


_SEEDS = pytest.StashKey[list]()


@pytest.fixture
def seed(request) -> int:
    """This test's seed (printed in its report when it fails)."""
    return _seed_for(request.node)


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def module_seed(request) -> int:
    """A seed for module-scoped fixtures (printed in the report of any of the module's tests that fails)."""
    return _seed_for(request.node)


@pytest.fixture(scope="module")
def module_rng(module_seed) -> np.random.Generator:
    return np.random.default_rng(module_seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [(node.nodeid or "session", s) for node in item.listchain() for s in node.stash.get(_SEEDS, [])]
        if seeds:
            text = "\n".join(f"{where}: seed {s}" for where, s in seeds)
            report.sections.append(("random seeds", f"{text}\n(TEST_SEED={os.environ.get('TEST_SEED', '0')}; "
                                    "the seed is a hash of it and the test id)"))
