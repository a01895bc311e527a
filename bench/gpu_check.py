"""The GPU check: train-step and decode throughput on one accelerator, with model FLOP utilisation.

Runs with what the device image has (jax with CUDA, transformers for the configs) and no network; random
weights only, so nothing has to travel with the checkout. Three workloads, bfloat16 compute with float32
adapters and AdamW state (the GPU path: cuDNN flash attention):

- the SmolLM2-135M shape (30 layers, hidden 576, 9/3 heads, vocab 49,152, tied): LoRA r=8 on all seven
  projections, batch 8 x 512, loss on the last 64 tokens; also in float32;
- a ~1.2B Llama (the Llama-3.2-1B shape: 16 layers, hidden 2048, 32/8 heads, vocab 128,256, tied): the same
  LoRA at r=16, batch 8 x 2048, and the K=8 adaptive merge of r=16 LoRAs;
- greedy decoding on the SmolLM2 shape, batch 32, 256-token prompts, 128 new tokens.

MFU counts, per token, 4N + 12 L T H Hd + 6P FLOPs (bench/README.md) against the device's dense bf16 peak
(a table of known parts) and against a bf16 matmul measured in the same run.

    python bench/gpu_check.py --results bench/RESULTS.md --out gpu_check.json
    python bench/gpu_check.py --quick          # tiny shapes, any backend: checks the script itself
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

import lora_merge_jax as lmj  # noqa: E402
from lora_merge_jax.adapters import common  # noqa: E402
from lora_merge_jax.evaluation import generate as gen  # noqa: E402
from lora_merge_jax.models import attention  # noqa: E402
from lora_merge_jax.models import weights as weights_lib  # noqa: E402
from lora_merge_jax.models.config import PROJECTIONS, from_hf_config  # noqa: E402
from lora_merge_jax.models.model import Model  # noqa: E402
from lora_merge_jax.sharding import MeshConfig, make_mesh  # noqa: E402
from lora_merge_jax.training.optim import OptimConfig, make_optimizer  # noqa: E402
from lora_merge_jax.training.step import init_state, jit_train_step, make_train_step  # noqa: E402

# Dense bfloat16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a substring of device_kind.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
               max_position_embeddings=8192, rms_norm_eps=1e-5)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, tie_word_embeddings=True, max_position_embeddings=512)


def random_model(shape: dict, dtype, compute_dtype) -> Model:
    hf = transformers.LlamaConfig(**shape)
    cfg = from_hf_config(hf)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    weights = weights_lib.init_random(cfg, jax.random.key(0), dtype, mesh)
    return Model(cfg, weights, mesh, hf, None, compute_dtype)


def flops_per_token(cfg, seq: int, adapter_params: int) -> float:
    n = cfg.num_hidden_layers * sum(i * o for i, o in map(cfg.projection_shape, PROJECTIONS))
    n += cfg.hidden_size * cfg.vocab_size
    return 4.0 * n + 12.0 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim + 6.0 * adapter_params


def matmul_rate(dtype, size: int) -> float:
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


def train_step_rate(model: Model, batch: int, seq: int, targets: int, rank: int, tasks: int, steps: int) -> dict:
    cfg = model.config
    loras = [lmj.init_lora(cfg, jax.random.key(k), rank=rank, alpha=2.0 * rank, target_modules=list(PROJECTIONS))
             for k in range(max(tasks, 1))]
    adapter = loras[0] if tasks == 0 else lmj.merge_for_training(
        [lo.replace(b={n: v + 0.01 for n, v in lo.b.items()}) for lo in loras], granularity="task")
    tx = make_optimizer(OptimConfig(learning_rate=1e-4, decay="constant"), 1000)
    state = init_state(adapter, tx, seed=0)
    step = jit_train_step(make_train_step(cfg, tx, compute_dtype=model.compute_dtype, max_target_tokens=targets),
                          state, model.weights, cfg, model.mesh, batch)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, cfg.vocab_size, (1, batch, seq)).astype(np.int32)
    target = np.zeros_like(ids)
    target[..., seq - targets:] = 1
    data = jax.device_put({"input_ids": ids, "attention_mask": np.ones_like(ids), "target_mask": target},
                          step.batch_sharding)
    state = jax.device_put(state, step.state_shardings)
    start = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    params = common.num_params(adapter)
    return {"step_s": seconds, "tokens_per_s": batch * seq / seconds, "compile_s": compile_s,
            "flops_per_s": flops_per_token(cfg, seq, params) * batch * seq / seconds,
            "loss": float(metrics["loss"]), "adapter_params": params}


def decode_rate(model: Model, batch: int, prompt: int, new: int) -> dict:
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(4, model.config.vocab_size, prompt)) for _ in range(batch)]
    run = lambda: gen.generate(model, prompts, max_new_tokens=new, min_new_tokens=new, eos_token_ids=[],  # noqa: E731
                               pad_token_id=0)
    run()  # compile
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"seconds": seconds, "new_tokens_per_s": batch * new / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on any backend (checks the script)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per workload (median)")
    parser.add_argument("--results", type=Path, help="append a section to this RESULTS.md")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = parser.parse_args()

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    peak = next((v for k, v in PEAKS.items() if k in kind), None)
    measured = matmul_rate(jnp.bfloat16, 256 if args.quick else 8192)
    small, big = (TINY, TINY) if args.quick else (SMOLLM2, LLAMA_1B)
    scale = (lambda n: max(n // 16, 8)) if args.quick else (lambda n: n)  # noqa: E731
    print(f"device: {kind} ({device.platform}); jax {jax.__version__}; bf16 matmul {measured / 1e12:.1f} TFLOP/s "
          f"measured, peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; fused attention for bf16: "
          f"{attention.uses_fused_kernel(jnp.bfloat16)}", flush=True)
    rows = {}
    workloads = [
        ("SmolLM2 shape, LoRA r=8, fp32", small, jnp.float32, None, 8, scale(512), 64, 8, 0),
        ("SmolLM2 shape, LoRA r=8, bf16", small, jnp.bfloat16, jnp.bfloat16, 8, scale(512), 64, 8, 0),
        ("1.2B Llama, LoRA r=16, bf16", big, jnp.bfloat16, jnp.bfloat16, 8, scale(2048), 256, 16, 0),
        ("1.2B Llama, merge K=8 r=16, bf16", big, jnp.bfloat16, jnp.bfloat16, 8, scale(2048), 256, 16, 8),
    ]
    for name, shape, dtype, compute, batch, seq, targets, rank, tasks in workloads:
        model = random_model(shape, dtype, compute)
        row = train_step_rate(model, batch, seq, min(targets, seq - 1), rank, tasks, args.steps)
        row["mfu_of_peak"] = row["flops_per_s"] / peak if peak else None
        row["mfu_of_measured"] = row["flops_per_s"] / measured
        rows[name] = row
        print(f"{name}: {row['tokens_per_s']:,.0f} tokens/s, step {row['step_s'] * 1e3:.1f} ms, MFU "
              f"{(row['mfu_of_peak'] or float('nan')):.1%} of peak / {row['mfu_of_measured']:.1%} of measured, "
              f"compile {row['compile_s']:.0f} s", flush=True)
        del model
    model = random_model(small, jnp.bfloat16, jnp.bfloat16)
    decode = decode_rate(model, 32 if not args.quick else 8, scale(256), 128 if not args.quick else 8)
    print(f"decode (SmolLM2 shape, bf16, batch 32, prompt 256, 128 new): {decode['new_tokens_per_s']:,.0f} "
          "new tokens/s", flush=True)
    report = {"date": datetime.date.today().isoformat(), "device": kind, "jax": jax.__version__,
              "bf16_matmul_flops_measured": measured, "peak_flops": peak, "train": rows, "decode": decode,
              "quick": args.quick}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    if args.results:
        lines = [f"\n## GPU check ({report['date']}, {kind}{', --quick' if args.quick else ''})\n",
                 f"`bash bench/gpu_check.sh`; jax {jax.__version__}; bf16 matmul measured "
                 f"{measured / 1e12:.1f} TFLOP/s; MFU = (4N + 12 L T H Hd + 6P) x tokens/s over the peak "
                 f"({peak / 1e12 if peak else float('nan'):.0f} TFLOP/s) and over the measured rate.\n",
                 "| workload | tokens/s | step ms | MFU (peak) | MFU (measured) | compile s |", "|---|---|---|---|---|---|"]
        for name, row in rows.items():
            peak_mfu = f"{row['mfu_of_peak']:.1%}" if row["mfu_of_peak"] else "-"
            lines.append(f"| {name} | {row['tokens_per_s']:,.0f} | {row['step_s'] * 1e3:.1f} | {peak_mfu} | "
                         f"{row['mfu_of_measured']:.1%} | {row['compile_s']:.0f} |")
        lines.append(f"| decode, SmolLM2 shape, bf16 (new tokens/s) | {decode['new_tokens_per_s']:,.0f} | - | - | - | - |")
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
