"""Memory plan of the adaptive-merge train step at Llama-3-8B size, compiled ahead of time without weights.

Nothing of model size is allocated: the base weights are ``model.abstract(cfg, bfloat16, mesh)``
(``ShapeDtypeStruct``s with their shardings), the merged adapter (K=8 task LoRAs of rank 16 on all seven
projections, float32) and the whole train state (AdamW moments, masks, pruning statistics) come from
``jax.eval_shape``, and the step (with the default pruning hook) is compiled with
``jax.jit(step, in_shardings=..., out_shardings=..., donate_argnums=0).lower(...).compile()`` on fake CPU
devices (64 of them, made here before jax starts). For each mesh shape, with and without remat, it prints
the compiled memory analysis per device and checks that no buffer of a base weight's size exists besides
the weights: the temporaries are compared with the per-device weights, and the optimized HLO is searched
for any non-parameter instruction whose shape is a whole stacked base weight (or its per-device shard) --
a gradient or an optimizer moment of a frozen weight, or an all-gather of every layer at once, would show
up there. (Each scan step does slice and all-gather *one* layer's weights; those are expected.)

The numbers are XLA:CPU's buffer assignment for the same partitioned program; a TPU or GPU compiler
schedules and fuses differently, so read them as an estimate (typically within tens of percent), not a
guarantee.

    python bench/memory_plan.py --out memory_plan.json

With ``--platform tpu`` the same step is compiled by XLA:TPU for an abstract TPU topology instead (needs
``pip install "jax[tpu]"``, i.e. libtpu; no TPU is attached or used: the devices are compile-only ones from
``jax.experimental.topologies.get_topology_desc``), and the numbers are the TPU compiler's own buffer
assignment per device, checked against the generation's HBM (v5e 16 GiB, v6e 32 GiB, v5p 95 GiB)::

    python bench/memory_plan.py --platform tpu --topology v5e:4x4 --mesh 1x16x1 --remat on
    python bench/memory_plan.py --platform tpu --topology v5e:4x4 --slices 2 --mesh 2x16x1 --remat on
    python bench/memory_plan.py --platform tpu --topology v5p:2x2x2 --remat both --model 70b

A step that does not fit a v5e chip is refused by XLA:TPU within a minute (RESOURCE_EXHAUSTED) and reported
as "does not fit"; one that fits takes long to compile (Llama-3-8B: 15-35 minutes on a CPU host).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402

import lora_merge_jax as lmj  # noqa: E402
from lora_merge_jax.models import weights as model_lib  # noqa: E402
from lora_merge_jax import sharding  # noqa: E402
from lora_merge_jax.merge import pruning  # noqa: E402
from lora_merge_jax.models.config import PROJECTIONS, ModelConfig, from_hf_config  # noqa: E402
from lora_merge_jax.training.optim import OptimConfig, make_optimizer  # noqa: E402
from lora_merge_jax.training.step import (  # noqa: E402
    init_state,
    jit_train_step,
    make_train_step,
    state_shardings,
)
from jax.sharding import AxisType, Mesh  # noqa: E402

GIB = 2 ** 30
# (data, fsdp, tensor)
MESHES = [(8, 1, 1), (1, 8, 1), (1, 4, 2), (1, 64, 1), (8, 8, 1), (1, 32, 2)]
SKIP_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional", "constant"}


# HBM per chip (GiB) of each TPU generation, by the prefix of its topology name ("v5e:4x4", "v5p:2x2x2").
TPU_HBM_GIB = {"v4": 32, "v5": 95, "v5p": 95, "v5e": 16, "v6e": 32}
# get_topology_desc's chip_config_name per generation ("megacore" joins a v4/v5p chip's two TensorCores into
# one device); chips_per_host_bounds only decides how devices are split into processes, not the program.
TPU_CHIP_CONFIG = {"v4": "megacore", "v5": "megacore", "v5p": "megacore", "v5e": "default", "v6e": "default"}


def llama3_70b() -> ModelConfig:
    """Llama-3-70B's architecture (published dimensions, untied embeddings; no download)."""
    hf = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    )
    return from_hf_config(hf, source="Llama-3-70B dimensions")


