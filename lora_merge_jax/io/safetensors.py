"""Reading and writing safetensors files tensor by tensor, without pickle and without torch.

The format is an 8-byte header length, a JSON header (dtype, shape, byte range of each tensor), then the
raw bytes. Reading memory-maps the file, so a slice of one tensor touches only the pages it needs: a
device shard of an 8B model's weight is read without the whole file ever being in host memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from lora_merge_jax.io.files import atomic_open

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """A memory-mapped safetensors file: ``file[name]`` is a read-only numpy view of one tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its header)")
            (header_len,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.header: dict[str, dict] = header
        self._offset = 8 + header_len
        size = self.path.stat().st_size
        end = max((h["data_offsets"][1] for h in header.values()), default=0)
        if self._offset + end > size:
            raise ValueError(f"{self.path}: truncated: header promises {self._offset + end} bytes, file has {size}")
        self._buffer = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._buffer[self._offset + start : self._offset + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]] | dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes tensors to ``path`` (through a temporary file, renamed at the end, so it is never half written).

    ``tensors`` may be a generator: shapes come first from a listing, then each array is materialised once.
    """
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header: dict[str, dict] = {}
    offset = 0
    for name, arr in items:
        dtype = np.dtype(arr.dtype)
        if dtype not in _NAMES:
            raise ValueError(f"tensor '{name}': dtype {dtype} cannot be written to safetensors")
        nbytes = int(np.prod(arr.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())


class CheckpointFiles:
    """The tensors of a Hugging Face checkpoint directory: one ``model.safetensors`` or sharded with an index."""

    def __init__(self, directory: str | os.PathLike, prefix: str = "model"):
        self.directory = Path(directory)
        index = self.directory / f"{prefix}.safetensors.index.json"
        single = self.directory / f"{prefix}.safetensors"
        self._files: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: malformed index ({e})") from None
            self.location = dict(weight_map)
        elif single.exists():
            self.location = {name: single.name for name in self._open(single.name).keys()}
        else:
            found = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt*")
            )
            hint = f" (found {', '.join(found)}: pickle formats are never loaded; convert to safetensors)" if found else ""
            raise FileNotFoundError(f"{self.directory}: no {single.name} or {index.name}{hint}")

    def _open(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            path = self.directory / file
            if not path.exists():
                raise FileNotFoundError(f"{path}: listed in the checkpoint index but missing")
            self._files[file] = SafetensorsFile(path)
        return self._files[file]

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def names(self) -> Iterator[str]:
        return iter(self.location)

    def get(self, name: str) -> tuple[np.ndarray, Path]:
        """The tensor ``name`` (memory-mapped) and the file it lives in."""
        file = self._open(self.location[name])
        if name not in file.header:
            raise ValueError(f"{file.path}: tensor '{name}' listed in the index is not in the file")
        return file[name], file.path
