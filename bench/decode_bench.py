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

On a shared or busy CPU, PyTorch's OpenMP threads can slow down by 10x when oversubscribed; compare with
``--torch-threads 1`` and ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``.
"""

from __future__ import annotations

import argparse
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import lora_merge_jax as lmj  # noqa: E402
from lora_merge_jax.evaluation import generate as gen  # noqa: E402
from lora_merge_jax import tiny  # noqa: E402
from lora_merge_jax.io.gguf_fetch import fetch_smollm2  # noqa: E402

REAL_MODELS = {"smollm2": fetch_smollm2}  # --model name -> () -> path of the (cached) GGUF


def _torch_model(path: Path) -> torch.nn.Module:
    """transformers' model of a checkpoint directory or, through its own GGUF loader, a .gguf file."""
    if path.suffix.lower() == ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 dtype=torch.float32).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Prompts of lengths length, length-2, length-4, length-6, ... (so the batch is left-padded)."""
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(4, vocab, max(1, length - 2 * (i % 4)) - 1).tolist() for i in range(batch)]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", choices=["tiny", *REAL_MODELS], default="tiny",
                        help="tiny: a random tiny Llama (default); smollm2: the real SmolLM2-135M-Instruct Q4_1 GGUF")
    parser.add_argument("--checkpoint", help="an existing Llama/Mistral/Qwen2 directory or .gguf file "
                        "(default: see --model)")
    parser.add_argument("--hidden", type=int, default=64, help="tiny model width (ignored with --checkpoint)")
    parser.add_argument("--layers", type=int, default=2, help="tiny model depth (ignored with --checkpoint)")
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
        ours = lmj.load_pretrained(path)
        theirs = _torch_model(Path(path))
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
            "environment": {"jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
                            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                            "xla_flags": os.environ.get("XLA_FLAGS", ""),
                            "jax": jax.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__, "python": platform.python_version(),
                            "load_average": os.getloadavg()},
            "results": results, "speedup": speedup, "identical_token_fraction": agree,
            "note": "first_call_s of lora_merge_jax includes jit compilation; median_s excludes it",
        }
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
