"""What a run guarantees when things go wrong: determinism, damaged and incomplete checkpoints, non-finite
steps, SIGKILL of an adaptive-merge run with asynchronous checkpoints, and never executing checkpoint code.

SIGTERM, a LoRA run killed with SIGKILL and the refusal of existing checkpoints are in test_trainer.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from lora_merge_jax import config, tiny
from lora_merge_jax.adapters.lora import init_lora
from lora_merge_jax.io.hf import load_pretrained
from lora_merge_jax.io.peft_export import save_peft_adapter
from lora_merge_jax.io.peft_import import load_peft_adapter
from lora_merge_jax.io.safetensors import SafetensorsFile, write_safetensors
from lora_merge_jax.models.config import PROJECTIONS
from lora_merge_jax.training.checkpoint import Checkpointer, CheckpointError
from lora_merge_jax.training.config import TrainConfig
from lora_merge_jax.training.loop import train
from tests.train_helpers import tiny_train_config

REPO = Path(__file__).resolve().parent.parent
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny model and task, shared by every run here (so run directories can be copied and resumed)."""
    root = tmp_path_factory.mktemp("reliability")
    tiny.make_tiny_model(root / "model")
    tiny.make_tiny_task(root / "task", train_size=64, dev_size=4)
    return root


def base_sets(base: Path) -> list[str]:
    return [f"model.path={base / 'model'}", f"data.data_dir={base / 'task'}", "data.train_file=train.jsonl",
            "data.prompt_template='Reverse: {input}\n'", "data.max_length=96", "data.max_target_length=48",
            "data.length_buckets=[]"]  # one padded length: one compiled step


def lora_config(base: Path, out: Path, *sets: str):
    """6 steps of a rank-4 LoRA, checkpoints at steps 2, 4 and 6."""
    return tiny_train_config(out, *base_sets(base), "train.save_every=2", *sets)


def adapter_tensors(run_dir: Path) -> dict[str, np.ndarray]:
    file = SafetensorsFile(run_dir / "adapter" / "adapter_model.safetensors")
    return {k: np.array(file[k]) for k in file.keys()}


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def checkpoint_steps(directory: Path) -> list[int]:
    ckpt = Checkpointer(directory, async_save=False)
    steps = ckpt.steps()
    ckpt.close()
    return steps


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lora_runs(base):
    """Two uninterrupted runs of the same config and seed."""
    a = train(lora_config(base, base / "a"), log=QUIET)
    b = train(lora_config(base, base / "b"), log=QUIET)
    return a, b


# --------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_loss_at_every_step(lora_runs):
    a, b = lora_runs
    assert len(a.losses) == 6 and all(np.isfinite(a.losses))
    assert np.array(a.losses, np.float32).tobytes() == np.array(b.losses, np.float32).tobytes()
    assert_same_adapter(a.output_dir, b.output_dir)


def test_seed_and_config_are_written_beside_the_checkpoints(lora_runs, base):
    a, _ = lora_runs
    cfg = lora_config(base, a.output_dir)
    saved = yaml.safe_load((a.output_dir / "run_config.yaml").read_text())
    assert saved == config.to_dict(cfg) and saved["train"]["seed"] == 0
    assert (a.output_dir / "checkpoints").is_dir()
    before = snapshot(a.output_dir)
    with pytest.raises(ValueError, match=r"run_config\.yaml: this run was started with a different config "
                                         r"\(sections \['train'\] differ\).*--force"):
        train(lora_config(base, a.output_dir, "train.seed=1"), resume="latest", log=QUIET)
    assert snapshot(a.output_dir) == before


# ------------------------------------------------------------------------------------ damaged checkpoints


def test_damaged_and_incomplete_checkpoints(lora_runs, base, tmp_path):
    """Step 6 was being saved when the run was killed (never renamed); step 4's data file was truncated later."""
    a, _ = lora_runs
    run = tmp_path / "run"
    shutil.copytree(a.output_dir, run)  # a moved run directory still resumes: only output_dir differs
    steps_dir = run / "checkpoints"
    (steps_dir / "6").rename(steps_dir / "6.orbax-checkpoint-tmp-1700000000000000")
    (data_file,) = (steps_dir / "4" / "state" / "d").iterdir()
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    assert checkpoint_steps(steps_dir) == [2, 4]  # the incomplete one is not a step
    cfg = lora_config(base, run)

    before = snapshot(run)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(steps_dir / '4'))}: cannot restore checkpoint: "
                                              r"(.|\n)*Pass --resume latest_valid to fall back"):
        train(cfg, resume="latest", log=QUIET)
    assert snapshot(run) == before  # nothing moved, nothing rewritten

    lines: list[str] = []
    resumed = train(cfg, resume="latest_valid", log=lambda *m: lines.append(" ".join(map(str, m))))
    assert resumed.resumed_from == 2
    assert any(line.startswith("checkpoint step 4 cannot be restored") for line in lines), lines
    assert any(line.startswith("resumed from step 2 ") for line in lines), lines
    assert (run / "damaged_checkpoints" / "4" / "state").is_dir()  # kept for inspection, no longer a step
    assert np.array(resumed.losses).tobytes() == np.array(a.losses[2:]).tobytes()
    assert_same_adapter(run, a.output_dir)
    assert checkpoint_steps(steps_dir) == [2, 4, 6]


