"""train.py as a real multi-process job: 2 processes x 4 CPU devices on 127.0.0.1 (gloo collectives).

- A LoRA on a data=4 x fsdp=2 mesh and a pruned adaptive merge on an fsdp=8 mesh, each spanning both
  processes, match the same run in one process with 8 devices: the loss at every logged step and the
  exported adapter, to float tolerance (the cross-process all-reduces may add in another order).
  On data=4 x fsdp=2 the processes split the data axis (fsdp pairs stay within a process); on fsdp=8 the
  weights' shards live on both processes, so the export has to gather them.
- Both processes killed (SIGKILL) at a random step, then resumed with --resume: bitwise the uninterrupted
  two-process run's adapter.
- SIGTERM to one process: both save the same step and exit 0; that checkpoint resumes in one process.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lora_merge_jax import config, tiny
from lora_merge_jax.adapters.lora import init_lora
from lora_merge_jax.config import ConfigError
from lora_merge_jax.io.hf import load_pretrained
from lora_merge_jax.io.peft_export import save_peft_adapter
from lora_merge_jax.io.safetensors import SafetensorsFile
from lora_merge_jax.models.config import PROJECTIONS
from lora_merge_jax.training.checkpoint import Checkpointer
from lora_merge_jax.training.config import TrainConfig
from lora_merge_jax.training.loop import train
from tests.multiproc import Job

QUIET = lambda *_: None  # noqa: E731
LAUNCH_TIMEOUT = 480  # seconds for one launch (start-up, compile, 6 steps) on a busy 2-core machine
COMMON = ["train.log_every=1", "train.progress=false", "data.batch_size=8", "optim.learning_rate=0.01",
          "data.length_buckets=[]"]  # one padded length: one compiled step
LORA = [*COMMON, "adapter.rank=4", "mesh.data=4", "mesh.fsdp=2", "train.steps=6", "train.save_every=1"]
LOSS_RTOL = 1e-5  # relative, loss at each step
ADAPTER_TOL = {"rtol": 1e-4, "atol": 1e-5}  # exported factors (values ~0.1)


@pytest.fixture
def jobs():
    """Jobs started by a test; whatever happens, none outlives it."""
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


def launch(jobs: list[Job], sets: list[str], logs: Path, *extra_args: str) -> Job:
    job = Job(sets, logs, extra_args=extra_args)
    jobs.append(job)
    return job


def run_to_end(jobs: list[Job], sets: list[str], logs: Path, *extra_args: str) -> Job:
    job = launch(jobs, sets, logs, *extra_args)
    codes = job.wait(LAUNCH_TIMEOUT)
    assert codes == [0, 0], f"exit codes {codes}\n{job.all_logs()}"
    return job


def adapter_tensors(directory: Path) -> dict[str, np.ndarray]:
    file = SafetensorsFile(directory / "adapter_model.safetensors")
    return {k: np.array(file[k]) for k in file.keys()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_matches_one_process(two: Path, one: Path, adapters: tuple[str, ...] = ("adapter",)) -> None:
    """Two-process run ``two`` against the one-process run ``one``: each record of metrics.jsonl written once,
    the same loss at each step, the same exported adapters (to the stated tolerances)."""
    m2, m1 = metrics(two), metrics(one)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, len(m1) + 1))
    np.testing.assert_allclose([r["loss"] for r in m2], [r["loss"] for r in m1], rtol=LOSS_RTOL)
    for name in adapters:
        t2, t1 = adapter_tensors(two / name), adapter_tensors(one / name)
        assert t2.keys() == t1.keys() and t1
        for k in t1:
            np.testing.assert_allclose(t2[k], t1[k], err_msg=f"{name}: {k}", **ADAPTER_TOL)
        configs = [json.loads((run / name / "adapter_config.json").read_text()) for run in (two, one)]
        for c in configs:
            c.pop("base_model_name_or_path")  # each run's own embedded model
        assert configs[0] == configs[1]


def test_lora_on_two_processes_matches_one_and_resumes_bitwise_after_sigkill(tmp_path, jobs, seed):
    # (1) uninterrupted: 2 processes x 4 devices, the embedded model and task (made by the job itself).
    two = tmp_path / "two"
    job = run_to_end(jobs, [f"output_dir={two}", *LORA], tmp_path / "logs_two")
    assert "[process 1/2] adapter written to" in job.log(1) and "loss: first" in job.log(0)
    assert not list((two / "embedded").glob("model.process*"))  # the scratch copies are gone
    one = tmp_path / "one"
    train(config.load_config(TrainConfig, None, [f"output_dir={one}", *LORA]), log=QUIET)  # 1 process x 8
    assert_matches_one_process(two, one)
    assert (two / "run_config.yaml").exists()

    # (2) SIGKILL both after a random checkpoint (the next save possibly in flight), then resume both.
    killed = tmp_path / "killed"
    sets = [f"output_dir={killed}", *LORA]
    kill_after = int(np.random.default_rng(seed).integers(1, 5))  # 1..4 of 6 steps
    job = launch(jobs, sets, tmp_path / "logs_killed")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (killed / "checkpoints" / str(kill_after)).exists():
        assert job.running(), job.all_logs()
        assert time.monotonic() < deadline, "no checkpoint in time\n" + job.all_logs()
        time.sleep(0.02)
    job.kill(signal.SIGKILL)
    assert [p.returncode for p in job.procs] == [-signal.SIGKILL] * 2, \
        f"the run ended before it was killed after step {kill_after}\n{job.all_logs()}"
    resumed = run_to_end(jobs, sets, tmp_path / "logs_resumed", "--resume")
    for i in range(2):
        found = re.search(r"resumed from step (\d+)", resumed.log(i))
        assert found and int(found[1]) >= kill_after, resumed.all_logs()
    ta, tb = adapter_tensors(two / "adapter"), adapter_tensors(killed / "adapter")
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=f"{k} (killed after checkpoint {kill_after})")


def test_pruned_merge_with_fsdp_across_processes_matches_one_process(tmp_path, jobs, rng):
    model_dir = tiny.embedded_model(tmp_path / "base")
    model = load_pretrained(model_dir)
    sources = []
    for k, rank in enumerate((4, 2)):  # two task LoRAs with random factors
        lora = init_lora(model.config, jax.random.key(int(rng.integers(1 << 30))), rank=rank,
                         target_modules=PROJECTIONS)
        lora = lora.replace(b={n: rng.normal(0, 0.1, b.shape).astype(np.float32) for n, b in lora.b.items()})
        sources.append(save_peft_adapter(lora, tmp_path / f"task{k}", model))
    merge = [*COMMON, f"model.path={model_dir}", "adapter.kind=merge",
             f"merge.task_adapters=[{', '.join(map(str, sources))}]", "merge.granularity=task_layer",
             "merge.pruning.every=2", "merge.pruning.final_sparsity=0.5", "merge.export_rank=2",
             "mesh.data=1", "mesh.fsdp=8", "train.steps=6", "train.save_every=3"]
    two, one = tmp_path / "two", tmp_path / "one"
    run_to_end(jobs, [f"output_dir={two}", *merge], tmp_path / "logs")
    train(config.load_config(TrainConfig, None, [f"output_dir={one}", *merge]), log=QUIET)
    assert_matches_one_process(two, one, ("adapter", "adapter_compact", "adapter_rank2"))
    m2, m1 = metrics(two), metrics(one)
    for r2, r1 in zip(m2, m1):
        np.testing.assert_allclose(jax.tree.leaves(r2["coefficients"]), jax.tree.leaves(r1["coefficients"]),
                                   rtol=1e-4)
    assert (two / "merge_training.png").exists()


def test_sigterm_to_one_process_saves_both_at_one_step(tmp_path, jobs):
    out = tmp_path / "run"
    job = launch(jobs, [f"output_dir={out}", *LORA, "train.steps=100000", "train.save_every=2"], tmp_path / "logs")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (out / "checkpoints" / "2").exists():
        assert job.running(), job.all_logs()
        assert time.monotonic() < deadline, "no checkpoint in time\n" + job.all_logs()
        time.sleep(0.05)
    job.send(1, signal.SIGTERM)  # process 1 only
    codes = job.wait(120)
    assert codes == [0, 0], f"exit codes {codes}\n{job.all_logs()}"
    saved = [re.findall(r"(SIGTERM[^:]*): checkpoint saved at step (\d+); exiting", job.log(i)) for i in range(2)]
    assert [len(s) for s in saved] == [1, 1], job.all_logs()
    (cause0, step0), (cause1, step1) = saved[0][0], saved[1][0]
    assert (cause0, cause1) == ("SIGTERM to another process", "SIGTERM") and step0 == step1, saved
    step = int(step0)
    ckpt = Checkpointer(out / "checkpoints", async_save=False)
    assert ckpt.latest_step() == step
    ckpt.close()
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))  # written once, by process 0
    # The two processes' checkpoint resumes in one process with 8 devices (the launch fields may differ).
    cfg = config.load_config(TrainConfig, None, [f"output_dir={out}", *LORA, "train.steps=100000",
                                                 "train.save_every=2"])
    resumed = train(cfg, resume="latest", log=QUIET, stop_after=1)
    assert resumed.resumed_from == step and resumed.stopped_early and len(resumed.losses) == 1


def test_coordinator_fields_are_set_together_and_checked():
    coordinator = ["train.coordinator_address=10.0.0.1:1234", "train.num_processes=2"]
    with pytest.raises(ConfigError, match=r"train\.process_id: coordinator_address, num_processes and process_id "
                                          r"are set together"):
        config.load_config(TrainConfig, None, ["train.distributed=true", *coordinator])
    with pytest.raises(ConfigError, match=r"must be in \[0, num_processes=2\), got 2"):
        config.load_config(TrainConfig, None, ["train.distributed=true", *coordinator, "train.process_id=2"])
    with pytest.raises(ConfigError, match="needs train.distributed: true"):
        config.load_config(TrainConfig, None, [*coordinator, "train.process_id=1"])
    run = config.load_config(TrainConfig, None, ["train.distributed=true", *coordinator, "train.process_id=1"]).train
    assert run.distributed_kwargs() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert config.load_config(TrainConfig, None, ["train.distributed=true"]).train.distributed_kwargs() == {}
