"""Compile time of the train step as the model gets deeper: layers are scanned, so it should hardly grow.

For 2, 4, 8 and 16 layers of one width (by default the 35M config of ``train_bench.py``: hidden 512,
ffw 1536, 8 heads, 4 kv heads, vocab 10240), the LoRA step and the adaptive-merge step (K=8 task LoRAs of
rank 8, all seven projections, with the default pruning hook) are traced, lowered and compiled ahead of
time from abstract inputs (``jax.ShapeDtypeStruct``: nothing is allocated). A small step is compiled first
so that XLA's one-time start-up is not charged to the first depth. Prints one table and writes JSON with
``--out``.

    python bench/compile_bench.py --out compile_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lora_merge_jax as lmj  # noqa: E402
from lora_merge_jax.models import weights as model_lib  # noqa: E402
from lora_merge_jax import sharding  # noqa: E402
from lora_merge_jax.merge import pruning  # noqa: E402
from lora_merge_jax.models.config import PROJECTIONS, ModelConfig  # noqa: E402
from lora_merge_jax.training.optim import OptimConfig, make_optimizer  # noqa: E402
from lora_merge_jax.training.step import init_state, make_train_step, state_shardings  # noqa: E402


def model_config(layers: int, hidden: int, ffw: int, heads: int, kv_heads: int, vocab: int) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffw,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, rms_norm_eps=1e-5)


def abstract_adapter(cfg: ModelConfig, variant: str, tasks: int, rank: int):
    def build():
        loras = [lmj.init_lora(cfg, jax.random.key(i), rank=rank, target_modules=PROJECTIONS) for i in range(tasks)]
        return loras[0] if variant == "lora" else lmj.merge_for_training(loras)
    return jax.eval_shape(build)


def compile_step(cfg: ModelConfig, variant: str, tasks: int, rank: int, batch: int, seq: int) -> dict[str, float]:
    """Seconds to trace + lower, and to compile, the jitted step of ``variant`` ('lora' or 'merge')."""
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    tx = make_optimizer(OptimConfig(decay="constant"), 1000)
    adapter = abstract_adapter(cfg, variant, tasks, rank)
    post_update, extra = None, None
    if variant == "merge":
        prune_cfg = pruning.PruneConfig()
        post_update = pruning.make_post_update(prune_cfg, 1000, cfg.num_hidden_layers)
        extra = jax.eval_shape(lambda a: pruning.init_statistics(prune_cfg, a), adapter)
    state = jax.eval_shape(lambda a, e: init_state(a, tx, seed=0, extra=e), adapter, extra)
    state_sh = state_shardings(state, cfg, mesh, tx)
    weights = model_lib.abstract(cfg, jnp.float32, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ids = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32, sharding=replicated)
    batch_tree = {"input_ids": ids, "attention_mask": ids, "target_mask": ids}
    step = make_train_step(cfg, tx, post_update=post_update)
    jitted = jax.jit(step, in_shardings=(state_sh, jax.tree.map(lambda w: w.sharding, weights), replicated),
                     out_shardings=(state_sh, replicated), donate_argnums=(0,))
    start = time.perf_counter()
    lowered = jitted.lower(state, weights, batch_tree)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    return {"lower_s": lower_s, "compile_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffw", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=10240)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--tasks", type=int, default=8, help="K of the merge step")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    shape = dict(hidden=args.hidden, ffw=args.ffw, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab)
    compile_step(model_config(1, **shape), "lora", 1, args.rank, 1, 8)  # XLA start-up, not charged below
    load_before = os.getloadavg()
    rows = []
    for layers in args.layers:
        cfg = model_config(layers, **shape)
        row = {"layers": layers, "params": cfg.num_params()}
        for variant in ("lora", "merge"):
            row[variant] = compile_step(cfg, variant, args.tasks, args.rank, args.batch, args.seq)
        rows.append(row)

    print(f"train step compile time (trace+lower, XLA compile) on {jax.default_backend()} "
          f"({len(os.sched_getaffinity(0))} cores), jax {jax.__version__}; hidden {args.hidden}, ffw {args.ffw}, "
          f"batch {args.batch} x {args.seq}; merge: K={args.tasks} rank {args.rank} with the pruning hook; "
          f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'layers':>6s} {'params':>11s} {'LoRA lower s':>13s} {'LoRA compile s':>15s} "
          f"{'merge lower s':>14s} {'merge compile s':>16s}")
    for row in rows:
        print(f"{row['layers']:6d} {row['params']:11d} {row['lora']['lower_s']:13.2f} {row['lora']['compile_s']:15.2f} "
              f"{row['merge']['lower_s']:14.2f} {row['merge']['compile_s']:16.2f}")
    first, last = rows[0], rows[-1]
    growth = {v: last[v]["compile_s"] / first[v]["compile_s"] for v in ("lora", "merge")}
    print(f"compile time at {last['layers']} layers over {first['layers']} layers: LoRA {growth['lora']:.2f}x, "
          f"merge {growth['merge']:.2f}x (depth grew {last['layers'] / first['layers']:.0f}x)")
    if args.out:
        report = {"settings": vars(args), "rows": rows, "growth": growth,
                  "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                                  "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                                  "load_average_start": load_before, "load_average_end": os.getloadavg()}}
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
