"""Summarisation data: a typed config and validated reading of records.

The pipeline is ``DataConfig`` -> ``read_records`` (here) -> ``prompts.build_train_examples`` /
``prompts.build_eval_examples`` (token ids) -> ``batching.TrainIterator`` (numpy batches in the convention
of ``models/losses.py``). Field types are checked where configs are read (``lora_merge_jax/config.py``).

Design:
  * Reading goes through ``datasets.load_dataset`` (local JSON Lines/JSON/CSV/Parquet, or a hub data set),
    but local text files are first checked here, line by line, because ``datasets`` reports a malformed
    JSON line, a bad byte or a missing column without saying where. Every data error is a ``ValueError``
    that names the file and line (or row) and the field. Empty inputs and targets are errors, not skips:
    a data set with holes should be fixed, not silently thinned.
  * CSV columns are read as strings with pandas' NA detection off, so a summary "None" or "NA" stays text.
  * An input may come from a line-aligned text file instead of a field (``*_input_lines_file``: line i is
    the input of record i), as X-SciTLDR ships its machine-translated abstracts; blank lines at the end of
    that file are ignored, any other count mismatch is an error.
  * Text is normalised once: CRLF/CR become LF and outer whitespace is stripped.
  * Relative paths are resolved against ``data_dir``, so configs never hold a machine's layout.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ON_OVERLONG = ("truncate_input", "skip", "error")
SPLITS = ("train", "eval")
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data is, how a record becomes a prompt and a target, and how examples are batched.

    Example:
        >>> cfg = DataConfig(data_dir="data", train_file="tiny/train.jsonl", eval_file="tiny/dev.jsonl",
        ...                  prompt_template="Reverse: {input}\\n", max_length=128, batch_size=4)
    """

    data_dir: str = "data"  # directory that relative file paths are resolved against
    train_file: str | None = None  # training records (.jsonl/.json/.csv/.parquet), relative to data_dir
    eval_file: str | None = None  # evaluation records, same formats
    hub_name: str | None = None  # hub data set for datasets.load_dataset, used instead of train_file/eval_file
    hub_config: str | None = None  # configuration name of hub_name
    train_split: str = "train"  # split of hub_name used for training
    eval_split: str = "validation"  # split of hub_name used for evaluation
    input_field: str | None = "document"  # field holding the input: a string or a list of strings
    input_join: str = " "  # separator joining an input given as a list of strings (e.g. sentences)
    train_input_lines_file: str | None = None  # text file whose line i is the input of training record i
    eval_input_lines_file: str | None = None  # text file whose line i is the input of evaluation record i
    target_field: str = "summary"  # the summary: a string or a list (train uses the first, eval all as refs)
    prompt_template: str = "Summarize the following text.\n\n{input}\n\nSummary:\n"  # {input} exactly once
    prompt_fields: tuple[str, ...] = ()  # other record fields usable as {placeholders}; never truncated
    use_chat_template: bool = False  # prompt as the user turn, target as the assistant turn
    max_length: int = 1024  # most tokens of a training example; eval prompt + max_target_length fit too
    max_target_length: int = 128  # most summary tokens, end-of-sequence tokens not counted; longer are cut
    length_buckets: tuple[int, ...] = ()  # padded lengths, smallest that fits is used; max_length is implied
    batch_size: int = 8  # global batch size, all hosts together
    shuffle_seed: int = 0  # the order of epoch e is np.random.default_rng([shuffle_seed, e])
    subset_seed: int = 0  # seed of the shuffle from which max_examples training examples are taken
    max_examples: int | None = None  # keep the first N usable training examples after the subset shuffle
    max_eval_examples: int | None = None  # keep the first N usable evaluation records, in file order
    on_overlong: str = "truncate_input"  # example over max_length: "truncate_input" | "skip" | "error"
    packing: bool = False  # training rows hold several examples (kept apart by segment ids), fewer pad tokens
    pack_length: int | None = None  # tokens a packed row holds (default max_length); a longer example sits alone

    def __post_init__(self) -> None:
        for name in ("length_buckets", "prompt_fields"):  # YAML gives lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.on_overlong not in ON_OVERLONG:
            raise ValueError(f"on_overlong must be one of {ON_OVERLONG}, got {self.on_overlong!r}")
        if self.hub_name and (self.train_file or self.eval_file):
            raise ValueError("set either hub_name or train_file/eval_file, not both")
        if not 0 < self.max_target_length < self.max_length:
            raise ValueError(f"need 0 < max_target_length ({self.max_target_length}) < max_length "
                             f"({self.max_length})")
        buckets = list(self.length_buckets)
        if buckets != sorted(set(buckets)) or not all(0 < b <= self.max_length for b in buckets):
            raise ValueError(f"length_buckets must rise strictly, each in 1..max_length={self.max_length}: "
                             f"{buckets}")
        if self.pack_length is not None:
            # Bounded by max_length only when packing: a preset's pack_length must not stop a run that lowers
            # max_length and trains unpacked.
            if self.pack_length <= 0 or (self.packing and self.pack_length > self.max_length):
                raise ValueError(f"need 0 < pack_length ({self.pack_length}) <= max_length ({self.max_length}) "
                                 "when packing")
        for name in ("batch_size", "max_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if "input" in self.prompt_fields:
            raise ValueError("prompt_fields must not name 'input', which is the input placeholder")
        _check_template(self.prompt_template, self.prompt_fields)


def _check_template(template: str, prompt_fields: Sequence[str]) -> None:
    """Checks the placeholders: ``{input}`` exactly once, other names from ``prompt_fields``, no formatting."""
    try:
        parsed = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"prompt_template: {e} (write {{{{ and }}}} for literal braces)") from None
    for name, spec, conversion in parsed:
        if name not in ("input", *prompt_fields):
            raise ValueError(f"prompt_template: unknown placeholder {{{name}}}; allowed: {{input}}"
                             + "".join(f", {{{f}}}" for f in prompt_fields) + " (extra names go in prompt_fields)")
        if spec or conversion:
            raise ValueError(f"prompt_template: placeholder {{{name}}} must not carry a conversion or format spec")
    count = [name for name, _, _ in parsed].count("input")
    if count != 1:
        raise ValueError(f"prompt_template must contain {{input}} exactly once, found {count}")