# ------------------------------------------------------------------------------------------- non-finite


def test_nonfinite_steps_stop_the_run_after_saving(base, tmp_path, capsys):
    """A base model with NaN weights: every step is skipped; train.py stops at the limit, saved, exit 1."""
    shutil.copytree(base / "model", tmp_path / "nan_model")
    file = tmp_path / "nan_model" / "model.safetensors"
    reader = SafetensorsFile(file)
    tensors = {k: np.array(reader[k]) for k in reader.keys()}
    tensors["model.norm.weight"][:] = np.nan
    write_safetensors(file, tensors)

    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    sets = [f"output_dir={out}", *base_sets(base), f"model.path={tmp_path / 'nan_model'}", "train.steps=6",
            "train.save_every=100", "train.log_every=1", "train.progress=false", "train.async_checkpoints=false",
            "train.max_nonfinite_in_a_row=2", "data.batch_size=8", "adapter.rank=4"]
    assert script.main([a for s in sets for a in ("--set", s)]) == 1
    stderr = capsys.readouterr().err
    assert re.search(r"error: stopped: 2 steps in a row had a non-finite loss or gradient \(limit "
                     r"train\.max_nonfinite_in_a_row\) and were skipped; checkpoint saved at step 3 in "
                     rf"{re.escape(str(out / 'checkpoints'))} \(its adapter is the last finite one\)", stderr), stderr

    assert checkpoint_steps(out / "checkpoints") == [3]
    assert not (out / "adapter").exists()  # a stopped run exports nothing; its checkpoint can be resumed
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(out / "checkpoints" / "3" / "state")
    assert (int(state["skipped"]), int(state["skipped_in_a_row"]), int(state["step"])) == (3, 3, 3)
    adapter_leaves = jax.tree.leaves([state["trainable"], state["frozen"], state["opt_state"]])
    assert adapter_leaves and all(np.isfinite(np.asarray(x)).all() for x in adapter_leaves)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["finite"], r["skipped"]) for r in records] == [(1, 0.0, 1.0), (2, 0.0, 2.0)]


# ------------------------------------------------------------------------- SIGKILL of an adaptive merge


def _merge_sets(base: Path, task_adapters: list[Path]) -> list[str]:
    return [*base_sets(base), "adapter.kind=merge", f"merge.task_adapters=[{', '.join(map(str, task_adapters))}]",
            "merge.granularity=task_layer", "merge.pruning.every=2", "merge.pruning.final_sparsity=0.5",
            "train.steps=10", "train.save_every=1", "train.async_checkpoints=true", "train.log_every=1",
            "train.progress=false", "data.batch_size=8", "optim.learning_rate=0.01"]


