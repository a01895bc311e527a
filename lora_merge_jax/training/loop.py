"""The training loop behind ``train.py``: set-up, the jitted step, logging, checkpoints, export.

``train(cfg)`` builds the mesh, loads the base model (or makes the embedded tiny one), tokenises the
data, builds the adapter (LoRA, MELoRA, or the adaptive merge of task LoRAs), and runs the step that
``train_step.py`` compiles once. Metrics are fetched one step late so the host never waits for the
device inside the loop; checkpoints are written asynchronously with the data position. SIGTERM saves a
checkpoint and exits cleanly (preemption); a run of non-finite steps saves and stops with a message.
At the end the adapter is exported in PEFT format beside the checkpoints.

Multi-process jobs (``train.distributed``: one process per host, or several on one machine): every process
runs this same code on the same config. Each reads only its rows of every global batch; all write and read
their shards of each checkpoint together; process 0 alone writes ``run_config.yaml``, the embedded model and
task, metrics and the exported adapter (gathered from every process first), the others waiting at barriers.
Every decision that leads to a collective (save, stop, restore) is taken from values all processes share:
the step count, replicated metrics, and SIGTERM, which each process contributes to a small all-process
maximum computed every step and read one step late, so that SIGTERM to any one process makes all of them
save the same step and exit cleanly.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lora_merge_jax import config, tiny
from lora_merge_jax.adapters import common
from lora_merge_jax.adapters.lora import init_lora
from lora_merge_jax.adapters.melora import init_melora
from lora_merge_jax.data import batching, prompts
from lora_merge_jax.io import peft_export
from lora_merge_jax.io import peft_import as peft_io
from lora_merge_jax.io.hf import load_pretrained
from lora_merge_jax.io.peft_import import adapter_dir
from lora_merge_jax.merge import adaptive, pruning
from lora_merge_jax.models.model import Model
from lora_merge_jax.sharding import make_mesh
from lora_merge_jax.training import export, optim, run_dir
from lora_merge_jax.training import step as train_step
from lora_merge_jax.training.checkpoint import (
    Checkpointer,
    abstract_like,
)
from lora_merge_jax.training.config import RunSection, TrainConfig


class TrainingStopped(RuntimeError):
    """The run stopped early (non-finite steps); a checkpoint was saved first."""


@dataclasses.dataclass
class TrainResult:
    """What a finished run produced."""

    state: train_step.TrainState
    model: Model
    output_dir: Path
    adapter_dir: Path
    losses: list[float]
    resumed_from: int | None
    stopped_early: bool = False  # SIGTERM or stop_after ended the run before train.steps


def init_distributed(run: RunSection) -> None:
    """Joins the multi-process job (once per process) when ``train.distributed`` is set: with the explicit
    coordinator fields when given, else auto-detected (Cloud TPU, SLURM, Open MPI...)."""
    if run.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize(**run.distributed_kwargs())


def _barrier(name: str) -> None:
    """Every process waits here for the others (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _check_same_config(cfg: TrainConfig) -> None:
    """Refuses to start when the processes were given different configs (how each is launched aside): they
    would soon wait in different collectives, forever."""
    if jax.process_count() == 1:
        return
    text = yaml.safe_dump(run_dir.without_launch_fields(config.to_dict(cfg)), sort_keys=True)
    digests = multihost_utils.process_allgather(np.uint32(zlib.crc32(text.encode())))
    differ = [i for i, d in enumerate(np.ravel(digests)) if d != digests[0]]
    if differ:
        raise ValueError(f"process(es) {differ} were given a config different from process 0's; every process "
                         "of a job must run with the same config (only train.process_id differs)")


def _embedded_model(run_dir: Path) -> Path:
    """``tiny.embedded_model`` in a job of any number of processes.

    Making the model computes its weights on every device (a collective when there are several processes), so
    every process makes it, each into its own scratch directory; process 0's copy is moved into place.
    """
    path = Path(run_dir) / "embedded" / "model"
    if jax.process_count() == 1:
        return tiny.embedded_model(run_dir)
    missing = not (path / "config.json").exists()
    _barrier("embedded model: looked")  # nobody writes before every process has looked
    if missing:
        scratch = path.with_name(f"model.process{jax.process_index()}")
        shutil.rmtree(scratch, ignore_errors=True)
        tiny.make_tiny_model(scratch)
        _barrier("embedded model: made")
        if jax.process_index() == 0:
            shutil.rmtree(path, ignore_errors=True)
            scratch.rename(path)
        else:
            shutil.rmtree(scratch)
        _barrier("embedded model: in place")
    return path


def embedded_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fills in the embedded tiny model when no model path is set, and its toy task when no data is set."""
    if cfg.model.path is None:
        path = _embedded_model(Path(cfg.output_dir))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path)))
    if cfg.data.train_file is None and cfg.data.hub_name is None:
        if jax.process_index() == 0:
            tiny.embedded_task(cfg.output_dir)  # writes the files on first use
        _barrier("embedded task")  # then the others find them and write nothing
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **tiny.embedded_task(cfg.output_dir)))
    return cfg


def _dtype(name: str | None) -> Any:
    return None if name is None else jnp.dtype(name)


def _cpu_flags() -> frozenset[str] | None:
    """An x86 CPU's instruction-set flags from /proc/cpuinfo; None without that file or its ``flags`` lines
    (other architectures, e.g. ARM's ``Features``, whose bf16 support this does not judge)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split()[2:])
    return flags or None


def bfloat16_cpu_notice(compute_dtype: Any, platform: str, cpu_flags: frozenset[str] | None) -> str | None:
    """A log line when bfloat16 compute will run on a CPU without bfloat16 instructions (AVX2 only), where it
    is slower than float32 (SmolLM2 on an AVX2 EPYC: 1.27x our float32 step; bench/RESULTS.md); else None."""
    if platform != "cpu" or jnp.dtype(compute_dtype) != jnp.bfloat16 or cpu_flags is None:
        return None
    if cpu_flags & {"avx512_bf16", "amx_bf16"}:
        return None
    return ("note: bfloat16 compute on a CPU without bfloat16 instructions (no avx512_bf16 or amx_bf16 in "
            "/proc/cpuinfo) runs slower than float32 here; set model.dtype and model.compute_dtype to float32")


def build_adapter(cfg: TrainConfig, model: Model) -> Any:
    """The adapter at step 0, placed on the model's mesh."""
    a, key = cfg.adapter, train_step.run_keys(cfg.train.seed)["init"]
    if a.kind == "merge":
        # Host copies, merged on the host and placed once below (see peft_io.read_peft_adapter).
        tasks = [peft_io.read_peft_adapter(adapter_dir(p), model.config) for p in cfg.merge.task_adapters]
        adapter = adaptive.merge_for_training(tasks, cfg.merge.granularity, cfg.merge.init_coefficients, a.dropout,
                                              model.config.num_hidden_layers)
    elif a.init_from is not None:
        adapter = peft_io.read_peft_adapter(adapter_dir(a.init_from), model.config).replace(dropout=a.dropout)
    elif a.kind == "melora":
        adapter = init_melora(model.config, key, a.num_blocks, a.rank, a.alpha, a.target_modules, a.layers, a.dropout)
    else:
        adapter = init_lora(model.config, key, a.rank, a.alpha, a.target_modules, a.layers, a.use_rslora,
                            a.rank_pattern, a.alpha_pattern, a.dropout)
    return common.place(adapter, model.config, model.mesh)


def trainable_fields(cfg: TrainConfig) -> tuple[str, ...] | None:
    if cfg.adapter.kind == "merge" and not cfg.merge.train_factors:
        return ("coefficients",)
    return None


def _stack_micro(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """[M, B, T] from M micro-batches, right-padded to their longest length."""
    length = max(b["input_ids"].shape[1] for b in batches)
    pad = lambda x: np.pad(x, ((0, 0), (0, length - x.shape[1])))  # noqa: E731
    return {k: np.stack([pad(b[k]) for b in batches]) for k in batches[0]}


def _global_batch(local: dict[str, np.ndarray], shard: NamedSharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(shard, v) for k, v in local.items()}


def _check_host_rows(shard: NamedSharding, batch_size: int) -> None:
    """Refuses a mesh on which this process's devices do not hold exactly the rows the iterator gives it
    (rows [p * B/P, (p + 1) * B/P) of each global batch), which ``make_array_from_process_local_data``
    would silently misplace. The (data, fsdp, tensor) mesh over ``jax.devices()`` (ordered by process)
    satisfies it whenever the batch axes data x fsdp span the processes."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return
    rows: set[int] = set()
    for idx in shard.addressable_devices_indices_map((1, batch_size, 1)).values():
        rows.update(range(batch_size)[idx[1]])
    per_host = batch_size // count
    if rows != set(range(index * per_host, (index + 1) * per_host)):
        raise ValueError(f"mesh {dict(shard.mesh.shape)}: process {index} of {count} holds batch rows "
                         f"{sorted(rows)} of {batch_size}, but each process reads rows [p * {per_host}, "
                         f"(p + 1) * {per_host}); use a mesh whose data x fsdp axes split the batch across the "
                         "processes (e.g. data = the number of processes or a multiple of it)")


class _StopAgreement:
    """Whether any process received SIGTERM: the maximum, over every device of the mesh, of each process's
    flag; a replicated value that every process reads alike. Dispatched each step (a [num_devices] int32
    array and one tiny jitted reduction) and read one step later, so the host does not wait for it."""

    def __init__(self, mesh: jax.sharding.Mesh):
        self._sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._local = len(self._sharding.addressable_devices)

    def __call__(self, raised: bool) -> jax.Array:
        local = np.full((self._local,), int(raised), np.int32)
        return self._max(jax.make_array_from_process_local_data(self._sharding, local))


def _gather_adapter(adapter: Any) -> Any:
    """The adapter with every array that spans other processes gathered (all processes must call this);
    with one process, the adapter unchanged."""
    if jax.process_count() == 1:
        return adapter
    gather = lambda x: (multihost_utils.process_allgather(x, tiled=True)  # noqa: E731
                        if isinstance(x, jax.Array) and not x.is_fully_addressable else x)
    return jax.tree.map(gather, adapter)


def _on_every_process_log(log):
    """``log`` with lines prefixed by the process index when there are several processes."""
    if jax.process_count() == 1:
        return log
    prefix = f"[process {jax.process_index()}/{jax.process_count()}]"
    return lambda *parts: log(prefix, *parts)


def _scalars(metrics: dict) -> dict[str, Any]:
    """Host values of a step's metrics: floats, and the merge's coefficients and sparsity as nested lists."""
    host = jax.device_get(metrics)
    out = {k: float(v) for k, v in host.items() if k not in ("coefficients", "sparsity")}
    for key in ("coefficients", "sparsity"):
        if key in host:
            out[key] = jax.tree.map(lambda x: np.asarray(x).round(5).tolist(), host[key])
    return out


class _SignalFlag:
    """Records SIGTERM so the loop can save and exit at a step boundary."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self) -> _SignalFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, the default behaviour stays
            self._previous = None
        return self

    def _handle(self, *_: Any) -> None:
        self.raised = True

    def __exit__(self, *_: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(cfg: TrainConfig, resume: str | None = None, force: bool = False, log=print,
          stop_after: int | None = None) -> TrainResult:
    """Runs (or resumes) a training run described by ``cfg``.

    Args:
        cfg: the run's config.
        resume: None (start fresh; refuses a directory that has checkpoints), ``"latest"`` (the latest
            complete checkpoint; an error if it cannot be read) or ``"latest_valid"`` (the latest one that
            restores; the damaged ones after it are moved to ``damaged_checkpoints/``).
        force: resume even though the config differs from the one the run started with.
        log: where progress lines go.
        stop_after: save and stop after this many steps of this invocation (time-sliced jobs); a later
            ``resume="latest"`` continues exactly where it stopped.

    Returns:
        The final state, the model and where the adapter was exported.
    """
    init_distributed(cfg.train)
    log = _on_every_process_log(log)
    _check_same_config(cfg)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():  # before embedded_defaults, which writes under it
        raise FileExistsError(f"output_dir {out}: exists and is not a directory")
    cfg = embedded_defaults(cfg)
    mesh = make_mesh(cfg.mesh)
    log(f"devices: {len(jax.devices())} x {jax.devices()[0].platform} ({jax.process_count()} process(es)); "
        f"mesh {dict(mesh.shape)}")
    model = load_pretrained(cfg.model.path, dtype=_dtype(cfg.model.dtype), mesh=mesh,
                            compute_dtype=_dtype(cfg.model.compute_dtype))
    if model.tokenizer is None:
        raise ValueError(f"{cfg.model.path}: no tokenizer files; training needs the model's tokenizer")
    notice = bfloat16_cpu_notice(model.activation_dtype, jax.default_backend(), _cpu_flags())
    if notice:
        log(notice)
    examples, stats = prompts.build_train_examples(cfg.data, model.tokenizer)
    log(f"data: {stats}")
    iterator = batching.TrainIterator(examples, cfg.data, prompts.pad_token_id(model.tokenizer),
                                      process_index=jax.process_index(), process_count=jax.process_count())

    adapter = build_adapter(cfg, model)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
    post_update, extra = None, None
    if cfg.adapter.kind == "merge" and cfg.merge.pruning.enabled:
        post_update = pruning.make_post_update(cfg.merge.pruning, cfg.train.steps, model.config.num_hidden_layers)
        extra = pruning.init_statistics(cfg.merge.pruning, adapter)
    state = train_step.init_state(adapter, tx, cfg.train.seed, trainable_fields(cfg), extra)
    log(f"adapter: {type(adapter).__name__}, {common.num_params(adapter, trainable_fields(cfg)):,} trainable "
        f"parameters; base model {model.config.num_params():,} parameters (frozen)")
    step_fn = train_step.make_train_step(model.config, tx, compute_dtype=model.compute_dtype,
                                         remat=cfg.train.remat, post_update=post_update,
                                         max_target_tokens=iterator.max_target_tokens)
    train_fn = train_step.jit_train_step(step_fn, state, model.weights, model.config, mesh, cfg.data.batch_size)
    _check_host_rows(train_fn.batch_sharding, cfg.data.batch_size)

    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out / "checkpoints", cfg.train.keep_checkpoints, cfg.train.async_checkpoints)
    resumed_from = None
    if resume is None and ckpt.latest_step() is not None:
        ckpt.close()
        raise FileExistsError(f"{out / 'checkpoints'}: holds checkpoints of an earlier run; pass --resume to continue "
                              "it or choose another output_dir")
    try:
        write_config = run_dir.check_run_config(out, cfg, force)
        if resume is not None and ckpt.latest_step() is not None:
            abstract = abstract_like(state, train_fn.state_shardings)
            state, position, resumed_from = run_dir.restore(ckpt, abstract, resume, log)
            iterator.restore(position)
            log(f"resumed from step {resumed_from} ({ckpt.directory / str(resumed_from)})")
        elif resume is not None:
            log(f"--resume: no checkpoint in {ckpt.directory}; starting from step 0")
    except BaseException:
        ckpt.close()  # a refused or failed resume leaves run_config.yaml and the checkpoints as they were
        raise
    if write_config and jax.process_index() == 0:
        run_dir.write_run_config(out, cfg)
    _barrier("run config written")
    # Placed as the step returns it, so that its first and later calls share one compiled program.
    state = jax.device_put(state, train_fn.state_shardings)

    result = _loop(cfg, state, train_fn, iterator, ckpt, out, log, stop_after)
    state, losses, stopped = result
    ckpt.close()
    exported = out / "adapter"
    adapter = _gather_adapter(state.adapter)
    if jax.process_index() == 0:
        peft_export.save_peft_adapter(adapter, exported, model)
        if cfg.adapter.kind == "merge":
            export.write_merge_outputs(adapter, model, out, cfg.merge.export_rank, log)
    _barrier("adapter exported")  # when train() returns, on any process, the files are there
    log(f"adapter written to {exported} (PEFT format)")
    return TrainResult(state, model, out, exported, losses, resumed_from, stopped)


def _loop(cfg: TrainConfig, state: train_step.TrainState, train_fn: Any, iterator: batching.TrainIterator,
          ckpt: Checkpointer, out: Path, log, stop_after: int | None = None
          ) -> tuple[train_step.TrainState, list[float], bool]:
    from tqdm.auto import tqdm

    from lora_merge_jax.training.metrics_log import MetricsLog

    run = cfg.train
    start = int(jax.device_get(state.step))
    losses: list[float] = []
    metrics_log = MetricsLog(out, enabled=jax.process_index() == 0)
    bar = tqdm(total=run.steps, initial=start, disable=not run.progress or jax.process_index() != 0,
               dynamic_ncols=True, desc="train")
    # With several processes, SIGTERM is acted on once every process knows of it: see _StopAgreement.
    agree = _StopAgreement(train_fn.batch_sharding.mesh) if jax.process_count() > 1 else None
    pending: tuple[int, Any, int, Any] | None = None
    tokens_seen, t0, stopped, too_many_nonfinite, preempted = 0, time.perf_counter(), False, False, False

    def drain(item: tuple[int, Any, int, Any]) -> None:
        nonlocal tokens_seen, too_many_nonfinite, preempted
        step, metrics, tokens, anyone_raised = item
        log_step = metrics_log.enabled and (step % run.log_every == 0 or step == run.steps)
        scalars = _scalars(metrics) if log_step else None
        loss = float(jax.device_get(metrics["loss"]))
        losses.append(loss)
        tokens_seen += tokens
        rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
        if scalars is not None:
            metrics_log.write(step, {**scalars, "tokens_per_second": rate})
        if not bool(jax.device_get(metrics["finite"])):
            log(f"step {step}: non-finite loss or gradient, update skipped")
            too_many_nonfinite = int(jax.device_get(metrics["skipped_in_a_row"])) >= run.max_nonfinite_in_a_row
        if anyone_raised is not None:
            preempted = preempted or bool(jax.device_get(anyone_raised))

    with _SignalFlag() as sigterm:
        step = start
        while step < run.steps:
            micro = [next(iterator) for _ in range(run.grad_accum)]
            batch = _global_batch(_stack_micro(micro), train_fn.batch_sharding)
            state, metrics = train_fn(state, batch)
            anyone_raised = agree(sigterm.raised) if agree is not None else None
            step += 1
            if pending is not None:
                drain(pending)  # read the previous step's metrics: this step is already dispatched
            pending = (step, metrics, int(sum(b["attention_mask"].sum() for b in micro)), anyone_raised)
            if agree is None:
                preempted = sigterm.raised
            bar.update(1)
            pause = stop_after is not None and step - start >= stop_after
            if (step % run.save_every == 0 or step == run.steps or preempted or pause
                    or too_many_nonfinite):
                ckpt.save(step, state, iterator.state(), force=True)
            if too_many_nonfinite:
                ckpt.close()
                bar.close()
                metrics_log.close()
                raise TrainingStopped(
                    f"stopped: {run.max_nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                    f"(limit train.max_nonfinite_in_a_row) and were skipped; checkpoint saved at step {step} in "
                    f"{ckpt.directory} (its adapter is the last finite one). Check the data, the learning rate "
                    "and the base weights, then resume")
            if preempted or pause:
                cause = "stop_after" if not preempted else "SIGTERM" if sigterm.raised else "SIGTERM to another process"
                log(f"{cause}: checkpoint saved at step {step}; exiting")
                stopped = True
                break
        if pending is not None:
            drain(pending)
    bar.close()
    metrics_log.close()
    return state, losses, stopped
