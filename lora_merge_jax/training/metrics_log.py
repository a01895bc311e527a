"""Training metrics to ``metrics.jsonl`` (one JSON object a line) and to TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(f"{prefix}/{i}", v, out)
    elif isinstance(value, (int, float)):
        out[prefix] = float(value)


class MetricsLog:
    """Appends metric records; nested values (coefficients, sparsity) become TensorBoard scalar groups."""

    def __init__(self, directory: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._writer = None
        if not enabled:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._file = open(directory / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(directory / "tensorboard"))
        except ImportError:  # TensorBoard is optional; the JSONL file is the record
            self._writer = None

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **record}) + "\n")
        self._file.flush()
        if self._writer is not None:
            flat: dict[str, float] = {}
            _flatten("", record, flat)
            for key, value in flat.items():
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
