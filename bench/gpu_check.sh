#!/usr/bin/env bash
# The GPU check, one command on a machine with one NVIDIA GPU and jax with CUDA installed (no network, no
# installs): the fast test subset on the GPU, then bench/gpu_check.py, whose table is appended to
# bench/RESULTS.md (and written as JSON to $OUT/gpu_check.json when $OUT is set). About 6 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cuda TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# float32 parity tests compare with PyTorch at 1e-4: no TF32 in float32 matmuls.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 python -m pytest -q -p no:cacheprovider \
    tests/test_attention.py tests/test_packing.py tests/test_model_parity.py tests/test_generate.py \
    2>&1 | tail -15
echo "tests: exit ${PIPESTATUS[0]}"
out="${OUT:-/tmp}"
timeout 330 python bench/gpu_check.py --results bench/RESULTS.md --out "$out/gpu_check.json"
echo "gpu_check.py: exit $?"
