"""The embedded default job (``python train.py`` / ``python eval.py`` with no arguments) end to end.

The real default job runs on its fixed seed in subprocesses, exactly as a user runs it (one CPU device, XLA's
default flags), so the README's table comes from the same computation. (Backend optimisation off, as
``test_trainer.py`` runs its subprocesses, compiles faster but runs the job's 1,100 steps slower: slower in
all.) The adaptive merge must beat the LoRA from scratch and the static merge on the target's reference loss;
``eval.py``'s report names the four systems; a second run reuses the cached source LoRAs. One test holds it
all, because pytest-xdist would run a module-scoped fixture once per worker.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from lora_merge_jax import default_job
from lora_merge_jax.default_job import DefaultJob
from lora_merge_jax.training import run_dir as run_dir_lib

REPO = Path(__file__).resolve().parent.parent
RUN_DEFAULT = "from lora_merge_jax.default_job import run_default; run_default(progress=False)"


def _run(cwd: Path, *args: str) -> str:
    """``python args...`` in ``cwd`` on one CPU device with XLA's default flags; its output (it must succeed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_default_job_end_to_end(tmp_path):
    run = tmp_path / default_job.DEFAULT_RUN_DIR
    # `python train.py` with no arguments runs this (see train.py).
    text = _run(tmp_path, "-c", RUN_DEFAULT)
    for i, task in enumerate(DefaultJob().sources, start=2):
        assert f"[{i}/6] training source LoRA '{task}' (300 steps" in text, text
    assert "[5/6] adaptive merge with pruning" in text, text
    for line, path in (("merged PEFT adapter: ", "adapter"), ("plot of the coefficients and sparsity over training: ",
                                                               "merge_training.png"), ("metrics: ", "metrics.jsonl")):
        assert f"{line}{default_job.DEFAULT_RUN_DIR / path}" in text, text  # it says where the outputs are
        assert (run / path).exists()
    assert (run / "adapter_compact" / "adapter_config.json").exists()
    records = [json.loads(line) for line in run.joinpath("metrics.jsonl").read_text().splitlines()]
    sparsity = records[-1]["sparsity"]
    assert all(abs(sum(v) / len(v) - 0.5) < 0.01 for v in sparsity.values()), sparsity

    # `python eval.py` with no arguments (short generations: the reference loss does not depend on them).
    text = _run(tmp_path, str(REPO / "eval.py"), "--set", "generation.max_new_tokens=8")
    scores = json.loads((run / "eval" / "scores.json").read_text())
    loss = {name: s["reference_loss"] for name, s in scores.items()}
    assert list(loss) == list(default_job.SYSTEMS)
    assert loss["adaptive_merge"] < loss["lora_scratch"], loss
    assert loss["adaptive_merge"] < loss["static_merge"], loss
    assert max(loss["lora_scratch"], loss["static_merge"]) < loss["base"], loss
    report = (run / "eval" / "report.md").read_text()
    table = report.split("## The adaptive merge over training")[0]
    for name in default_job.SYSTEMS:
        assert f"| {name} | {loss[name]:.4f} |" in table and f"| {name} | {loss[name]:.4f} |" in text
    assert "| 0 | - | 0.333 | 0.333 | 0.333 | 0% |" in report  # the merge starts as the static merge
    assert "| 100 |" in report and "| 50% |" in report
    assert "![merge coefficients and sparsity over training](../merge_training.png)" in report

    # A second run: the sources come from the cache. (Its merge is shortened to keep the test short: the
    # sources' configs are unchanged, the LoRA from scratch's is not, so that one is trained again.)
    adapters = {t: run / "sources" / t / "adapter" / "adapter_model.safetensors" for t in DefaultJob().sources}
    mtimes = {t: path.stat().st_mtime_ns for t, path in adapters.items()}
    short = ("from lora_merge_jax.default_job import DefaultJob, run_default; "
             "run_default(job=DefaultJob(target_steps=4), progress=False)")
    text = _run(tmp_path, "-c", short)
    assert "training source LoRA" not in text, text
    for task, path in adapters.items():
        assert f"source LoRA '{task}': cached in {default_job.DEFAULT_RUN_DIR / 'sources' / task}" in text, text
        assert path.stat().st_mtime_ns == mtimes[task]
    assert "LoRA from scratch: cached" not in text, text
    again = [json.loads(line) for line in run.joinpath("metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4]  # the earlier run's metrics replaced, not appended to


def test_a_source_is_reused_only_with_the_same_config(tmp_path):
    job = DefaultJob()
    cfg = default_job.source_config(tmp_path, job, "sort", progress=False)
    assert not default_job.is_cached(cfg)  # nothing there yet
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    run_dir_lib.write_run_config(out, cfg)
    (out / "adapter").mkdir()
    assert not default_job.is_cached(cfg)  # a run cut short: no exported adapter
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    assert default_job.is_cached(cfg)
    assert default_job.is_cached(default_job.source_config(tmp_path, job, "sort", progress=True))  # display only
    other = dataclasses.replace(job, source_learning_rate=job.source_learning_rate / 2)
    assert not default_job.is_cached(default_job.source_config(tmp_path, other, "sort"))
    assert not default_job.is_cached(default_job.source_config(tmp_path, job, "rotate"))


def test_eval_without_the_default_job_says_to_run_train_first(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    done = subprocess.run([sys.executable, str(REPO / "eval.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "run `python train.py` first" in done.stderr
    assert not (tmp_path / "runs" / "default" / "embedded" / "model").exists()  # nothing made for nothing
