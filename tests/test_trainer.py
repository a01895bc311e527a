"""train.py and the training loop end to end: embedded default, resume (in process and after SIGKILL), SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_merge_jax.io.safetensors import SafetensorsFile
from lora_merge_jax.training import loop
from lora_merge_jax.training.loop import train
from tests.train_helpers import tiny_train_config

REPO = Path(__file__).resolve().parent.parent


def _adapter_tensors(run_dir: Path) -> dict[str, np.ndarray]:
    file = SafetensorsFile(run_dir / "adapter" / "adapter_model.safetensors")
    return {k: np.array(file[k]) for k in file.keys()}


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = _adapter_tensors(a), _adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = train(tiny_train_config(out), log=lambda *_: None)
    return out, result


def test_embedded_default_trains_and_exports(uninterrupted):
    out, result = uninterrupted
    assert len(result.losses) == 6 and all(np.isfinite(result.losses))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "grad_norm", "tokens_per_second"} <= set(records[0])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (out / "run_config.yaml").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_init_from_starts_at_the_exported_adapter_with_the_configs_dropout(uninterrupted, tmp_path):
    from lora_merge_jax.training.loop import build_adapter

    out, result = uninterrupted
    cfg = tiny_train_config(tmp_path / "continued", f"adapter.init_from={out}", "adapter.dropout=0.25")
    adapter = build_adapter(cfg, result.model)
    assert adapter.dropout == 0.25  # the config's, not the exported adapter's
    for name, a in adapter.a.items():  # the trained factors, placed on the model's mesh
        np.testing.assert_array_equal(np.asarray(a), np.asarray(result.state.adapter.a[name]), err_msg=name)
        np.testing.assert_array_equal(np.asarray(adapter.b[name]), np.asarray(result.state.adapter.b[name]))


def test_resume_in_process_reaches_the_same_adapter(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    cfg = tiny_train_config(tmp_path)
    first = train(cfg, log=lambda *_: None, stop_after=2)
    assert first.stopped_early
    second = train(cfg, resume="latest", log=lambda *_: None)
    assert second.resumed_from == 2
    _assert_same_adapter(full_dir, tmp_path)


def test_existing_checkpoints_need_resume_and_the_same_config(uninterrupted, tmp_path):
    train(tiny_train_config(tmp_path), log=lambda *_: None, stop_after=1)
    with pytest.raises(FileExistsError, match="holds checkpoints of an earlier run; pass --resume"):
        train(tiny_train_config(tmp_path), log=lambda *_: None)
    with pytest.raises(ValueError, match=r"run_config.yaml: this run was started with a different config \(sections \['optim'\]"):
        train(tiny_train_config(tmp_path, "optim.learning_rate=0.02"), resume="latest", log=lambda *_: None)


def _train_cmd(out: Path, *extra: str) -> list[str]:
    sets = [f"output_dir={out}", "train.steps=6", "train.save_every=1", "train.log_every=1",
            "train.progress=false", "data.batch_size=8", "optim.learning_rate=0.01", "adapter.rank=4"]
    return [sys.executable, str(REPO / "train.py"), *[a for s in sets for a in ("--set", s)], *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # 8 CPU devices, as the in-process reference run has: the same mesh gives the same adapter bitwise.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = str(REPO)
    return env


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (out / "checkpoints" / str(step)).exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def test_bfloat16_on_a_cpu_without_bfloat16_instructions_is_noted(tmp_path, monkeypatch):
    # On an AVX2-only CPU bf16 runs slower than float32 (bench/RESULTS.md): the run says so and what to set.
    if jax.default_backend() != "cpu":
        pytest.skip("the note is about CPUs")
    monkeypatch.setattr(loop, "_cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    lines = []
    train(tiny_train_config(tmp_path, "model.dtype=bfloat16", "model.compute_dtype=bfloat16"), log=lines.append,
          stop_after=1)
    notes = [line for line in lines if "without bfloat16 instructions" in line]
    assert len(notes) == 1 and "set model.dtype and model.compute_dtype to float32" in notes[0], lines
    bf16 = jnp.dtype(jnp.bfloat16)
    assert loop.bfloat16_cpu_notice(bf16, "cpu", frozenset({"avx2", "avx512_bf16"})) is None
    assert loop.bfloat16_cpu_notice(bf16, "cpu", frozenset({"avx2", "amx_bf16"})) is None
    assert loop.bfloat16_cpu_notice(jnp.dtype(jnp.float32), "cpu", frozenset({"avx2"})) is None
    assert loop.bfloat16_cpu_notice(bf16, "gpu", frozenset({"avx2"})) is None
    assert loop.bfloat16_cpu_notice(bf16, "cpu", None) is None  # no /proc/cpuinfo: nothing to say


def test_sigkill_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    proc = subprocess.Popen(_train_cmd(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    _wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_train_cmd(tmp_path, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from step" in done.stdout
    _assert_same_adapter(full_dir, tmp_path)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(_train_cmd(tmp_path, "--set", "train.steps=100000"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGTERM: checkpoint saved at step" in output
    saved = int(output.split("SIGTERM: checkpoint saved at step ")[1].split(";")[0])
    assert (tmp_path / "checkpoints" / str(saved)).exists()


def test_unknown_config_key_exits_with_its_name(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--set", "optim.lerning_rate=0.1"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown key 'optim.lerning_rate' (did you mean 'optim.learning_rate'?)" in done.stderr
