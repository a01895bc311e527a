"""Train-step throughput: our LoRA and adaptive-merge steps against PyTorch + PEFT, on this machine.

Two random-weight Llama configs (about 5M and 35M parameters) are built with transformers' ``LlamaConfig``
and saved; both implementations load the same checkpoint. The real model ``smollm2`` (SmolLM2-135M-Instruct,
Q4_1 GGUF, fetched once by ``lora_merge_jax.io.gguf_fetch``; ours through ``load_pretrained``, PyTorch through
transformers' own GGUF loader, both dequantized to float32) is a third workload: ``--configs smollm2``.
``--dtype bfloat16`` puts both sides' frozen weights and activations in bfloat16 (adapters, their gradients
and AdamW stay float32 on both: PEFT's ``autocast_adapter_dtype`` and our train state).
Ours: ``lmj.load_pretrained``, ``init_lora`` /
``merge_for_training`` (K task LoRAs of rank r on all seven projections, ``task`` coefficients, optionally
the default pruning hook), ``train_step.make_train_step`` + ``jit_train_step`` with ``optim.make_optimizer``
(AdamW, clip 1.0). Theirs: ``peft.get_peft_model`` with the same rank, alpha, targets, batch and length,
``torch.optim.AdamW`` and ``clip_grad_norm_(1.0)``. Each variant is compiled / warmed up first; then the
variants take one step each in turn (so that load from other jobs hits all of them alike), each step timed
to ``block_until_ready`` (ours) or the end of ``optimizer.step()`` (PyTorch). Medians.

Also measured in the same run: this machine's matmul rate in that dtype (a jitted 2048x2048 product), and the
fraction of it our step reaches (model FLOP utilisation) with, per token,

    4 N  +  12 L T H Hd  +  6 P

N: base parameters used in matmuls (the seven projections of every layer and the LM head; the embedding
lookup is free), counted 2N forward and 2N for the activation gradients (the base is frozen: no weight
gradients); 12 L T H Hd: attention scores and weighted values over the full T x T square (both
implementations compute it whole), 4 L T H Hd forward and twice that backward; P: adapter parameters,
2P forward, 2P activation gradient, 2P weight gradient. The LM head is counted at every position, as
PyTorch computes it; ours computes it only where the loss is (the last ``--target-tokens`` of each row), so
the same count keeps MFU proportional to tokens/s and overstates our hardware use by what that skips.

    python bench/train_bench.py --out train_bench.json
    python bench/train_bench.py --configs 35M --target-tokens 32 --tasks 8 --merge-variants merge   # summaries
    python bench/train_bench.py --configs smollm2 --out train_bench_smollm2.json                     # real model
    python bench/train_bench.py --configs smollm2 --dtype bfloat16 --batch 8 --seq 256 --target-tokens 64

Threads: XLA's CPU backend uses one intra-op thread per core it may run on; PyTorch is set to the same
number. ``--threads 1`` pins the process to one core, so both run single-threaded. ``OMP_WAIT_POLICY`` is set to
``PASSIVE`` unless already set: on a machine shared with other jobs, spinning OpenMP threads slow PyTorch
down several times.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _threads_from_argv() -> int:
    """``--threads``, read before jax and torch start: XLA sizes its thread pools once, at start-up."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    return pre.parse_known_args()[0].threads


THREADS = _threads_from_argv()
if THREADS < len(os.sched_getaffinity(0)):
    # XLA's CPU thread pools ignore the old thread flags but size themselves by the cores this process may
    # use, so fewer threads means pinning the whole process (PyTorch too) to that many cores.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])
# GNU OpenMP's default spin-waiting makes PyTorch several times slower when other jobs share the cores
# (measured here: 2.0 s -> 0.7 s per 5M step); passive waiting is PyTorch's best setting on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch_reference import peft_lora  # noqa: E402

import lora_merge_jax as lmj  # noqa: E402
from lora_merge_jax.adapters import common  # noqa: E402
from lora_merge_jax.io.gguf_fetch import fetch_smollm2  # noqa: E402
from lora_merge_jax.merge import pruning  # noqa: E402
from lora_merge_jax.models import losses, products  # noqa: E402
from lora_merge_jax.models.config import PROJECTIONS, ModelConfig  # noqa: E402
from lora_merge_jax.training.optim import OptimConfig, make_optimizer  # noqa: E402
from lora_merge_jax.training.step import init_state, jit_train_step, make_train_step  # noqa: E402

# name -> (LlamaConfig keyword arguments, sequence length)
CONFIGS = {
    "5M": (dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2), 128),
    "35M": (dict(vocab_size=10240, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4), 256),
}
# real models: name -> (() -> path of the cached GGUF, default sequence length)
REAL_MODELS = {"smollm2": (fetch_smollm2, 128)}
LEARNING_RATE = 1e-4


