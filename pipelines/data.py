"""Load, fingerprint and split the pipeline's labelled data (any family).

The family reads each source into rows (:meth:`pipelines.families.base.Family.read`): a frame with
the family's columns and ``label`` (the label values as read: strings or integers). Class names
and ids are derived once, in :class:`Dataset`. :func:`read_frame`, :func:`column` and
:func:`normalise_labels` are helpers for families whose sources are tables (CSV/TSV/Parquet/JSONL).
"""

from __future__ import annotations

import csv
import hashlib
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipelines.config import DataConfig

if TYPE_CHECKING:
    from pipelines.families.base import Family


class DataError(ValueError):
    """Data that cannot be read or split; the message names the file, column or row."""


@dataclass
class Dataset:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    fingerprint: str
    files: dict[str, str] = field(default_factory=dict)  # role -> path
    label_names: dict[object, str] = field(default_factory=dict)

    @property
    def classes(self) -> list[object]:
        """Raw label values in a stable order (sorted); class id = position in this list."""
        values = pd.concat([self.train.label, self.validation.label, self.test.label]).unique()
        return sorted(values.tolist(), key=lambda v: (str(type(v)), v))

    @property
    def id2label(self) -> dict[int, str]:
        return {i: self.label_names.get(v, str(v)) for i, v in enumerate(self.classes)}

    def names(self, df: pd.DataFrame) -> list[str]:
        """The label names of a frame's rows."""
        return [self.label_names.get(v, str(v)) for v in df.label.tolist()]

    def ids(self, df: pd.DataFrame) -> list[int]:
        index = {v: i for i, v in enumerate(self.classes)}
        return [index[v] for v in df.label.tolist()]


def fingerprint_files(paths: dict[str, Path]) -> str:
    """sha256 over the roles and the bytes of every input file (streamed)."""
    h = hashlib.sha256()
    for role in sorted(paths):
        h.update(role.encode() + b"\0")
        with open(paths[role], "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def check_regular_file(path: Path, role: str) -> None:
    """DataError unless ``path`` is a readable regular file; the message says what it is."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"data.{role}: file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"data.{role}: cannot access {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"data.{role}: {path} is a directory; give the data file inside it")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                                             (stat.S_ISCHR, "character device"),
                                             (stat.S_ISBLK, "block device")) if test(mode)),
                    "special file")
        raise DataError(f"data.{role}: {path} is not a regular file ({kind})")


def read_frame(path: Path, cfg: DataConfig, role: str) -> pd.DataFrame:
    """One table file as read (all its columns); raises DataError naming the file."""
    check_regular_file(path, role)
    fmt = cfg.format
    if fmt == "auto":
        suffix = "".join(path.suffixes[-1:]).lower()
        fmt = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet",
               ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "")
        if not fmt:
            raise DataError(f"data.format: cannot tell the format of {path.name}; set data.format")
    header = 0 if cfg.header else None
    try:
        if fmt == "csv":
            df = pd.read_csv(path, header=header, keep_default_na=False, na_values=[""],
                             dtype=object)
        elif fmt == "tsv":
            # QUOTE_NONE: quotes inside sentences are text, not field delimiters (see data README)
            df = pd.read_csv(path, sep="\t", header=header, quoting=csv.QUOTE_NONE,
                             keep_default_na=False, dtype=object)
        elif fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_json(path, lines=True, dtype=False)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"data.{role}: cannot read {path} as {fmt}: {exc}") from None
    if len(df) == 0:
        raise DataError(f"data.{role}: {path} has no data rows")
    return df


def read_table(path: Path, cfg: DataConfig, role: str) -> pd.DataFrame:
    """Read one file into a (text, label) frame; raises DataError naming file and column."""
    df = read_frame(path, cfg, role)
    text = column(df, cfg.text_column, "text_column", path)
    label = column(df, cfg.label_column, "label_column", path)
    return pd.DataFrame({"text": text.values, "label": normalise_labels(label).values})


def column(df: pd.DataFrame, col: str | int, field_name: str, path: Path) -> pd.Series:
    if isinstance(col, int) and col not in df.columns:
        if col >= df.shape[1]:
            raise DataError(
                f"data.{field_name}: position {col} is out of range; {path.name} has "
                f"{df.shape[1]} columns"
            )
        return df.iloc[:, col]
    if col not in df.columns:
        raise DataError(
            f"data.{field_name}: unknown column {col!r} in {path.name}; columns: "
            f"{[str(c) for c in df.columns]}"
        )
    return df[col]


def normalise_labels(s: pd.Series) -> pd.Series:
    """Label values: integers stay integers ("1" from a CSV becomes 1); anything else stays as
    read."""
    if s.dtype == object:
        stripped = s.map(lambda v: v.strip() if isinstance(v, str) else v)
        as_int = pd.to_numeric(stripped, errors="coerce")
        if as_int.notna().all() and (as_int == as_int.round()).all():
            return as_int.astype("int64")
        return stripped
    if pd.api.types.is_float_dtype(s) and s.notna().all() and (s == s.round()).all():
        return s.astype("int64")
    return s


@dataclass
class RawData:
    """The files as read, before splitting: what the validation gate sees."""

    frames: dict[str, pd.DataFrame]  # role ("path", "validation_path", "test_path") -> frame
    files: dict[str, str]
    fingerprint: str

    @property
    def all_rows(self) -> pd.DataFrame:
        return pd.concat([f.assign(source=r) for r, f in self.frames.items()], ignore_index=True)


def load_data(cfg: DataConfig, family: Family | None = None) -> RawData:
    """Read the configured sources into rows (``family.read``; None: a text table) and
    fingerprint them (``family.fingerprint``; None: :func:`fingerprint_files`)."""
    files = {"path": cfg.path}
    if cfg.validation_path:
        files["validation_path"] = cfg.validation_path
    if cfg.test_path:
        files["test_path"] = cfg.test_path
    read: Callable[[Path, str], pd.DataFrame] = (
        family.read if family is not None else (lambda p, role: read_table(p, cfg, role)))
    frames = {role: read(p, role) for role, p in files.items()}
    if cfg.max_rows is not None:
        frames["path"] = frames["path"].iloc[: cfg.max_rows]
    fingerprint = family.fingerprint(files) if family is not None else fingerprint_files(files)
    return RawData(frames, {k: str(v) for k, v in files.items()}, fingerprint)


def split_data(raw: RawData, cfg: DataConfig) -> Dataset:
    """Seeded, stratified split of what the config does not give as its own file."""
    source = raw.frames["path"]
    test = raw.frames.get("test_path")
    if test is None:
        source, test = _split(source, cfg.split.test, cfg.split.seed, "test")
    validation = raw.frames.get("validation_path")
    if validation is None:
        source, validation = _split(source, cfg.split.validation, cfg.split.seed, "validation")
    names = {k: str(v) for k, v in (cfg.label_names or {}).items()}
    # YAML keys may be ints while the file gives strings or the other way round: match both.
    names.update({str(k): v for k, v in list(names.items())})
    return Dataset(
        train=source.reset_index(drop=True),
        validation=validation.reset_index(drop=True),
        test=test.reset_index(drop=True),
        fingerprint=raw.fingerprint,
        files=raw.files,
        label_names=names,
    )


def _split(df: pd.DataFrame, share: float, seed: int,
           what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    labels = df.label
    stratify = labels if labels.notna().all() and labels.value_counts().min() >= 2 else None
    try:
        a, b = train_test_split(df, test_size=share, random_state=seed, stratify=stratify)
    except ValueError as exc:
        raise DataError(f"data.split.{what}: cannot split {len(df)} rows: {exc}") from None
    return a, b
