"""The embedded default job: the adaptive LoRA merge with pruning, in miniature, with nothing to prepare.

``python train.py`` with no arguments runs ``run_default()``; ``python eval.py`` with no arguments then runs
``evaluate_default()``. Everything is made here and is deterministic (no download):

1. the embedded tiny model (``tiny.embedded_model``) and toy tasks (``tiny.TOY_TASKS``): three *source* tasks,
   word-level transformations of a list of words (``reverse``, ``sort``, ``rotate``), and a low-resource
   *target* that composes two of them (``sort_descending``: sort, then reverse) with only 32 training
   examples;
2. one LoRA per source task, trained on 512 examples on first use and cached in ``sources/<task>/`` (a later
   run reuses it while its resolved config is unchanged);
3. the adaptive merge of the source LoRAs on the target's 32 examples: merge coefficients and LoRA factors
   fine-tuned, half of the LoRA parameters pruned along the way. It writes the run directory itself:
   ``adapter/`` (PEFT), ``adapter_compact/``, ``merge_training.png``, ``metrics.jsonl``;
4. the baselines that ``eval.py`` compares it with, in ``baselines/``: a LoRA trained from scratch on the same
   32 examples for the same number of steps (cached like the sources), and the static merge (the source
   LoRAs summed with weights 1/K, exactly: the adaptive merge's starting point).

``evaluate_default()`` scores the base model and the three systems on the target's dev split (generation
metrics and the reference summaries' per-token loss) and writes ``eval/report.md``: the table, the
coefficients and sparsity over training, and the plot.

Compiling dominates the cost of so small a model, so XLA's persistent compilation cache is kept in
``compile_cache/`` (unless one is configured already): the three source LoRAs share one compiled train step,
and a second run, or a second evaluation, compiles almost nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from lora_merge_jax import config, tiny
from lora_merge_jax.evaluation.evaluate import EvalConfig
from lora_merge_jax.io.files import write_text_atomic
from lora_merge_jax.training.config import TrainConfig

DEFAULT_RUN_DIR = tiny.DEFAULT_RUN_DIR
SYSTEMS = ("base", "lora_scratch", "static_merge", "adaptive_merge")  # the rows of eval.py's report
# What the merge run writes into the run directory: removed before the merge runs again.
_MERGE_OUTPUTS = ("checkpoints", "damaged_checkpoints", "tensorboard", "adapter", "adapter_compact",
                  "metrics.jsonl", "merge_training.png", "run_config.yaml")


@dataclasses.dataclass(frozen=True)
class DefaultJob:
    """Sizes, steps and learning rates of the miniature (chosen so that it runs in a few CPU minutes)."""

    sources: tuple[str, ...] = ("reverse", "sort", "rotate")  # source tasks (names of tiny.TOY_TASKS)
    target: str = "sort_descending"  # the low-resource target task
    source_examples: int = 512  # training examples of each source task
    target_examples: int = 32  # training examples of the target: the merge and the LoRA from scratch see these
    dev_examples: int = 64  # the target's dev split (what eval.py scores)
    source_steps: int = 300  # optimizer steps of each source LoRA
    target_steps: int = 100  # optimizer steps of the adaptive merge and of the LoRA from scratch
    rank: int = 8  # LoRA rank of the sources and of the LoRA from scratch (alpha = 2 * rank)
    source_learning_rate: float = 5e-3
    # Learning rates picked on the target's dev split (reference loss, seeds 0-2): the from-scratch LoRA's best
    # of {5e-3, 1e-2, 2e-2, 5e-2} (5e-2 diverges), the merge's best of a few around these.
    scratch_learning_rate: float = 2e-2
    merge_learning_rate: float = 1e-3  # the merge's LoRA factors
    coefficient_learning_rate: float = 5e-2  # the merge coefficients
    final_sparsity: float = 0.5  # fraction of the merged LoRA parameters pruned by the end
    batch_size: int = 8
    seed: int = 0  # adapter initialisation and data order (the task files are fixed)

    def __post_init__(self) -> None:
        for task in (*self.sources, self.target):
            if task not in tiny.TOY_TASKS:
                raise ValueError(f"unknown toy task {task!r}; choose among {', '.join(tiny.TOY_TASKS)}")
        if self.target in self.sources:
            raise ValueError(f"the target {self.target!r} is also a source")


@dataclasses.dataclass
class DefaultRun:
    """Where ``run_default`` put things, and what it did."""

    run_dir: Path
    model: Path  # the embedded base model
    sources: dict[str, Path]  # source task -> its run directory (adapter/ inside)
    trained_sources: list[str]  # the sources trained by this call (the others came from the cache)
    lora_scratch: Path  # run directory of the LoRA from scratch
    static_merge: Path  # PEFT directory of the static merge
    adapter: Path  # the adaptive merge, PEFT format
    adapter_compact: Path  # the same with pruned components dropped
    plot: Path  # coefficients and sparsity over training
    metrics: Path  # metrics.jsonl of the merge run
    merge_losses: list[float]  # the merge's training loss at every step


# ------------------------------------------------------------------------------------------------ configs


def model_path(run_dir: str | Path = DEFAULT_RUN_DIR) -> Path:
    """Where the embedded tiny model is under ``run_dir`` (``run_default`` writes it there on first use)."""
    return Path(run_dir) / "embedded" / "model"


def task_data(run_dir: str | Path, job: DefaultJob, task: str) -> dict[str, Any]:
    """``DataConfig`` fields of one of the job's tasks (its files written on first use)."""
    size = job.target_examples if task == job.target else job.source_examples
    fields = tiny.toy_task(run_dir, task, size, job.dev_examples)
    return {**fields, "batch_size": job.batch_size, "max_eval_examples": job.dev_examples}


