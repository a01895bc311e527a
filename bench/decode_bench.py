"""Greedy decoding throughput: lora_merge_jax.generate against transformers' generate (PyTorch), same model.

A random-weight tiny Llama checkpoint is written with ``lora_merge_jax.tiny.make_tiny_model`` (or one is read
from ``--checkpoint``, a directory or a ``.gguf`` file; or ``--model smollm2`` takes the real
SmolLM2-135M-Instruct Q4_1 GGUF, fetched once by ``lora_merge_jax.io.gguf_fetch``); both implementations
load it (transformers through its own GGUF loader for a ``.gguf``), decode the same left-padded batch greedily with
``min_new_tokens == max_new_tokens`` so that both produce exactly the same number of tokens, and are timed
after one warm-up call (which holds our compile time, reported separately). Prints one table and writes
JSON with ``--out``.

    python bench/decode_bench.py --batch 8 --prompt-len 32 --new-tokens 64 --out decode_bench.json
    python bench/decode_bench.py --model smollm2 --out decode_bench_smollm2.json    # the real model
    python bench/decode_bench.py --model smollm2 --data scitldr --out decode_scitldr.json  # real abstracts

``--data scitldr`` decodes real SciTLDR dev abstracts (``<--data-dir>/scitldr/dev.jsonl``, the first
``--examples``) as ``eval.py`` does: prompts built by ``prompts.build_eval_examples`` from the preset
``configs/data/scitldr.yaml`` (inside the model's chat template unless ``--no-chat-template``), sorted by length
across the set, cut into batches of ``--batch`` and decoded by ``generate`` (bucketed prompt length, batch padded
to a power of two). transformers gets the same batches, left-padded to each batch's longest prompt. Each batch is
also decoded with one new token, which times the prefill alone. The run also measures this machine's limits:
the float32 matmul rate (a jitted 2048 x 2048 ``jnp.dot``, as ``train_bench.py`` does) and the memory bandwidth
(a jitted sum over a 1 GiB float32 array; numpy's copy of one), and reports the prefill as a fraction of the
matmul rate and a decode step as a fraction of the bandwidth limit (see ``scitldr_report``).

On a shared or busy CPU, PyTorch's OpenMP threads can slow down by 10x when oversubscribed; compare with
``--torch-threads 1`` and ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import lora_merge_jax as lmj  # noqa: E402
from lora_merge_jax import config, tiny  # noqa: E402
from lora_merge_jax.data import prompts as prompts_lib  # noqa: E402
from lora_merge_jax.data.batching import bucket_length  # noqa: E402
from lora_merge_jax.data.records import DataConfig  # noqa: E402
from lora_merge_jax.evaluation import generate as gen  # noqa: E402
from lora_merge_jax.evaluation.evaluate import GenerationSection, length_sorted_batches  # noqa: E402
from lora_merge_jax.io.gguf_fetch import fetch_smollm2  # noqa: E402
from lora_merge_jax.models import products  # noqa: E402
from lora_merge_jax.models.config import PROJECTIONS  # noqa: E402
from torch_reference import torch_model  # noqa: E402

REAL_MODELS = {"smollm2": fetch_smollm2}  # --model name -> () -> path of the (cached) GGUF
ROOT = Path(__file__).resolve().parents[1]


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Prompts of lengths length, length-2, length-4, length-6, ... (so the batch is left-padded)."""
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(4, vocab, max(1, length - 2 * (i % 4)) - 1).tolist() for i in range(batch)]