def matmul_gflops(dtype: str = "float32", size: int = 2048, repeats: int = 7) -> tuple[float, float]:
    """(jax, torch) GFLOP/s of a size x size matmul in ``dtype``, median of ``repeats`` after a warm-up."""
    return shape_gflops([(size, size, size)], dtype, repeats)


def shape_gflops(shapes: list[tuple[int, int, int]], dtype: str = "float32",
                 repeats: int = 7) -> tuple[float, float]:
    """(jax, torch) GFLOP/s over the [M, K] x [K, N] products ``shapes`` (M, K, N) in ``dtype``, each a jitted
    product (accumulated in float32, as the model's) and a ``torch.mm`` taking turns; medians of ``repeats``
    after a warm-up."""
    flops, jax_s, torch_s = 0.0, 0.0, 0.0
    dot = jax.jit(functools.partial(products.einsum, "mk,kn->mn"))
    for m, k, n in shapes:
        a = jax.random.normal(jax.random.key(0), (m, k), dtype)
        b = jax.random.normal(jax.random.key(1), (k, n), dtype)
        at, bt = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
        dot(a, b).block_until_ready()
        torch.mm(at, bt)
        times_jax, times_torch = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            dot(a, b).block_until_ready()
            times_jax.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.mm(at, bt)
            times_torch.append(time.perf_counter() - start)
        flops += 2.0 * m * k * n
        jax_s += statistics.median(times_jax)
        torch_s += statistics.median(times_torch)
    return flops / jax_s / 1e9, flops / torch_s / 1e9


def projection_shapes(cfg: ModelConfig, tokens: int) -> list[tuple[int, int, int]]:
    """The forward products of one layer's projections as our step groups them (q/k/v and gate/up as one
    product each), for ``tokens`` rows: what most of a step's time goes to."""
    shape = {name: cfg.projection_shape(name) for name in PROJECTIONS}  # (in, out)
    d = cfg.hidden_size
    return [(tokens, d, sum(shape[n][1] for n in ("q_proj", "k_proj", "v_proj"))), (tokens, *shape["o_proj"]),
            (tokens, d, shape["gate_proj"][1] + shape["up_proj"][1]), (tokens, *shape["down_proj"])]


def flops_per_token(cfg: ModelConfig, seq: int, adapter_params: int) -> dict[str, float]:
    """The terms of 4N + 12 L T H Hd + 6P (see the module docstring)."""
    n = cfg.num_hidden_layers * sum(i * o for i, o in map(cfg.projection_shape, PROJECTIONS))
    n += cfg.hidden_size * cfg.vocab_size
    attention = 12 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim
    return {"base_4N": 4.0 * n, "attention": float(attention), "adapter_6P": 6.0 * adapter_params,
            "total": 4.0 * n + attention + 6.0 * adapter_params}


def make_batch(vocab: int, batch: int, seq: int, targets: int) -> dict[str, np.ndarray]:
    """A [1, B, T] batch of random ids; the last ``targets`` tokens of each row are the target."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, vocab, (1, batch, seq)).astype(np.int32)
    target = np.zeros_like(ids)
    target[..., seq - targets:] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "target_mask": target}


def task_loras(cfg: ModelConfig, k: int, rank: int) -> list[lmj.LoraAdapter]:
    """K trained-looking task LoRAs (B nonzero) on all seven projections."""
    out = []
    for i in range(k):
        lora = lmj.init_lora(cfg, jax.random.key(100 + i), rank=rank, alpha=2.0 * rank, target_modules=PROJECTIONS)
        keys = jax.random.split(jax.random.key(200 + i), len(lora.b))
        trained_b = {name: 0.01 * jax.random.normal(key, b.shape) for key, (name, b) in zip(keys, lora.b.items())}
        out.append(lora.replace(b=trained_b))
    return out


class OurStep(NamedTuple):
    step: Any  # jit_train_step's jitted step and shardings
    state: Any  # the train state, placed
    batch: dict  # the batch, placed
    weights: Any  # the base weights the step reads
    adapter_params: int

    def compiled(self):
        """The step compiled ahead of time (``.as_text()``: the optimized HLO that runs)."""
        return self.step.jitted.lower(self.state, self.weights, self.batch).compile()


def build_ours(model: lmj.Model, variant: str, k: int, rank: int, batch: dict, steps_total: int) -> OurStep:
    """One of our variants' train step as ``train.py`` builds it, with its state and batch placed."""
    cfg = model.config
    tx = make_optimizer(OptimConfig(learning_rate=LEARNING_RATE, decay="constant"), steps_total)
    post_update, extra = None, None
    if variant == "lora":
        adapter = lmj.init_lora(cfg, jax.random.key(0), rank=rank, alpha=2.0 * rank, target_modules=PROJECTIONS)
    else:
        adapter = lmj.merge_for_training(task_loras(cfg, k, rank), granularity="task")
        if variant == "merge+prune":
            prune_cfg = pruning.PruneConfig()
            post_update = pruning.make_post_update(prune_cfg, steps_total, cfg.num_hidden_layers)
            extra = pruning.init_statistics(prune_cfg, adapter)
    adapter_params = common.num_params(adapter)
    state = init_state(adapter, tx, seed=0, extra=extra)
    # As train.py builds it: the LM head only where the loss is (bound: the batch's most target tokens).
    step_fn = make_train_step(cfg, tx, compute_dtype=model.compute_dtype, post_update=post_update,
                              max_target_tokens=losses.most_targets(batch["target_mask"]))
    step = jit_train_step(step_fn, state, model.weights, cfg, model.mesh, batch["input_ids"].shape[1])
    return OurStep(step, jax.device_put(state, step.state_shardings), jax.device_put(batch, step.batch_sharding),
                   model.weights, adapter_params)


