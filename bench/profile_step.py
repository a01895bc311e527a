"""Where a train step's time goes: XLA's profiler over one step, summed by kind of operation.

The step is ``train_bench.py``'s (our LoRA or adaptive-merge step as ``train.py`` builds it, on a random batch
whose last ``--target-tokens`` tokens of each row are the target). One warm step, then one step under
``jax.profiler.trace``; every executed HLO operation of the trace is matched to the compiled (optimized) HLO
by name and summed into groups: the projections' products, attention (its products and softmax), the
adapters' rank-r products, the LM head, the scan's stacking of saved activations, and other elementwise work.
Prints the groups and the slowest operations (with their shapes and source op names), and keeps the trace
(``--trace-dir``, viewable in Perfetto / TensorBoard) and the optimized HLO beside it.

    python bench/profile_step.py --config smollm2 --batch 4 --seq 512 --target-tokens 64
    python bench/profile_step.py --config 35M --variant merge --tasks 8 --top 20

Times are those of a profiled step (the profiler adds a little per operation); read the shares, and compare
steps with ``train_bench.py``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_bench as tb  # noqa: E402  (sets the thread environment before jax starts)

import jax  # noqa: E402

import lora_merge_jax as lmj  # noqa: E402

_HLO_LINE = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])\S* ([\w\-]+)\(")
_SCOPES = re.compile(r"jit\([\w]+\)/|while/body/|closed_call/")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """Operation name -> (result shape, opcode, source op name) of an optimized HLO module's text."""
    ops = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if m:
            source = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(2), m.group(3), _SCOPES.sub("", source.group(1)) if source else "")
    return ops


def group_of(name: str, shape: str, source: str, rank: int) -> str:
    """The group an operation's time counts in (from its name, result shape and source op)."""
    if re.search(r"bk\w*,bk\w*->", source) or "exponential" in name or "attention" in source:
        return "attention (products, softmax)"
    dims = re.search(r"\[([\d,]*)\]", shape)
    dims = dims.group(1).split(",") if dims else []
    # A 2-D result with a rank-sized side ([N, R], [R, D]): a batch of R rows is [R, T, ...], not an adapter.
    if (len(dims) == 2 and str(rank) in dims) or re.search(r"\bnr,|,rf->|nf,rf", source):
        return f"adapters' rank-{rank} products"
    if "btv" in source or "btd,vd" in source or "btd,dv" in source:
        return "LM head"
    if re.search(r"nd,df->nf|nf,df->nd", source):
        return "projections' products"
    if "dynamic" in name or ("broadcast" in name and "while" not in source and re.match(r"\w+\[\d+,", shape)):
        return "scan: stacking / slicing saved activations"
    return "other (elementwise, norms, copies)"


def profile(args: argparse.Namespace, out: Path) -> None:
    if args.config in tb.REAL_MODELS:
        fetch, seq = tb.REAL_MODELS[args.config]
        model = lmj.load_pretrained(fetch(), dtype=args.dtype, load_tokenizer=False)
    else:
        import torch
        import transformers

        hf_kwargs, seq = tb.CONFIGS[args.config]
        torch.manual_seed(0)
        hf_config = transformers.LlamaConfig(**hf_kwargs, max_position_embeddings=max(args.seq or seq, 512),
                                             tie_word_embeddings=False)
        transformers.LlamaForCausalLM(hf_config).save_pretrained(str(out / "model"))
        model = lmj.load_pretrained(out / "model", dtype=args.dtype)
    seq = args.seq or seq
    batch = tb.make_batch(model.config.vocab_size, args.batch, seq, args.target_tokens or 3 * seq // 4)
    built = tb.build_ours(model, args.variant, args.tasks, args.rank, batch, 10)
    hlo = built.compiled().as_text()
    (out / "step.hlo.txt").write_text(hlo)
    ops = hlo_ops(hlo)
    state = built.state
    state, metrics = built.step(state, built.batch)  # warm: allocations, the jit cache
    jax.block_until_ready((state, metrics))
    trace_dir = out / "trace"
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        state, metrics = built.step(state, built.batch)
        jax.block_until_ready((state, metrics))
    trace_file = sorted(glob.glob(str(trace_dir / "plugins" / "profile" / "*" / "perfetto_trace.json.gz")))[-1]
    with gzip.open(trace_file) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops:
            per_op[e["name"]] += e["dur"] / 1e3
            calls[e["name"]] += 1
    total = sum(per_op.values())
    groups = collections.Counter()
    # A merge of K task LoRAs is one adapter of rank K x r (its rank products have that side).
    adapter_rank = args.rank * (1 if args.variant == "lora" else args.tasks)
    for name, ms in per_op.items():
        groups[group_of(name, *ops[name][::2], adapter_rank)] += ms
    print(f"{args.config} {args.variant}, batch {args.batch} x {seq}, {int(batch['target_mask'][0, 0].sum())} "
          f"target tokens per row: {total:.0f} ms of operations in one profiled step")
    for group, ms in groups.most_common():
        print(f"  {ms:9.1f} ms {100 * ms / total:5.1f}%  {group}")
    print(f"slowest {args.top} operations (ms, calls, name, result shape, source op):")
    for name, ms in per_op.most_common(args.top):
        shape, _, source = ops[name]
        print(f"  {ms:8.1f} {calls[name]:4d}  {name:36s} {shape:22s} {source[-80:]}")
    if args.trace_dir is not None:
        print(f"trace: {trace_file}\noptimized HLO: {out / 'step.hlo.txt'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smollm2", choices=[*tb.CONFIGS, *tb.REAL_MODELS])
    parser.add_argument("--variant", default="lora", choices=["lora", "merge", "merge+prune"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, help="sequence length (default: the config's, as in train_bench.py)")
    parser.add_argument("--target-tokens", type=int, help="target tokens at the end of each row (default 3/4)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the frozen weights' and activations' dtype (the adapter and optimizer stay float32)")
    parser.add_argument("--tasks", type=int, default=8, help="K of the merge variants")
    parser.add_argument("--top", type=int, default=25, help="how many of the slowest operations to list")
    parser.add_argument("--trace-dir", type=Path, help="keep the trace and HLO here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, help="as train_bench.py's (read before jax starts)")
    args = parser.parse_args()
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        profile(args, args.trace_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            profile(args, Path(tmp))


if __name__ == "__main__":
    main()