@dataclasses.dataclass(frozen=True)
class Record:
    """One input/summary pair as read, before tokenisation."""

    input: str  # the document to summarise, normalised
    targets: tuple[str, ...]  # one or more reference summaries, normalised, none empty
    fields: Mapping[str, str]  # values of cfg.prompt_fields
    source: str  # where it came from, for messages: "file:line" or "name[split] row i"


# ----------------------------------------------------------------------------------------------- reading


def _resolve(cfg: DataConfig, name: str) -> Path:
    path = Path(cfg.data_dir) / name  # an absolute name stays absolute
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (data_dir={cfg.data_dir!r}, file {name!r})")
    return path


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path}: file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {column} of the "
                         "line)") from None


def _check_fields(obj: Any, fields: Sequence[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in fields:
        if field not in obj:
            raise ValueError(f"{where}: no field {field!r} in this record (it has: {', '.join(obj)})")
        value = obj[field]
        if not (isinstance(value, (str, int, float)) or isinstance(value, list) and
                all(isinstance(v, str) for v in value)):
            raise ValueError(f"{where}: field {field!r} must be a string or a list of strings, got "
                             f"{type(value).__name__}")


def _check_json(path: Path, text: str, fields: Sequence[str]) -> list[str]:
    """Validates JSON Lines (or a top-level JSON array in a .json file); returns each record's location."""
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        for i, row in enumerate(rows):
            _check_fields(row, fields, f"{path}: record {i}")
        return [f"{path}: record {i}" for i in range(len(rows))]
    locations = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg}, column {e.colno})") from None
        _check_fields(row, fields, f"{path}:{lineno} (record {len(locations)})")
        locations.append(f"{path}:{lineno}")
    return locations