def ours(model: lmj.Model, variant: str, k: int, rank: int, batch: dict, steps_total: int):
    """A ready-to-time closure for one of our variants, its compile seconds and its adapter parameter count."""
    built = build_ours(model, variant, k, rank, batch, steps_total)
    start = time.perf_counter()
    built.compiled()
    compile_s = time.perf_counter() - start
    box = {"state": built.state}

    def one_step() -> float:
        start = time.perf_counter()
        box["state"], metrics = built.step(box["state"], built.batch)
        jax.block_until_ready((box["state"], metrics))
        return time.perf_counter() - start

    for _ in range(2):  # the first call also runs the jit cache lookup and allocations
        one_step()
    return one_step, compile_s, built.adapter_params


def peft_step(path: Path, rank: int, batch: dict, dtype: str):
    """The same LoRA step in PyTorch + PEFT: a ready-to-time closure and its adapter parameter count."""
    reference = peft_lora(path, rank, PROJECTIONS, LEARNING_RATE, getattr(torch, dtype))
    ids = torch.tensor(batch["input_ids"][0], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"][0], dtype=torch.long)
    labels = torch.where(torch.tensor(batch["target_mask"][0]) == 1, ids, torch.tensor(-100))

    def one_step() -> float:
        start = time.perf_counter()
        reference.step(ids, mask, labels)
        return time.perf_counter() - start

    for _ in range(2):
        one_step()
    return one_step, sum(p.numel() for p in reference.params)


def run_config(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    if name in REAL_MODELS:
        fetch, seq = REAL_MODELS[name]
        seq = args.seq or seq
        path = fetch()
        model = lmj.load_pretrained(path, dtype=args.dtype, load_tokenizer=False)
        hf_kwargs = {"gguf": path.name, **{k: getattr(model.config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")}}
    else:
        hf_kwargs, seq = CONFIGS[name]
        seq = args.seq or seq
        torch.manual_seed(0)
        hf_config = transformers.LlamaConfig(**hf_kwargs, max_position_embeddings=max(seq, 512), rms_norm_eps=1e-5,
                                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        path = tmp / name
        transformers.LlamaForCausalLM(hf_config).save_pretrained(str(path))
        model = lmj.load_pretrained(path, dtype=args.dtype)
    cfg = model.config
    batch = make_batch(cfg.vocab_size, args.batch, seq, args.target_tokens or 3 * seq // 4)
    steps_total = 10 * args.rounds * args.steps

    runners, info = {}, {}
    variants = [("lora", 1)] + [(v, k) for k in args.tasks for v in args.merge_variants]
    for variant, k in variants:
        label = "LoRA" if variant == "lora" else f"merge K={k}" + (" +pruning" if variant == "merge+prune" else "")
        fn, compile_s, p = ours(model, variant, k, args.rank, batch, steps_total)
        runners[label], info[label] = fn, {"compile_s": compile_s, "adapter_params": p, "ours": True}
    if not args.skip_peft:
        fn, p = peft_step(path, args.rank, batch, args.dtype)
        runners["PEFT LoRA (PyTorch)"], info["PEFT LoRA (PyTorch)"] = fn, {"adapter_params": p, "ours": False}

    # One step of each variant in turn, so that load from other jobs, which changes by the minute, reaches all
    # of them alike.
    times = {label: [] for label in runners}
    for _ in range(args.rounds * args.steps):
        for label, fn in runners.items():
            times[label].append(fn())

    tokens = args.batch * seq
    rows = {}
    for label, ts in times.items():
        median = statistics.median(ts)
        flops = flops_per_token(cfg, seq, info[label]["adapter_params"])
        rows[label] = {**info[label], "median_step_s": median, "min_step_s": min(ts), "tokens_per_s": tokens / median,
                       "flops_per_token": flops, "gflops_per_s": flops["total"] * tokens / median / 1e9,
                       "step_times_s": ts}
    lora = rows["LoRA"]["median_step_s"]
    for label, row in rows.items():
        row["time_over_lora"] = row["median_step_s"] / lora
    # XLA's and PyTorch's matmul kernels on the step's own products: the bound on any ratio to PEFT, since both
    # spend most of a step in them.
    jax_proj, torch_proj = shape_gflops(projection_shapes(cfg, args.batch * seq), args.dtype)
    return {"config": name, "params": cfg.num_params(), "seq": seq, "batch": args.batch, "rank": args.rank,
            "projection_matmul_gflops": {"jax": jax_proj, "torch": torch_proj},
            "target_tokens": int(batch["target_mask"][0, 0].sum()),
            "model": {k: v for k, v in hf_kwargs.items()}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *REAL_MODELS],
                        help="synthetic 5M / 35M Llamas (default: both) and/or the real smollm2 (135M, GGUF)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, help="sequence length (default: 128 for 5M and smollm2, 256 for 35M)")
    parser.add_argument("--target-tokens", type=int, help="target (loss) tokens at the end of each row "
                        "(default: 3/4 of the sequence; a summary is more like 1/8)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the LoRA and of each task LoRA")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the frozen weights and activations on both sides (adapters and AdamW: float32)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 8], help="K values of the merge")
    parser.add_argument("--merge-variants", nargs="+", default=["merge", "merge+prune"],
                        choices=["merge", "merge+prune"], help="merge step without / with the pruning hook")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant = rounds x steps")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant = rounds x steps")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="cores (threads) of both XLA and PyTorch (default: all available to this process)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    jax_gflops, torch_gflops = matmul_gflops(args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_config(name, args, Path(tmp)) for name in args.configs]
    jax_gflops_after, torch_gflops_after = matmul_gflops(args.dtype)
    peak = max(jax_gflops, jax_gflops_after)

    cores = len(os.sched_getaffinity(0))
    print(f"train step, {args.dtype}, batch {args.batch}, LoRA rank {args.rank} on all 7 projections; jax "
          f"{jax.__version__} on {jax.default_backend()} ({cores} cores), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; median of {args.rounds * args.steps} steps; {args.dtype} matmul "
          f"2048^2: jax {jax_gflops:.0f}/{jax_gflops_after:.0f} GFLOP/s (start/end), torch "
          f"{torch_gflops:.0f}/{torch_gflops_after:.0f}; load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print("targets per row: " + ", ".join(f"{r['config']} {r['target_tokens']} of {r['seq']}" for r in results))
    print("matmul on each config's projection products (B*T rows): " + ", ".join(
        f"{r['config']} jax {r['projection_matmul_gflops']['jax']:.0f} / torch "
        f"{r['projection_matmul_gflops']['torch']:.0f} GFLOP/s" for r in results))
    header = (f"{'config':6s} {'T':>4s} {'variant':24s} {'adapter P':>10s} {'step ms':>9s} {'tokens/s':>9s} "
              f"{'x PEFT':>7s} {'/ LoRA':>7s} {'GFLOP/s':>8s} {'MFU':>6s} {'compile s':>9s}")
    print(header)
    for res in results:
        peft_row = res["rows"].get("PEFT LoRA (PyTorch)")
        for label, row in res["rows"].items():
            row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak
            row["over_peft"] = None if peft_row is None else row["tokens_per_s"] / peft_row["tokens_per_s"]
            over = "" if row["over_peft"] is None else f"{row['over_peft']:.2f}"
            compile_s = f"{row['compile_s']:.1f}" if "compile_s" in row else ""
            print(f"{res['config']:6s} {res['seq']:4d} {label:24s} {row['adapter_params']:10d} "
                  f"{1e3 * row['median_step_s']:9.1f} {row['tokens_per_s']:9.0f} {over:>7s} "
                  f"{row['time_over_lora']:7.2f} {row['gflops_per_s']:8.1f} "
                  f"{100 * row['fraction_of_matmul_peak']:5.1f}% "
                  f"{compile_s:>9s}")
    print("x PEFT: tokens/s over PEFT's; / LoRA: step time over our single-LoRA step (the merge overhead); "
          "MFU: (4N + 12 L T H Hd + 6P) per token over the jax matmul rate")

    if args.out:
        report = {
            "settings": vars(args), "results": results,
            "matmul_gflops": {"jax_start": jax_gflops, "jax_end": jax_gflops_after, "torch_start": torch_gflops,
                              "torch_end": torch_gflops_after, "peak_used": peak},
            "flops_formula": "4N + 12 L T H Hd + 6P per token (N: projection + LM head parameters, P: adapter)",
            "environment": {"jax_backend": jax.default_backend(), "cores": cores, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                            "jax": jax.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__, "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(),
                            "load_average_start": load_before, "load_average_end": os.getloadavg()},
        }
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