def tpu_generation(topology: str) -> str:
    gen = topology.split(":")[0]
    if gen not in TPU_HBM_GIB:
        raise SystemExit(f"unknown TPU generation {gen!r} in --topology {topology!r}; "
                         f"known: {', '.join(sorted(TPU_HBM_GIB))}")
    return gen


def tpu_devices(topology: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices of a topology (``v5e:4x4``: 16 chips), ``num_slices`` slices of it."""
    # Before libtpu loads (the first get_topology_desc call): a worker list silences libtpu's ERROR about
    # TPU_WORKER_HOSTNAMES off a TPU VM, and ALLOW_MULTIPLE_LIBTPU_LOAD lets several processes compile at once
    # (each takes /tmp/libtpu_lockfile otherwise).
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise SystemExit('--platform tpu needs libtpu: pip install "jax[tpu]" (no TPU needs to be attached)')
    from jax.experimental.topologies import get_topology_desc

    gen = tpu_generation(topology)
    return get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=TPU_CHIP_CONFIG[gen],
                             chips_per_host_bounds=(2, 2, 1), num_slices=num_slices).devices


def tpu_mesh(devices: list, data: int, fsdp: int, tensor: int) -> Mesh:
    """The (data, fsdp, tensor) mesh over topology devices: the project's ``make_mesh`` for one slice; for
    several slices (which ``jax.make_mesh`` refuses) the data axis is split slices x per-slice (DCN across)."""
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if data * fsdp * tensor != len(devices):
        raise SystemExit(f"mesh {data}x{fsdp}x{tensor} needs {data * fsdp * tensor} devices; the topology "
                         f"has {len(devices)}")
    if slices == 1:
        return sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)
    if data % slices:
        raise SystemExit(f"data={data} must be a multiple of the {slices} slices")
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1), devices)
    return Mesh(np.asarray(grid), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def llama3_8b() -> ModelConfig:
    """Llama-3-8B's architecture, from a transformers config with its published dimensions (no download)."""
    hf = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    )
    return from_hf_config(hf, source="Llama-3-8B dimensions")


def per_device_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def weight_shapes(weights) -> set[tuple[int, ...]]:
    """Whole and per-device shapes of every large (>= 2^20 entries) array of a tree of abstract arrays."""
    shapes = set()
    for x in jax.tree.leaves(weights):
        if x.ndim >= 2 and math.prod(x.shape) >= 2 ** 20:
            shapes.add(tuple(x.shape))
            shapes.add(tuple(x.sharding.shard_shape(x.shape)))
    return shapes