def _check_csv(path: Path, text: str, fields: Sequence[str]) -> list[str]:
    """Validates a CSV file with a header (quoted fields may span lines); returns each record's first line."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), strict=True)
    locations = []
    try:
        header = next(reader)
        for field in fields:
            if field not in header:
                raise ValueError(f"{path}:1: no column {field!r} in the header (columns: {', '.join(header)})")
        previous_end = reader.line_num
        for row in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if row and len(row) != len(header):
                raise ValueError(f"{path}:{start}: record has {len(row)} fields, the header has {len(header)}")
            if row:
                locations.append(f"{path}:{start}")
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return locations


def _load_dataset(cfg: DataConfig, split: str, fields: Sequence[str]) -> tuple[Any, list[str], str]:
    """(a datasets.Dataset, the location of each row, the data's name for messages)."""
    import datasets

    if cfg.hub_name:
        split_name = cfg.train_split if split == "train" else cfg.eval_split
        dataset = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=split_name)
        name = f"{cfg.hub_name}[{split_name}]"
        missing = [f for f in fields if f not in dataset.column_names]
        if missing:
            raise ValueError(f"{name}: no column {missing[0]!r} (columns: {', '.join(dataset.column_names)})")
        return dataset, [f"{name} row {i}" for i in range(len(dataset))], name
    file = cfg.train_file if split == "train" else cfg.eval_file
    if not file:
        raise ValueError(f"DataConfig has neither {split}_file nor hub_name: no {split} data")
    path = _resolve(cfg, file)
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown format {path.suffix!r}; use one of {', '.join(_FORMATS)}")
    kwargs: dict[str, Any] = {}
    if kind == "parquet":
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: file is empty")
    else:
        text = _read_text(path)
        locations = (_check_csv if kind == "csv" else _check_json)(path, text, fields)
        if not locations:
            raise ValueError(f"{path}: file holds no records")
        if kind == "csv":  # every used column as text, and "NA"/"None"/"" kept as strings
            kwargs = dict(usecols=list(dict.fromkeys(fields)), na_filter=False,
                          features=datasets.Features({f: datasets.Value("string") for f in fields}))
    dataset = datasets.load_dataset(kind, data_files={"data": str(path)}, split="data", **kwargs)
    if kind == "parquet":
        missing = [f for f in fields if f not in dataset.column_names]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (columns: {', '.join(dataset.column_names)})")
        locations = [f"{path}: row {i}" for i in range(len(dataset))]
    elif len(dataset) != len(locations):
        raise ValueError(f"{path}: datasets read {len(dataset)} records where {len(locations)} were expected")
    return dataset, locations, str(path)


def _read_input_lines(path: Path, num_records: int, data_name: str) -> list[str]:
    lines = _read_text(path).split("\n")
    while lines and not lines[-1].strip():  # blank lines at the end of the file carry no record
        lines.pop()
    if len(lines) != num_records:
        raise ValueError(f"{path}: {len(lines)} lines, but {data_name} has {num_records} records "
                         "(line i must hold the input of record i)")
    return lines


def normalise_text(text: str) -> str:
    """CRLF and CR to LF, outer whitespace stripped: the one normalisation every input and target gets."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _as_texts(value: Any, field: str, where: str) -> list[str]:
    if value is None:
        raise ValueError(f"{where}: field {field!r} is null")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: field {field!r} is an empty list")
        return [normalise_text(str(v)) for v in value]
    return [normalise_text(str(value))]


def read_records(cfg: DataConfig, split: str) -> list[Record]:
    """Reads and validates every record of ``split`` ("train" or "eval").

    Args:
        cfg: the data config.
        split: "train" (train_file / train_split) or "eval" (eval_file / eval_split).

    Returns:
        The records in file order. Raises ``ValueError`` naming file, line and field on bad data.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    lines_file = cfg.train_input_lines_file if split == "train" else cfg.eval_input_lines_file
    if lines_file is None and cfg.input_field is None:
        raise ValueError(f"DataConfig sets neither input_field nor {split}_input_lines_file")
    fields = [cfg.target_field, *([] if lines_file else [cfg.input_field]), *cfg.prompt_fields]
    dataset, locations, data_name = _load_dataset(cfg, split, fields)
    input_lines = None
    if lines_file:
        lines_path = _resolve(cfg, lines_file)
        input_lines = _read_input_lines(lines_path, len(dataset), data_name)
    records = []
    columns = dataset.select_columns(list(dict.fromkeys(fields))).to_dict()  # column-wise: fast
    for i, where in enumerate(locations):
        if input_lines is not None:
            input_text, input_where = normalise_text(input_lines[i]), f"{lines_path}:{i + 1} (input of {where})"
        else:
            parts = _as_texts(columns[cfg.input_field][i], cfg.input_field, where)
            input_text, input_where = cfg.input_join.join(parts), where
        if not input_text:
            raise ValueError(f"{input_where}: empty input")
        targets = _as_texts(columns[cfg.target_field][i], cfg.target_field, where)
        if not all(targets):
            raise ValueError(f"{where}: empty target (field {cfg.target_field!r})")
        extra = {f: cfg.input_join.join(_as_texts(columns[f][i], f, where)) for f in cfg.prompt_fields}
        records.append(Record(input_text, tuple(targets), extra, where))
    return records
