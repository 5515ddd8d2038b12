"""Image data sources: an image folder or a manifest table, read into rows ``(path, label)``.

- **Image folder** (torchvision's ImageFolder layout): one sub-folder per class, the folder name
  is the label (all-digit names become integers); images anywhere below a class folder. Hidden
  files (``.name``) are skipped; any other file that does not end in .png/.jpg/.jpeg/.bmp/.webp is
  refused, naming it (a stray file is more likely a mistake than something to ignore).
- **Manifest**: a CSV/TSV/Parquet/JSONL table (``data.format``) with a path column
  (``data.options.path_column``, default ``path``; paths relative to the manifest's folder) and
  the label column ``data.label_column``.

Paths in the rows are absolute. :func:`fingerprint_sources` hashes each source's listing (paths
relative to the source, labels) and every image's bytes, so a folder fingerprints like a file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from pipelines.families.image_classifier.images import IMAGE_SUFFIXES


def _data_error(msg: str) -> Exception:
    from pipelines.data import DataError

    return DataError(msg)


def read_source(path: Path, role: str, data_cfg, path_column: str) -> pd.DataFrame:
    """The rows ``(path, label)`` of one source (folder or manifest); DataError naming the
    file, folder or row."""
    path = Path(path).expanduser()
    if path.is_dir():
        return read_folder(path, role)
    return read_manifest(path, role, data_cfg, path_column)


def read_folder(root: Path, role: str) -> pd.DataFrame:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise _data_error(f"data.{role}: {root} has no class folders (expected one sub-folder "
                          "per class with the images inside, e.g. cats/001.png)")
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        raise _data_error(f"data.{role}: {root} has files outside the class folders: "
                          f"{', '.join(stray[:5])}; put each image in its class's folder")
    paths, labels = [], []
    for folder in classes:
        files = sorted(p for p in folder.rglob("*")
                       if p.is_file() and not any(part.startswith(".")
                                                  for part in p.relative_to(folder).parts))
        if not files:
            raise _data_error(f"data.{role}: class folder {folder} has no images")
        for f in files:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                raise _data_error(f"data.{role}: {f} is not an image file (expected "
                                  f"{'/'.join(IMAGE_SUFFIXES)})")
            paths.append(str(f.resolve()))
            labels.append(folder.name)
    return _rows(paths, pd.Series(labels, dtype=object))


def read_manifest(path: Path, role: str, data_cfg, path_column: str) -> pd.DataFrame:
    from pipelines.data import column, read_frame

    df = read_frame(path, data_cfg, role)
    paths = column(df, path_column, "options.path_column", path)
    labels = column(df, data_cfg.label_column, "label_column", path)
    base = path.resolve().parent
    out = []
    for row, value in enumerate(paths.tolist(), start=2 if data_cfg.header else 1):
        if not isinstance(value, str) or not value.strip():
            raise _data_error(f"data.{role}: {path} line {row}: column {path_column!r} has no "
                              "image path")
        image = (base / value.strip()).resolve()
        if not image.is_file():
            raise _data_error(f"data.{role}: {path} line {row}: image file not found: {image}")
        out.append(str(image))
    if labels.isna().any():
        row = int(labels.isna().to_numpy().argmax()) + (2 if data_cfg.header else 1)
        raise _data_error(f"data.{role}: {path} line {row}: column "
                          f"{data_cfg.label_column!r} has no label")
    return _rows(out, labels)


def _rows(paths: list[str], labels: pd.Series) -> pd.DataFrame:
    from pipelines.data import normalise_labels

    return pd.DataFrame({"path": paths, "label": normalise_labels(labels).values})


def fingerprint_sources(files: dict[str, Path], rows: dict[str, pd.DataFrame]) -> str:
    """sha256 over each role's source: its rows (paths relative to the source's folder, labels)
    and the bytes of every image, in row order."""
    h = hashlib.sha256()
    for role in sorted(files):
        src = Path(files[role]).expanduser().resolve()
        base = src if src.is_dir() else src.parent
        h.update(role.encode() + b"\0")
        for p, label in zip(rows[role].path, rows[role].label, strict=True):
            h.update(f"{Path(p).relative_to(base) if Path(p).is_relative_to(base) else p}"
                     f"\0{label}\0".encode())
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