def hlo_buffers(text: str) -> list[tuple[int, str, str, tuple[int, ...], str]]:
    """(bytes, opcode, name, dims, dtype) of every array-valued instruction of the optimized HLO that owns a
    buffer: instructions inside fused computations (which share their fusion's buffer) are left out."""
    sizes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
    fused = set(re.findall(r"calls=%?([\w.\-]+)", text))
    out, inside_fused = [], False
    header = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
    pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\(")
    for line in text.splitlines():
        h = header.match(line)
        if h and not line.startswith(" "):
            inside_fused = h.group(1) in fused and not line.startswith("ENTRY")
            continue
        m = pattern.match(line)
        if m and not inside_fused and m.group(2) in sizes:
            dims = tuple(int(d) for d in m.group(3).split(",") if d)
            out.append((math.prod(dims) * sizes[m.group(2)], m.group(4), m.group(1), dims, m.group(2)))
    return out


def is_cpu_upcast(op: str, name: str, dtype: str) -> bool:
    """XLA:CPU has no bfloat16 matmul: it converts bfloat16 weights to float32 (and hoists the conversion of
    a whole stacked weight out of the layer loop). A TPU or GPU multiplies in bfloat16 and has no such copy."""
    return dtype == "f32" and ("convert" in op or "convert" in name)


def plan_one(cfg: ModelConfig, mesh_shape: tuple[int, int, int], remat: bool, args: argparse.Namespace,
             tpu: list | None = None) -> dict:
    """One mesh shape and remat setting on fake CPU devices, or (``tpu``: topology devices) for XLA:TPU."""
    data, fsdp, tensor = mesh_shape
    if tpu is None:
        devices = jax.devices()[: data * fsdp * tensor]
        mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)
    else:
        mesh = tpu_mesh(tpu, data, fsdp, tensor)
    batch = args.per_device_batch * data * fsdp
    weights = model_lib.abstract(cfg, jnp.bfloat16, mesh)
    model_lib.shardings(cfg, mesh)  # raises, naming the weight, when the mesh does not divide it

    def build_adapter():
        loras = [lmj.init_lora(cfg, jax.random.key(i), rank=args.rank, alpha=2.0 * args.rank,
                               target_modules=PROJECTIONS) for i in range(args.tasks)]
        return lmj.merge_for_training(loras, granularity="task")

    adapter = jax.eval_shape(build_adapter)
    prune_cfg = pruning.PruneConfig()
    extra = jax.eval_shape(lambda a: pruning.init_statistics(prune_cfg, a), adapter)
    tx = make_optimizer(OptimConfig(learning_rate=2e-4), 1000)
    state = jax.eval_shape(lambda a, e: init_state(a, tx, seed=0, extra=e), adapter, extra)
    state_sh = state_shardings(state, cfg, mesh, tx)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, state_sh)
    step = make_train_step(cfg, tx, compute_dtype=jnp.bfloat16, remat=remat,
                           post_update=pruning.make_post_update(prune_cfg, 1000, cfg.num_hidden_layers))
    # The same jit (shardings, donation, mesh set while tracing) that train.py compiles.
    jitted = jit_train_step(step, state, weights, cfg, mesh, batch).jitted
    batch_sh = sharding.named_sharding(mesh, (None, "batch", None))
    ids = jax.ShapeDtypeStruct((1, batch, args.seq), jnp.int32, sharding=batch_sh)
    batch_tree = {"input_ids": ids, "attention_mask": ids, "target_mask": ids}
    start = time.perf_counter()
    lowered = jitted.lower(state, weights, batch_tree)
    if tpu is not None:
        return plan_tpu(cfg, lowered, state, weights, mesh_shape, remat, batch, start, args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    mem = compiled.memory_analysis()
    weight_bytes = per_device_bytes(weights)
    state_bytes = per_device_bytes(state)
    layer_bytes = weight_bytes / cfg.num_hidden_layers  # about one layer's share (embeddings spread over layers)
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    buffers = [b for b in hlo_buffers(compiled.as_text()) if b[1] not in SKIP_OPS]
    # Shapes the train state also has (R = 128 task ranks can equal a per-device embed shard) are not evidence.
    shapes = weight_shapes(weights) - weight_shapes(state)
    stacked = [b for b in buffers if b[3] in shapes and b[3][0] == cfg.num_hidden_layers]
    upcasts = [b for b in stacked if is_cpu_upcast(b[1], b[2], b[4])]
    weight_shaped = [b for b in stacked if b not in upcasts]
    upcast_bytes = sum(b[0] for b in upcasts)
    largest = sorted(buffers, reverse=True)[:4]
    return {
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "remat": remat, "global_batch": batch,
        "seq": args.seq, "compile_s": compile_s,
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes, "total_bytes": total,
        "weights_per_device_bytes": weight_bytes, "state_per_device_bytes": state_bytes,
        "temp_over_weights": mem.temp_size_in_bytes / weight_bytes,
        "temp_over_one_layer": mem.temp_size_in_bytes / layer_bytes,
        "stacked_weight_shaped_buffers": [f"{t}{list(d)} {op} {name}" for _, op, name, d, t in weight_shaped],
        "cpu_upcast_weight_copies": [f"{t}{list(d)} {op} {name}" for _, op, name, d, t in upcasts],
        "cpu_upcast_bytes": upcast_bytes, "total_without_cpu_upcasts_bytes": total - upcast_bytes,
        "largest_buffers": [f"{op} {t}{list(d)} {size / GIB:.2f} GiB" for size, op, _, d, t in largest],
        "fits_16GiB": total - upcast_bytes <= 16 * GIB, "fits_80GiB": total - upcast_bytes <= 80 * GIB,
    }


def plan_tpu(cfg: ModelConfig, lowered, state, weights, mesh_shape: tuple[int, int, int], remat: bool,
             batch: int, start: float, args: argparse.Namespace) -> dict:
    """Compiles ``lowered`` with XLA:TPU and reads its per-device buffer assignment (a step too big for the
    chip's HBM is refused with RESOURCE_EXHAUSTED, reported as not fitting)."""
    data, fsdp, tensor = mesh_shape
    hbm = TPU_HBM_GIB[tpu_generation(args.topology)]
    row = {"mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}, "remat": remat, "global_batch": batch,
           "seq": args.seq, "topology": args.topology, "slices": args.slices, "hbm_gib": hbm,
           "weights_per_device_bytes": per_device_bytes(weights), "state_per_device_bytes": per_device_bytes(state)}
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 -- XLA:TPU refuses a program that does not fit the chip's HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**row, "compile_s": time.perf_counter() - start, "fits": False,
                "error": str(e).strip().splitlines()[0]}
    row["compile_s"] = time.perf_counter() - start
    mem = compiled.memory_analysis()
    # What must be in HBM at once: inputs + outputs not aliased to the donated state + temporaries + code.
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    buffers = [b for b in hlo_buffers(compiled.as_text()) if b[1] not in SKIP_OPS]
    shapes = weight_shapes(weights) - weight_shapes(state)
    # XLA:TPU multiplies in bfloat16, so unlike XLA:CPU it makes no float32 copies of the stacked weights: any
    # non-parameter buffer shaped like a whole stacked base weight (or its shard) is reported, and a float32
    # one -- the dtype a gradient or AdamW moment of a frozen weight would have -- separately.
    stacked = [b for b in buffers if b[3] in shapes and b[3][0] == cfg.num_hidden_layers]
    largest = sorted(buffers, reverse=True)[:4]
    return {
        **row, "fits": total <= hbm * GIB,
        "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
        "generated_code_bytes": mem.generated_code_size_in_bytes, "total_bytes": total,
        "peak_memory_bytes": getattr(mem, "peak_memory_in_bytes", None),
        "stacked_weight_shaped_buffers": [f"{t}{list(d)} {op} {name}" for _, op, name, d, t in stacked],
        "f32_weight_shaped_buffers": [f"{t}{list(d)} {op} {name}" for _, op, name, d, t in stacked if t == "f32"],
        "largest_buffers": [f"{op} {t}{list(d)} {size / GIB:.2f} GiB" for size, op, _, d, t in largest],
    }


