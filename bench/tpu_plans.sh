#!/usr/bin/env bash
# The TPU compiler's memory plans behind the README's TPU table: one JSON per configuration in bench/tpu_plans/,
# compiled ahead of time for abstract TPU topologies (no TPU attached). Resumable: a configuration whose JSON
# exists is skipped. Needs jax[tpu] (libtpu): PYTHON=/path/to/venv/bin/python bash bench/tpu_plans.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export TPU_WORKER_HOSTNAMES=localhost ALLOW_MULTIPLE_LIBTPU_LOAD=1
plan() {  # name, then memory_plan.py's arguments
  local out="bench/tpu_plans/$1.json"; shift
  if [[ -f $out ]]; then echo "skip $out (exists)"; return; fi
  echo "$(date +%H:%M:%S) compiling $out: $*"
  "$PYTHON" bench/memory_plan.py --platform tpu "$@" --out "$out.partial" && mv "$out.partial" "$out"
}
plan 8b_v6e_1x4x1_on --model 8b --topology v6e:2x2 --mesh 1x4x1 --remat on
plan 70b_v5p_1x8x1_off --model 70b --topology v5p:2x2x2 --mesh 1x8x1 --remat off
plan 70b_v5p_2slices_2x8x1_on --model 70b --topology v5p:2x2x2 --slices 2 --mesh 2x8x1 --remat on
plan 70b_v5e_1x64x1_on --model 70b --topology v5e:8x8 --mesh 1x64x1 --remat on
plan 8b_v5e_1x16x1_on --model 8b --topology v5e:4x4 --mesh 1x16x1 --remat on
plan 8b_v5p_1x8x1_on --model 8b --topology v5p:2x2x2 --mesh 1x8x1 --remat on