def _subprocess_env(cache: Path) -> dict[str, str]:
    # The same 8 fake CPU devices and XLA flags as this process (conftest.py), so results compare bitwise;
    # the resumed run reuses the killed run's compiled step from a persistent compilation cache.
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def test_sigkill_of_an_adaptive_merge_with_async_checkpoints_resumes_bitwise(lora_runs, base, tmp_path, seed):
    """train.py merges a trained LoRA (run a) and a random one with pruning, is killed at a random step after a
    checkpoint appears (the next save possibly in flight), resumes, and ends bitwise where an uninterrupted
    in-process run ends: the exported adapter and every leaf of the final checkpoint."""
    a, _ = lora_runs
    model = load_pretrained(base / "model")
    second = init_lora(model.config, jax.random.key(1), rank=2, target_modules=PROJECTIONS)
    rng = np.random.default_rng(1)
    second = second.replace(b={n: rng.normal(0, 0.1, b.shape).astype(np.float32) for n, b in second.b.items()})
    save_peft_adapter(second, tmp_path / "task_b", model)
    sets = _merge_sets(base, [a.output_dir, tmp_path / "task_b"])

    full = train(config.load_config(TrainConfig, None, [f"output_dir={tmp_path / 'full'}", *sets]), log=QUIET)
    assert all(np.isfinite(full.losses)) and len(full.losses) == 10

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "train.py"), *[x for s in [f"output_dir={killed}", *sets] for x in ("--set", s)]]
    kill_after = int(np.random.default_rng(seed).integers(1, 7))  # 1..6, from the test's seed
    env = _subprocess_env(tmp_path / "jax_cache")
    with open(tmp_path / "killed.log", "w") as output:
        proc = subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / str(kill_after)).exists():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # possibly while the next step's checkpoint is being written
    assert proc.wait() == -signal.SIGKILL, f"the run ended before it was killed after step {kill_after}"
    cut_short = sorted(p.name for p in (killed / "checkpoints").iterdir() if ".orbax-checkpoint-tmp" in p.name)

    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed_from = int(re.search(r"resumed from step (\d+)", done.stdout)[1])
    assert resumed_from >= kill_after, (kill_after, done.stdout)

    context = f"killed after checkpoint {kill_after} (saves cut short: {cut_short}), resumed from {resumed_from}"
    ta, tb = adapter_tensors(full.output_dir), adapter_tensors(killed)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=f"{k} ({context})")

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), full.state)
    restored = {}
    for name, run in (("full", full.output_dir), ("killed", killed)):
        ckpt = Checkpointer(run / "checkpoints", async_save=False)
        restored[name] = ckpt.restore(abstract, 10)
        ckpt.close()
    (state_full, position_full, _), (state_killed, position_killed, _) = restored["full"], restored["killed"]
    assert position_full == position_killed
    paths, leaves_full = zip(*jax.tree_util.tree_flatten_with_path(state_full)[0])
    leaves_killed = jax.tree.leaves(state_killed)
    assert len(leaves_full) == len(leaves_killed)
    for path, x, y in zip(paths, leaves_full, leaves_killed):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{jax.tree_util.keystr(path)} ({context})")
    names = {jax.tree_util.keystr(p) for p in paths}
    assert any("coefficients" in n for n in names) and any("mask_a" in n for n in names)
    assert any(".opt_state" in n for n in names)
    masks = jax.tree.leaves(state_full.frozen.mask_a)
    assert 0 < sum(float((np.asarray(m) == 0).mean()) for m in masks) / len(masks) < 1  # pruning happened


# ---------------------------------------------------------------------------------------------- safety


class _Payload:
    """A pickle that creates a file when unpickled: loading it would execute code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_files_are_never_loaded(lora_runs, base, tmp_path):
    marker = tmp_path / "code_was_executed"
    payload = pickle.dumps(_Payload(marker))
    model_dir = tmp_path / "model"
    shutil.copytree(base / "model", model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    (model_dir / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json \(found "
                                                r"pytorch_model\.bin: pickle formats are never loaded"):
        load_pretrained(model_dir)

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    shutil.copy(lora_runs[0].adapter_dir / "adapter_config.json", adapter_dir)
    (adapter_dir / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors: missing \(found adapter_model\.bin: "
                                                r"pickle formats are never loaded"):
        load_peft_adapter(adapter_dir, load_pretrained(base / "model"))
    assert not marker.exists()
    pickle.loads(payload).close()  # the payload is live: unpickling it does run code
    assert marker.exists()


def test_no_code_path_trusts_remote_code():
    """Every transformers loader is called with trust_remote_code=False, and nothing unpickles."""
    sources = [*sorted((REPO / "lora_merge_jax").rglob("*.py")), REPO / "train.py", REPO / "eval.py"]
    assert len(sources) > 20
    for path in sources:
        text = path.read_text()
        for match in re.finditer(r"trust_remote_code\s*=\s*(\w+)", text):
            assert match[1] == "False", f"{path}: {match[0]}"
        for call in re.finditer(r"\w+\.from_pretrained\(", text):
            line_end = text.index("\n", call.end())
            line = text[text.rindex("\n", 0, call.start()) + 1:line_end]
            if line.lstrip().startswith((">>>", "#", "``")) or '"""' in line or "``" in line:
                continue  # a docstring example
            assert "trust_remote_code=False" in line, f"{path}: {line.strip()}"
        unsafe = re.search(r"pickle\.loads?\(|torch\.load\(|allow_pickle=True|weights_only=False"
                           r"|(?<![\w.])(eval|exec)\(", text)
        assert unsafe is None, f"{path}: {unsafe[0]}"