def print_tpu(cfg: ModelConfig, rows: list[dict], args: argparse.Namespace, devices: list) -> None:
    hbm = TPU_HBM_GIB[tpu_generation(args.topology)]
    print(f"{args.model.upper()} Llama-3 shapes ({cfg.num_params() / 1e9:.2f}B parameters, bfloat16 base), adaptive "
          f"merge K={args.tasks} r={args.rank} on all 7 projections (float32 adapter, AdamW, pruning statistics), "
          f"sequence {args.seq}, {args.per_device_batch} sequence(s) per batch shard; XLA:TPU memory analysis "
          f"per device, GiB: {args.topology} x {args.slices} slice(s), {len(devices)} x {devices[0].device_kind}, "
          f"{hbm} GiB HBM each")
    print(f"{'devices':>7s} {'data':>4s} {'fsdp':>4s} {'tp':>3s} {'remat':>5s} {'batch':>5s} {'weights':>8s} "
          f"{'state':>6s} {'argument':>8s} {'output':>7s} {'alias':>7s} {'temp':>7s} {'code':>5s} {'total':>7s} "
          f"{'w-shaped':>8s} {'f32':>3s} {f'{hbm}GiB':>6s}")
    for r in rows:
        m = r["mesh"]
        head = (f"{m['data'] * m['fsdp'] * m['tensor']:7d} {m['data']:4d} {m['fsdp']:4d} {m['tensor']:3d} "
                f"{'on' if r['remat'] else 'off':>5s} {r['global_batch']:5d} "
                f"{r['weights_per_device_bytes'] / GIB:8.2f} {r['state_per_device_bytes'] / GIB:6.2f}")
        if "error" in r:
            print(f"{head} does not fit: {r['error']}")
            continue
        print(f"{head} {r['argument_bytes'] / GIB:8.2f} {r['output_bytes'] / GIB:7.2f} "
              f"{r['alias_bytes'] / GIB:7.2f} {r['temp_bytes'] / GIB:7.2f} {r['generated_code_bytes'] / GIB:5.2f} "
              f"{r['total_bytes'] / GIB:7.2f} {len(r['stacked_weight_shaped_buffers']):8d} "
              f"{len(r['f32_weight_shaped_buffers']):3d} {'yes' if r['fits'] else 'no':>6s}")
    print("total = argument + output - alias (the donated state) + temp + generated code: XLA:TPU's own buffer "
          "assignment for one device. w-shaped: non-parameter buffers shaped like a whole stacked base weight or its "
          "per-device shard (f32: of them, float32 -- a frozen weight's gradient or AdamW moment would be one); 0 "
          "means none exists. 'does not fit': XLA:TPU refused the program (RESOURCE_EXHAUSTED).")
    for r in rows:
        if "error" not in r:
            m = r["mesh"]
            print(f"  data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} remat={'on' if r['remat'] else 'off'}: "
                  f"largest temporaries {'; '.join(r['largest_buffers'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", "--mesh", nargs="+", default=None,
                        help="data x fsdp x tensor shapes, e.g. 1x8x1 (8 devices) or 8x8x1 (64); default: six CPU "
                             "meshes, or with --platform tpu one mesh of slices x (devices/slices) x 1")
    parser.add_argument("--remat", nargs="+", default=["off", "on"], choices=["off", "on", "both"],
                        help="off, on, or both (default: both)")
    parser.add_argument("--platform", choices=["cpu", "tpu"], default="cpu",
                        help="cpu: XLA:CPU on 64 fake devices (an estimate); tpu: XLA:TPU for --topology (needs "
                             "libtpu, no TPU attached)")
    parser.add_argument("--topology", help="TPU topology for --platform tpu, e.g. v5e:4x4, v5p:2x2x2, v6e:8x8")
    parser.add_argument("--slices", type=int, default=1, help="TPU slices of --topology (multi-slice over DCN)")
    parser.add_argument("--model", choices=["8b", "70b"], default="8b", help="Llama-3-8B or Llama-3-70B shapes")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--per-device-batch", type=int, default=1,
                        help="sequences per batch shard: global batch = this x data x fsdp")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    remats = [v for r in args.remat for v in (["off", "on"] if r == "both" else [r])]
    args.remat = list(dict.fromkeys(remats))

    tpu = None
    if args.platform == "tpu":
        if not args.topology:
            parser.error("--platform tpu needs --topology, e.g. v5e:4x4")
        tpu = tpu_devices(args.topology, args.slices)
        if args.meshes is None:
            args.meshes = [f"{args.slices}x{len(tpu) // args.slices}x1"]
    elif args.topology or args.slices != 1:
        parser.error("--topology and --slices need --platform tpu")
    if args.meshes is None:
        args.meshes = [f"{d}x{f}x{t}" for d, f, t in MESHES]

    cfg = llama3_70b() if args.model == "70b" else llama3_8b()
    rows = []
    for text in args.meshes:
        mesh_shape = tuple(int(v) for v in text.split("x"))
        for remat in args.remat:
            rows.append(plan_one(cfg, mesh_shape, remat == "on", args, tpu))
            r = rows[-1]
            print(f"  compiled data={mesh_shape[0]} fsdp={mesh_shape[1]} tensor={mesh_shape[2]} remat={remat} "
                  f"in {r['compile_s']:.0f} s{' (does not fit)' if r.get('fits') is False else ''}",
                  file=sys.stderr, flush=True)

    if tpu is not None:
        print_tpu(cfg, rows, args, tpu)
        if args.out:
            report = {"settings": vars(args), "model": {"params": cfg.num_params(), "layers": cfg.num_hidden_layers,
                                                        "hidden": cfg.hidden_size, "ffw": cfg.intermediate_size,
                                                        "vocab": cfg.vocab_size},
                      "rows": rows, "jax": jax.__version__, "device_kind": tpu[0].device_kind,
                      "note": "XLA:TPU buffer assignment per device (ahead-of-time compile, no TPU attached)"}
            Path(args.out).write_text(json.dumps(report, indent=2))
            print(f"wrote {args.out}")
        return

    print(f"Llama-3-8B shapes ({cfg.num_params() / 1e9:.2f}B parameters, bfloat16 base), adaptive merge K={args.tasks} "
          f"r={args.rank} on all 7 projections (float32 adapter, AdamW, pruning statistics), sequence {args.seq}, "
          f"{args.per_device_batch} sequence(s) per batch shard; XLA:CPU memory analysis per device, GiB")
    print(f"{'devices':>7s} {'data':>4s} {'fsdp':>4s} {'tp':>3s} {'remat':>5s} {'batch':>5s} {'weights':>8s} "
          f"{'state':>6s} {'argument':>8s} {'output':>7s} {'temp':>7s} {'total':>7s} {'-upcast':>7s} "
          f"{'w-shaped':>8s} {'16GiB':>5s} {'80GiB':>5s}")
    for r in rows:
        m = r["mesh"]
        print(f"{m['data'] * m['fsdp'] * m['tensor']:7d} {m['data']:4d} {m['fsdp']:4d} {m['tensor']:3d} "
              f"{'on' if r['remat'] else 'off':>5s} {r['global_batch']:5d} {r['weights_per_device_bytes'] / GIB:8.2f} "
              f"{r['state_per_device_bytes'] / GIB:6.2f} {r['argument_bytes'] / GIB:8.2f} "
              f"{r['output_bytes'] / GIB:7.2f} "
              f"{r['temp_bytes'] / GIB:7.2f} {r['total_bytes'] / GIB:7.2f} "
              f"{r['total_without_cpu_upcasts_bytes'] / GIB:7.2f} "
              f"{len(r['stacked_weight_shaped_buffers']):8d} {'yes' if r['fits_16GiB'] else 'no':>5s} "
              f"{'yes' if r['fits_80GiB'] else 'no':>5s}")
    print("total = argument + output - aliased (the donated state) + temp. -upcast: total less XLA:CPU's float32 "
          "copies of the bfloat16 stacked weights (CPU has no bfloat16 matmul; TPU/GPU do not make them); the fit "
          "columns use it. w-shaped: other non-parameter buffers shaped like a whole stacked base weight or its "
          "per-device shard -- a gradient or optimizer moment of a frozen weight would be one; 0 means none exists.")
    for r in rows:
        m = r["mesh"]
        print(f"  data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} remat={'on' if r['remat'] else 'off'}: "
              f"largest temporaries {'; '.join(r['largest_buffers'])}")
    if args.out:
        report = {"settings": vars(args), "model": {"params": cfg.num_params(), "layers": cfg.num_hidden_layers,
                                                    "hidden": cfg.hidden_size, "ffw": cfg.intermediate_size,
                                                    "vocab": cfg.vocab_size},
                  "rows": rows, "jax": jax.__version__,
                  "note": "XLA:CPU buffer assignment of the partitioned program: an estimate for TPU/GPU"}
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
