"""Launching ``train.py`` as a local multi-process JAX job: N processes on 127.0.0.1, each with its own fake
CPU devices, joined through an explicit coordinator (``train.coordinator_address``...), gloo collectives.

Each process runs in its own session (process group), so that a test can kill it with everything it started;
``Job.wait`` stops the others as soon as one fails (a process whose peer died waits in a collective until
the coordinator's heartbeat times out), and the ``jobs`` fixture of a test kills whatever is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound to 0, read, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(local_devices: int) -> dict[str, str]:
    """The environment of one process: ``local_devices`` fake CPU devices and the tests' XLA flags.

    No persistent compilation cache: JAX writes it from process 0 only and process 1's keys differ, so
    process 0 would load each program while process 1 compiles it, and a process that waits more than 30 s
    for the other at its first collective fails (gloo's rendezvous timeout).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices} --xla_backend_optimization_level=0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


class Job:
    """``train.py`` running as ``num_processes`` processes; their output goes to ``logs/p<i>.log``."""

    def __init__(self, sets: list[str], logs: Path, *, num_processes: int = 2, local_devices: int = 4,
                 extra_args: tuple[str, ...] = ()):
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        for i in range(num_processes):
            launch = ["train.distributed=true", f"train.coordinator_address={address}",
                      f"train.num_processes={num_processes}", f"train.process_id={i}"]
            cmd = [sys.executable, str(REPO / "train.py"), *[x for s in [*sets, *launch] for x in ("--set", s)],
                   *extra_args]
            with open(self.logs / f"p{i}.log", "w") as out:
                self.procs.append(subprocess.Popen(cmd, env=child_env(local_devices), stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True))

    def log(self, i: int) -> str:
        return (self.logs / f"p{i}.log").read_text()

    def all_logs(self) -> str:
        return "\n".join(f"----- process {i} -----\n{self.log(i)}" for i in range(len(self.procs)))

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def wait(self, timeout: float, grace: float = 20.0) -> list[int | None]:
        """Exit codes once all have exited (at most ``timeout`` s); once one has failed, the others get
        ``grace`` s, then everything left is killed (its code None)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                deadline = min(deadline, time.monotonic() + grace)
            time.sleep(0.05)
        codes = [p.poll() for p in self.procs]
        self.kill()
        return codes

    def send(self, i: int, sig: int) -> None:
        """Sends ``sig`` to process ``i`` only (not to its process group)."""
        self.procs[i].send_signal(sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to every process group still running and reaps them."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