def machine_limits(dtype: str = "float32", size: int = 2048, stream_bytes: int = 1 << 30,
                   repeats: int = 7) -> dict[str, float]:
    """This machine's matmul rate in ``dtype`` and memory bandwidth, medians of ``repeats`` after a warm-up.

    The matmul is train_bench's (a jitted ``size`` x ``size`` product accumulated in float32; torch.mm beside
    it). Bandwidth: a jitted sum over a ``stream_bytes`` float32 array (bytes read / time), and numpy's copy of
    one such array into another ((read + written) / time).
    """
    x = jax.random.normal(jax.random.key(0), (size, size), dtype)
    xt = torch.randn(size, size, dtype=getattr(torch, dtype))
    dot = jax.jit(functools.partial(products.einsum, "mk,kn->mn"))
    big = jnp.ones(stream_bytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    src, dst = np.ones(stream_bytes // 4, np.float32), np.empty(stream_bytes // 4, np.float32)
    runs = {"jax_dot": lambda: dot(x, x).block_until_ready(), "torch_mm": lambda: torch.mm(xt, xt),
            "jax_sum": lambda: total(big).block_until_ready(), "numpy_copy": lambda: np.copyto(dst, src)}
    times = {name: [] for name in runs}
    for _ in range(repeats + 1):  # the first round is the warm-up
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    t = {name: statistics.median(ts[1:]) for name, ts in times.items()}
    return {"jax_matmul_gflops": 2 * size ** 3 / t["jax_dot"] / 1e9,
            "torch_matmul_gflops": 2 * size ** 3 / t["torch_mm"] / 1e9,
            "jax_sum_gb_s": stream_bytes / t["jax_sum"] / 1e9,
            "numpy_copy_gb_s": 2 * stream_bytes / t["numpy_copy"] / 1e9}


def scitldr_prompts(model, data_dir: str, examples: int, chat_template: bool) -> list[list[int]] | None:
    """Prompt ids of the first ``examples`` SciTLDR dev records, built as eval.py builds them; None if absent."""
    if not (Path(data_dir) / "scitldr" / "dev.jsonl").exists():
        return None
    cfg = config.load_config(DataConfig, ROOT / "configs" / "data" / "scitldr.yaml",
                             [f"data_dir={data_dir}", f"use_chat_template={str(chat_template).lower()}",
                              f"max_eval_examples={examples}"])
    built, _ = prompts_lib.build_eval_examples(cfg, model.tokenizer)
    return [e.prompt_ids.tolist() for e in built]


def decode_costs(cfg, lengths: list[int], new_tokens: int, itemsize: int = 4) -> dict[str, float]:
    """Useful work of one batch: prefill FLOPs and the bytes a decode step must read, on average.

    Prefill: 2 x (matmul parameters) per real prompt token, causal attention (QK^T and PV, 4 H Hd per
    query-key pair of a layer, over p (p + 1) / 2 pairs), and the LM head on each row's last position only.
    A decode step reads every weight once (``itemsize`` bytes each; the tied embedding as the LM head) plus
    the filled KV cache of every real row (its mean over the steps).
    """
    layers, d, v = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    matmul_params = layers * sum(i * o for i, o in map(cfg.projection_shape, PROJECTIONS))
    attention = 4 * layers * cfg.num_attention_heads * cfg.head_dim * sum(p * (p + 1) / 2 for p in lengths)
    prefill = 2 * matmul_params * sum(lengths) + attention + 2 * d * v * len(lengths)
    kv_per_token = 2 * layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    mean_filled = sum(lengths) + len(lengths) * (new_tokens - 1) / 2  # slots in use, over the decode steps
    return {"prefill_flops": prefill, "step_bytes": itemsize * cfg.num_params() + kv_per_token * mean_filled}


def _timed(fn, repeats: int) -> tuple[float, list[float], object]:
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, times, out


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' input: the batch left-padded to its longest prompt, with the attention mask."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    return ids, mask


def run_scitldr(args, ours, theirs) -> dict | None:
    """Decodes real SciTLDR dev prompts with both, batch by batch in eval.py's order; returns the report."""
    prompts = scitldr_prompts(ours, args.data_dir, args.examples, args.chat_template)
    if prompts is None:
        print(f"skipped: {Path(args.data_dir) / 'scitldr' / 'dev.jsonl'} not found; get SciTLDR-A dev as "
              "configs/data/scitldr.yaml says, or point --data-dir at the directory holding scitldr/")
        return None
    n, cfg = args.new_tokens, ours.config
    batch_size = args.batch or GenerationSection().batch_size
    batches = [[prompts[i] for i in rows] for rows in length_sorted_batches(list(map(len, prompts)), batch_size)]
    eos = gen.default_eos_token_ids(ours)
    pad = prompts_lib.pad_token_id(ours.tokenizer)

    def ours_fn(batch, new):
        return lambda: gen.generate(ours, batch, max_new_tokens=new, min_new_tokens=new)

    def theirs_fn(batch, new):
        ids, mask = _left_padded(batch, pad)

        def run():
            with torch.no_grad():
                out = theirs.generate(ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=new,
                                      min_new_tokens=new, pad_token_id=pad, eos_token_id=list(eos))
            return out[:, ids.shape[1]:].tolist()
        return run

    # Warm-up: one call per compiled shape of ours (bucketed prompt length x padded batch), full and prefill-only.
    start = time.perf_counter()
    shapes = {}
    for batch in batches:
        shapes.setdefault((bucket_length(max(map(len, batch)), minimum=64), 1 << (len(batch) - 1).bit_length()), batch)
    for batch in shapes.values():
        ours_fn(batch, n)()
        ours_fn(batch, 1)()
    warmup_ours = time.perf_counter() - start
    theirs_fn(batches[0][:2], 2)()
    limits_start = machine_limits(args.dtype)

    # Timed: each batch by both in turn (load from other jobs reaches both alike); then each prefill alone.
    times = {k: [[] for _ in batches] for k in ("ours", "theirs", "ours_prefill", "theirs_prefill")}
    agree, tokens_ours = [], []
    for _ in range(args.repeats or 1):
        for b, batch in enumerate(batches):
            for key, fn in (("ours", ours_fn(batch, n)), ("theirs", theirs_fn(batch, n)),
                            ("ours_prefill", ours_fn(batch, 1)), ("theirs_prefill", theirs_fn(batch, 1))):
                t0 = time.perf_counter()
                out = fn()
                times[key][b].append(time.perf_counter() - t0)
                if key == "ours":
                    tokens_ours = out
                elif key == "theirs":
                    assert all(len(t) == n for t in out) and all(len(t) == n for t in tokens_ours)
                    agree.append(float(np.mean(np.array(tokens_ours) == np.array(out))))
    limits_end = machine_limits(args.dtype)
    limits = {k: max(limits_start[k], limits_end[k]) for k in limits_start}
    matmul, bandwidth = limits["jax_matmul_gflops"] * 1e9, limits["jax_sum_gb_s"] * 1e9

    med = {k: [statistics.median(ts) for ts in per_batch] for k, per_batch in times.items()}
    costs = [decode_costs(cfg, list(map(len, batch)), n, jnp.dtype(args.dtype).itemsize) for batch in batches]
    flops, step_bytes = sum(c["prefill_flops"] for c in costs), [c["step_bytes"] for c in costs]
    rows = {}
    for name in ("ours", "theirs"):
        total, prefill = sum(med[name]), sum(med[name + "_prefill"])
        steps = [(full - pre) / max(n - 1, 1) for full, pre in zip(med[name], med[name + "_prefill"])]
        rows[name] = {
            "total_s": total, "tokens_per_s": len(prompts) * n / total, "prefill_s": prefill,
            "prefill_fraction_of_matmul": flops / prefill / matmul,
            "decode_step_s": statistics.mean(steps),
            "decode_fraction_of_bandwidth": sum(step_bytes) / sum(steps) / bandwidth,
            "per_batch_total_s": med[name], "per_batch_prefill_s": med[name + "_prefill"]}
    speedup = rows["theirs"]["total_s"] / rows["ours"]["total_s"]
    lengths = sorted(map(len, prompts))
    shared = [gen.shared_prefix_length(batch) for batch in batches]
    print(f"greedy decode of {len(prompts)} SciTLDR dev abstracts ({'chat template' if args.chat_template else 'plain'}"
          f" prompts of {lengths[0]}-{lengths[-1]} tokens, mean {statistics.mean(lengths):.0f}), sorted by length in "
          f"batches of {batch_size}, {n} new tokens each, {args.dtype}; model hidden={cfg.hidden_size} layers="
          f"{cfg.num_hidden_layers} vocab={cfg.vocab_size}; median of {args.repeats or 1} after a warm-up "
          f"({warmup_ours:.1f} s for ours, compiles included); ours prefills a shared prefix of "
          f"{shared} tokens per batch once")
    print(f"limits: {args.dtype} matmul {limits['jax_matmul_gflops']:.1f} GFLOP/s (torch.mm "
          f"{limits['torch_matmul_gflops']:.1f}); bandwidth {limits['jax_sum_gb_s']:.2f} GB/s (jitted sum; numpy copy "
          f"{limits['numpy_copy_gb_s']:.2f}); prefill {flops / 1e12:.2f} TFLOP of real tokens; a decode step reads "
          f"{statistics.mean(step_bytes) / 1e6:.0f} MB on average")
    print(f"{'':24s} {'total s':>8s} {'tokens/s':>9s} {'prefill s':>10s} {'% matmul':>9s} {'step ms':>8s} "
          f"{'% bandw.':>9s}")
    for name, label in (("ours", "lora_merge_jax"), ("theirs", "transformers generate")):
        r = rows[name]
        print(f"{label:24s} {r['total_s']:8.2f} {r['tokens_per_s']:9.1f} {r['prefill_s']:10.2f} "
              f"{100 * r['prefill_fraction_of_matmul']:8.1f}% {1e3 * r['decode_step_s']:8.1f} "
              f"{100 * r['decode_fraction_of_bandwidth']:8.1f}%")
    print(f"speed-up (ours / transformers): {speedup:.2f}x; identical tokens: {100 * statistics.mean(agree):.1f}%")
    return {"settings": {"data": "scitldr", "examples": len(prompts), "chat_template": args.chat_template,
                         "batch": batch_size, "dtype": args.dtype, "batches": [list(map(len, b)) for b in batches],
                         "shared_prefix": shared, "new_tokens": n,
                         "repeats": args.repeats or 1, "model": args.model, "hidden": cfg.hidden_size,
                         "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size},
            "limits": {"start": limits_start, "end": limits_end, "used": limits},
            "prefill_flops": flops, "mean_step_bytes": statistics.mean(step_bytes), "warmup_ours_s": warmup_ours,
            "results": rows, "speedup": speedup, "identical_token_fraction": statistics.mean(agree),
            "note": "prefill_s: the same batches decoded with one new token; decode_step_s: (total - prefill) / "
                    "(new_tokens - 1), per batch, averaged; fractions use the useful work (real tokens, see "
                    "decode_costs) over the larger of the limits measured before and after"}


def _environment() -> dict:
    return {"jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "jax": jax.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["random", "scitldr"], default="random",
                        help="random: synthetic prompts of --prompt-len (default); scitldr: real SciTLDR dev abstracts")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                        help="directory holding scitldr/dev.jsonl (--data scitldr)")
    parser.add_argument("--examples", type=int, default=64, help="--data scitldr: the first N dev records")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                        help="--data scitldr: wrap the preset's prompt in the model's chat template")
    parser.add_argument("--batch", type=int, help="batch size (default 8; --data scitldr: eval.py's 16)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, help="timed passes (default 5; --data scitldr: 1)")
    parser.add_argument("--model", choices=["tiny", *REAL_MODELS], default="tiny",
                        help="tiny: a random tiny Llama (default); smollm2: the real SmolLM2-135M-Instruct Q4_1 GGUF")
    parser.add_argument("--checkpoint", help="an existing Llama/Mistral/Qwen2 directory or .gguf file "
                        "(default: see --model)")
    parser.add_argument("--hidden", type=int, default=64, help="tiny model width (ignored with --checkpoint)")
    parser.add_argument("--layers", type=int, default=2, help="tiny model depth (ignored with --checkpoint)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="both implementations' weights and activations")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    if args.checkpoint is None and args.model in REAL_MODELS:
        args.checkpoint = str(REAL_MODELS[args.model]())
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or tiny.make_tiny_model(Path(tmp) / "tiny", hidden=args.hidden, layers=args.layers,
                                                       ffw=2 * args.hidden)
        ours = lmj.load_pretrained(path, dtype=args.dtype)
        theirs = torch_model(Path(path), getattr(torch, args.dtype)).eval()
    if args.data == "scitldr":
        report = run_scitldr(args, ours, theirs)
        if report is not None and args.out:
            report["environment"] = _environment()
            report["settings"]["checkpoint"] = str(args.checkpoint or "tiny random")
            Path(args.out).write_text(json.dumps(report, indent=2))
            print(f"wrote {args.out}")
        return
    args.batch, args.repeats = args.batch or 8, args.repeats or 5
    n, batch = args.new_tokens, args.batch
    prompts = _prompts(batch, args.prompt_len, ours.config.vocab_size, seed=0)

    def run_ours() -> list[list[int]]:
        return gen.generate(ours, prompts, max_new_tokens=n, min_new_tokens=n, eos_token_ids=[2], pad_token_id=0)

    width = max(map(len, prompts))
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1

    def run_theirs() -> list[list[int]]:
        with torch.no_grad():
            out = theirs.generate(ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=0, eos_token_id=2)
        return out[:, width:].tolist()

    first_ours, times_ours, tokens_ours = _timed(run_ours, args.repeats)
    first_theirs, times_theirs, tokens_theirs = _timed(run_theirs, args.repeats)
    assert all(len(t) == n for t in tokens_ours) and all(len(t) == n for t in tokens_theirs)
    agree = float(np.mean(np.array(tokens_ours) == np.array(tokens_theirs)))
    rows = {
        "lora_merge_jax (jit, while_loop)": (first_ours, statistics.median(times_ours)),
        "transformers generate (PyTorch)": (first_theirs, statistics.median(times_theirs)),
    }
    results = {name: {"first_call_s": f, "median_s": t, "tokens_per_s": batch * n / t} for name, (f, t) in rows.items()}
    speedup = statistics.median(times_theirs) / statistics.median(times_ours)

    cfg = ours.config
    print(f"greedy decode: batch {batch}, prompts {min(map(len, prompts))}-{width} tokens (left-padded), {n} new "
          f"tokens each; model hidden={cfg.hidden_size} layers={cfg.num_hidden_layers} vocab={cfg.vocab_size}; "
          f"median of {args.repeats} after one warm-up")
    print(f"{'implementation':36s} {'tokens/s':>10s} {'median s':>10s} {'first call s':>13s}")
    for name, r in results.items():
        print(f"{name:36s} {r['tokens_per_s']:10.1f} {r['median_s']:10.4f} {r['first_call_s']:13.3f}")
    print(f"speed-up (ours / transformers): {speedup:.2f}x; identical tokens: {100 * agree:.1f}%")

    if args.out:
        report = {
            "settings": {"batch": batch, "prompt_lengths": [len(p) for p in prompts], "new_tokens": n,
                         "repeats": args.repeats, "model": args.model,
                         "checkpoint": str(args.checkpoint or "tiny random"),
                         "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size},
            "environment": _environment(),
            "results": results, "speedup": speedup, "identical_token_fraction": agree,
            "note": "first_call_s of lora_merge_jax includes jit compilation; median_s excludes it",
        }
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
