"""Files written whole or not at all: a temporary name in the same directory, then an atomic rename.

Every report, config and weight file the library writes goes through here, so a kill mid-write leaves the
previous version (or nothing), never a truncated file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a temporary sibling of ``path`` for writing; renames it over ``path`` when the block succeeds.

    Example:
        >>> with atomic_open("out/weights.bin", "wb") as f:
        ...     f.write(blob)
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON (non-ASCII kept) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