def _train_config(out: Path, model: Path, data: dict[str, Any], adapter: dict[str, Any], steps: int,
                  optim: dict[str, Any], job: DefaultJob, merge: dict[str, Any] | None = None,
                  progress: bool = True) -> TrainConfig:
    values = {
        "output_dir": str(out), "model": {"path": str(model)}, "adapter": adapter, "merge": merge or {},
        "data": data, "optim": optim,
        "train": {"steps": steps, "seed": job.seed, "save_every": steps, "keep_checkpoints": 1,
                  "log_every": max(steps // 20, 1), "async_checkpoints": False, "progress": progress},
    }
    return config.from_dict(TrainConfig, values)


def _lora(job: DefaultJob) -> dict[str, Any]:
    return {"kind": "lora", "rank": job.rank, "alpha": 2.0 * job.rank}


def source_config(run_dir: str | Path, job: DefaultJob, task: str, progress: bool = True) -> TrainConfig:
    """The run that trains source task ``task``'s LoRA (in ``sources/<task>/``)."""
    run_dir = Path(run_dir)
    return _train_config(run_dir / "sources" / task, model_path(run_dir), task_data(run_dir, job, task), _lora(job),
                         job.source_steps, {"learning_rate": job.source_learning_rate}, job, progress=progress)


def scratch_config(run_dir: str | Path, job: DefaultJob, progress: bool = True) -> TrainConfig:
    """The baseline: a LoRA trained from scratch on the target's few examples (in ``baselines/lora_scratch/``)."""
    run_dir = Path(run_dir)
    return _train_config(run_dir / "baselines" / "lora_scratch", model_path(run_dir),
                         task_data(run_dir, job, job.target), _lora(job), job.target_steps,
                         {"learning_rate": job.scratch_learning_rate}, job, progress=progress)


def merge_config(run_dir: str | Path, job: DefaultJob, progress: bool = True) -> TrainConfig:
    """The main job: the adaptive merge with pruning of the source LoRAs on the target (in ``run_dir``)."""
    run_dir = Path(run_dir)
    merge = {"task_adapters": [str(run_dir / "sources" / task) for task in job.sources],
             "pruning": {"enabled": True, "final_sparsity": job.final_sparsity}}
    optim = {"learning_rate": job.merge_learning_rate, "coefficient_learning_rate": job.coefficient_learning_rate}
    return _train_config(run_dir, model_path(run_dir), task_data(run_dir, job, job.target), {"kind": "merge"},
                         job.target_steps, optim, job, merge=merge, progress=progress)


def _comparable(values: dict[str, Any]) -> dict[str, Any]:
    """A resolved config without what says where things are or how they are shown (a moved run directory,
    or a run without progress bars, still reuses its cache)."""
    values = json.loads(json.dumps(values))  # a deep copy
    values.pop("output_dir", None)
    for section, key in (("model", "path"), ("data", "data_dir"), ("train", "progress")):
        values.get(section, {}).pop(key, None)
    return values


def is_cached(cfg: TrainConfig) -> bool:
    """Whether ``cfg.output_dir`` holds a finished run (its exported adapter) of the same resolved config."""
    out = Path(cfg.output_dir)
    saved = out / "run_config.yaml"
    if not (out / "adapter" / "adapter_model.safetensors").exists() or not saved.exists():
        return False
    return _comparable(yaml.safe_load(saved.read_text()) or {}) == _comparable(config.to_dict(cfg))


# ----------------------------------------------------------------------------------------- environment


@contextlib.contextmanager
def compilation_cache(directory: str | Path) -> Iterator[None]:
    """XLA's persistent compilation cache in ``directory`` while the block runs, unless one is configured
    already (``JAX_COMPILATION_CACHE_DIR``); the previous setting is restored afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir:
        yield
        return
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()  # (re)opens the cache at its next use, even if this process has compiled before
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
        cc.reset_cache()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No 'Generating data split' bar from ``datasets`` for each small JSON Lines file read."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------- training


def run_default(run_dir: str | Path = DEFAULT_RUN_DIR, job: DefaultJob = DefaultJob(), log: Callable = print,
                progress: bool = True) -> DefaultRun:
    """Runs the embedded default job (see the module docstring) in ``run_dir``, saying what it does.

    Source LoRAs and the from-scratch LoRA found in ``run_dir`` with the same resolved config are reused; the
    static and adaptive merges run every time (the merge run's earlier outputs in ``run_dir`` are replaced).
    """
    from lora_merge_jax.training.loop import train

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir}: exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    total = len(job.sources) + 3
    stage = iter(range(1, total + 1))

    def sub(*parts: Any) -> None:  # train()'s own lines, indented under the stage
        log("     ", *parts)

    t0 = time.perf_counter()
    with compilation_cache(run_dir / "compile_cache"), _quiet_datasets():
        log(f"[{next(stage)}/{total}] embedded tiny model and toy tasks: sources {', '.join(job.sources)} "
            f"({job.source_examples} examples each), target {job.target} ({job.target_examples} training "
            f"examples, {job.dev_examples} dev) in {run_dir / 'embedded'}")
        model = tiny.embedded_model(run_dir)
        for task in (*job.sources, job.target):
            task_data(run_dir, job, task)

        trained = []
        for task in job.sources:
            cfg = source_config(run_dir, job, task, progress)
            where = Path(cfg.output_dir)
            if is_cached(cfg):
                log(f"[{next(stage)}/{total}] source LoRA '{task}': cached in {where}")
                continue
            log(f"[{next(stage)}/{total}] training source LoRA '{task}' ({job.source_steps} steps on "
                f"{job.source_examples} examples) -> {where}")
            shutil.rmtree(where, ignore_errors=True)  # a run of another config, or one cut short
            result = train(cfg, log=sub)
            sub(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
            trained.append(task)

        log(f"[{next(stage)}/{total}] adaptive merge with pruning of the {len(job.sources)} source LoRAs on the "
            f"target's {job.target_examples} examples ({job.target_steps} steps, {job.final_sparsity:.0%} of the "
            f"LoRA parameters pruned) -> {run_dir}")
        for name in _MERGE_OUTPUTS:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        merged = train(merge_config(run_dir, job, progress), log=sub)
        history = merge_history(run_dir / "metrics.jsonl", len(job.sources))
        # train()'s plot, redrawn with the tasks' names and the sparsity over training
        plot_history(history, job.sources, job.final_sparsity, run_dir / "merge_training.png")
        coefficients = ", ".join(f"{t} {c:.2f}" for t, c in zip(job.sources, history.coefficients[-1]))
        sub(f"loss {merged.losses[0]:.3f} -> {merged.losses[-1]:.3f}; coefficients {coefficients} (from "
            f"{1 / len(job.sources):.2f}); {history.sparsity[-1]:.0%} of the LoRA parameters pruned")

        log(f"[{next(stage)}/{total}] baselines for eval.py: a LoRA from scratch on the same "
            f"{job.target_examples} examples ({job.target_steps} steps), and the static merge")
        scratch = scratch_config(run_dir, job, progress)
        if is_cached(scratch):
            sub(f"LoRA from scratch: cached in {scratch.output_dir}")
        else:
            shutil.rmtree(scratch.output_dir, ignore_errors=True)
            result = train(scratch, log=sub)
            sub(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
        static = write_static_merge(run_dir, job, merged.model)
        sub(f"static merge (weights 1/{len(job.sources)}, exact): {static}")

        log(f"done in {time.perf_counter() - t0:.0f} s")
    done = DefaultRun(
        run_dir=run_dir, model=model, sources={t: run_dir / "sources" / t for t in job.sources},
        trained_sources=trained, lora_scratch=Path(scratch.output_dir), static_merge=static,
        adapter=run_dir / "adapter", adapter_compact=run_dir / "adapter_compact",
        plot=run_dir / "merge_training.png", metrics=run_dir / "metrics.jsonl", merge_losses=merged.losses)
    log(f"merged PEFT adapter: {done.adapter} (pruned components dropped: {done.adapter_compact})")
    log(f"plot of the coefficients and sparsity over training: {done.plot}")
    log(f"metrics: {done.metrics}")
    log("next: `python eval.py` compares it with the base model, the LoRA from scratch and the static merge")
    return done


def write_static_merge(run_dir: str | Path, job: DefaultJob, model: Any) -> Path:
    """The source LoRAs summed with weights 1/K (``merge_adapters(..., "cat")``: exact), as a PEFT directory in
    ``baselines/static_merge/``; it is where the adaptive merge starts (its coefficients start at 1/K)."""
    from lora_merge_jax.io import peft_export
    from lora_merge_jax.io import peft_import as peft_io
    from lora_merge_jax.merge import static

    run_dir = Path(run_dir)
    loras = [peft_io.load_peft_adapter(peft_io.adapter_dir(run_dir / "sources" / t), model) for t in job.sources]
    merged = static.merge_adapters(loras, [1.0 / len(loras)] * len(loras), "cat")
    return peft_export.save_peft_adapter(merged, run_dir / "baselines" / "static_merge", model)


# ------------------------------------------------------------------------------------------- evaluation


def system_paths(run_dir: str | Path = DEFAULT_RUN_DIR) -> dict[str, Path | None]:
    """The systems ``eval.py`` compares by default: name -> adapter (None for the base model)."""
    run_dir = Path(run_dir)
    return {"base": None, "lora_scratch": run_dir / "baselines" / "lora_scratch",
            "static_merge": run_dir / "baselines" / "static_merge", "adaptive_merge": run_dir}


def eval_overrides(run_dir: str | Path = DEFAULT_RUN_DIR, job: DefaultJob = DefaultJob()) -> list[str]:
    """``--set`` items of the default evaluation: the four systems on the target's dev split."""
    run_dir = Path(run_dir)
    data = task_data(run_dir, job, job.target)
    adapters = ", ".join(f"{{name: {name}, path: {json.dumps(None if p is None else str(p))}}}"
                         for name, p in system_paths(run_dir).items())
    return ([f"output_dir={json.dumps(str(run_dir / 'eval'))}", f"model_path={json.dumps(str(model_path(run_dir)))}"]
            + [f"data.{key}={json.dumps(value)}" for key, value in data.items()]
            + ["generation.max_new_tokens=40", "generation.batch_size=32", "metrics.reference_loss=true",
               f"adapters=[{adapters}]"])


def eval_config(overrides: Sequence[str] = (), run_dir: str | Path = DEFAULT_RUN_DIR,
                job: DefaultJob = DefaultJob()) -> EvalConfig:
    """The default evaluation's config, with the user's ``--set`` items applied on top."""
    return config.load_config(EvalConfig, None, eval_overrides(run_dir, job) + list(overrides))


def compares_the_job(cfg: EvalConfig, run_dir: str | Path = DEFAULT_RUN_DIR) -> bool:
    """Whether ``cfg`` evaluates the default job's base model and systems (``--set`` may change the rest)."""
    systems = [(name, None if path is None else str(path)) for name, path in system_paths(run_dir).items()]
    return cfg.model_path == str(model_path(run_dir)) and [(a.name, a.path) for a in cfg.adapters] == systems


def evaluate_default(cfg: EvalConfig | None = None, run_dir: str | Path = DEFAULT_RUN_DIR,
                     job: DefaultJob = DefaultJob(), log: Callable = print, progress: bool = True) -> dict[str, Any]:
    """Evaluates the default job's systems (``eval_config``), prints the table and writes ``report.md``: the
    table, the merge's coefficients and sparsity over training, and its plot. A config whose model or systems
    were changed with ``--set`` is evaluated as given, with ``evaluate``'s own report. Returns {system: scores}.
    """
    from lora_merge_jax.evaluation.evaluate import evaluate

    run_dir = Path(run_dir)
    cfg = cfg or eval_config(run_dir=run_dir, job=job)
    ours = compares_the_job(cfg, run_dir)
    if ours:
        paths = [cfg.model_path] + [a.path for a in cfg.adapters if a.path is not None]
        missing = [path for path in paths if not Path(path).exists()]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)}: not there; run `python train.py` first (the default "
                                    "job trains what this compares)")
    with compilation_cache(run_dir / "compile_cache"), _quiet_datasets():
        results = evaluate(cfg, log=log, progress=progress)
    report = Path(cfg.output_dir) / "report.md"
    if ours:
        write_text_atomic(report, markdown_report(results, cfg, run_dir, job))
    log("")
    log(results_table(results))
    log(f"\nreport: {report}")
    return results


def results_table(results: dict[str, Any]) -> str:
    """The comparison as a Markdown table: reference loss (lower is better), then ROUGE and BLEU."""
    rows = ["| system | reference loss | ROUGE-1 | ROUGE-L | BLEU |", "|---|---|---|---|---|"]
    for name, r in results.items():
        loss = f"{r['reference_loss']:.4f}" if "reference_loss" in r else "-"
        rows.append(f"| {name} | {loss} | {r['rouge1']:.2f} | {r['rougeL']:.2f} | {r['bleu']:.2f} |")
    return "\n".join(rows)


@dataclasses.dataclass
class MergeHistory:
    """The merge run's logged steps, from its ``metrics.jsonl``, with step 0 (the static merge) first."""

    steps: list[int]
    losses: list[float | None]  # training loss (None at step 0)
    coefficients: list[list[float]]  # [step][task], mean over layers (and modules)
    sparsity: list[float]  # pruned fraction of the LoRA parameters, mean over modules and layers


def merge_history(metrics_file: str | Path, num_tasks: int) -> MergeHistory:
    """The coefficients and sparsity logged by a merge run of ``num_tasks`` task LoRAs whose coefficients
    started at 1/K (``merge.init_coefficients`` unset)."""
    import numpy as np

    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    history = MergeHistory([0], [None], [[1.0 / num_tasks] * num_tasks], [0.0])  # merge.init_coefficients: 1/K
    for r in records:
        if "coefficients" not in r:
            continue
        c = r["coefficients"]
        c = np.stack([np.asarray(v, np.float64) for v in c.values()]) if isinstance(c, dict) else np.asarray(c)
        history.steps.append(r["step"])
        history.losses.append(r.get("loss"))
        history.coefficients.append(c.reshape(-1, c.shape[-1]).mean(axis=0).tolist())
        sparsity = [float(np.mean(v)) for v in r.get("sparsity", {}).values()]
        history.sparsity.append(float(np.mean(sparsity)) if sparsity else 0.0)
    return history


def training_table(history: MergeHistory, sources: Sequence[str], rows: int = 7) -> str:
    """Coefficients and sparsity at ``rows`` evenly spread logged steps, as a Markdown table."""
    picks = sorted({round(i * (len(history.steps) - 1) / (rows - 1)) for i in range(rows)})
    lines = ["| step | loss | " + " | ".join(f"c({t})" for t in sources) + " | sparsity |",
             "|" + "---|" * (len(sources) + 3)]
    for i in picks:
        loss = "-" if history.losses[i] is None else f"{history.losses[i]:.3f}"
        lines.append(f"| {history.steps[i]} | {loss} | " + " | ".join(f"{c:.3f}" for c in history.coefficients[i])
                     + f" | {history.sparsity[i]:.0%} |")
    return "\n".join(lines)


def plot_history(history: MergeHistory, sources: Sequence[str], final_sparsity: float, png: str | Path) -> Path:
    """The merge coefficients of the named source tasks, and the pruned fraction, over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, task in enumerate(sources):
        left.plot(history.steps, [c[k] for c in history.coefficients], marker=".", label=task)
    left.set(xlabel="step", ylabel="merge coefficient (mean over layers)",
             title="Merge coefficients (step 0: the static merge)")
    left.legend(title="source task")
    right.plot(history.steps, history.sparsity, marker=".", color="tab:red", label="pruned")
    right.axhline(final_sparsity, color="gray", linestyle="--", linewidth=1, label="final sparsity")
    right.set(xlabel="step", ylabel="fraction of the LoRA parameters", title="Sparsity", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def markdown_report(results: dict[str, Any], cfg: EvalConfig, run_dir: str | Path = DEFAULT_RUN_DIR,
                    job: DefaultJob = DefaultJob()) -> str:
    """``report.md`` of the default evaluation."""
    from lora_merge_jax.evaluation import evaluate as evaluation

    run_dir, out = Path(run_dir), Path(cfg.output_dir)
    k = len(job.sources)
    examples = next(iter(results.values()))["num_examples"]
    parts = [
        f"# The adaptive LoRA merge with pruning, in miniature: target `{job.target}`\n",
        (f"Source LoRAs trained on {', '.join(f'`{t}`' for t in job.sources)}, merged for the low-resource target "
         f"`{job.target}` ({job.target_examples} training examples). Scores on the target's dev split ({examples} "
         "examples): the reference loss is the per-token negative log-likelihood of the reference outputs (lower "
         "is better); ROUGE and BLEU score greedy outputs.\n"),
        results_table(results) + "\n",
        "- `base`: the embedded tiny model (random weights), no adapter.",
        (f"- `lora_scratch`: a rank-{job.rank} LoRA trained from scratch on the target's {job.target_examples} "
         f"training examples, {job.target_steps} steps."),
        (f"- `static_merge`: the {k} source LoRAs ({', '.join(job.sources)}; {job.source_steps} steps on "
         f"{job.source_examples} examples each) summed with weights 1/{k}, untrained: where the adaptive merge "
         "starts."),
        (f"- `adaptive_merge`: the merge coefficients and the LoRA factors fine-tuned on the same "
         f"{job.target_examples} examples for {job.target_steps} steps, {job.final_sparsity:.0%} of the LoRA "
         "parameters pruned on the way (Miyano & Arase 2025).\n"),
    ]
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():
        history = merge_history(metrics_file, len(job.sources))
        parts += ["## The adaptive merge over training\n", training_table(history, job.sources) + "\n"]
    plot = run_dir / "merge_training.png"
    if plot.exists():
        link = Path(os.path.relpath(plot.resolve(), out.resolve())).as_posix()
        parts.append(f"![merge coefficients and sparsity over training]({link})\n")
    parts += ["## All scores\n", evaluation.markdown_report(results, cfg).split("\n", 2)[2]]
    return "\n".join(parts)
