"""What `maas init` detects in a data source: the family, the columns, the labels, image channels
and size, each choice with the reason it was made (a frozen :class:`Detection`).

Reads headers and a bounded sample only (image files: the header, never the pixels). Ambiguous
data raises :class:`pipelines.config.ConfigError` naming the candidates and the flag that
settles the choice.
"""

from __future__ import annotations

import csv
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".tab": "tsv",
                 ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
LABEL_NAMES = ("label", "labels", "class", "target", "y", "category", "sentiment")
MAX_CLASSES = 100          # more distinct values than this: not a label column
SAMPLE_IMAGES = 2000       # image headers read to tell channels and size
MAX_SIZE_SPREAD = 4.0      # largest / smallest side beyond this: --image-size must settle it


@dataclass(frozen=True)
class Detection:
    """What a data source looks like to `maas init`."""

    family: str                          # "text_classifier" | "image_classifier"
    source: Path                         # the training data (file or folder)
    kind: str                            # "table" | "image_folder" | "manifest"
    rows: int                            # rows / images in the training source
    classes: tuple[str, ...]             # label values as text, sorted
    format: str | None = None            # table format (csv, tsv, parquet, jsonl)
    header: bool = True
    text_column: str | int | None = None
    label_column: str | int | None = None
    path_column: str | None = None       # manifest: the column of image paths
    channels: int | None = None          # images: 1 (grayscale) or 3 (colour)
    image_size: int | None = None        # images: the side images are resized to
    text_chars_p95: int | None = None    # text: 95th percentile of characters per text
    reasons: tuple[str, ...] = field(default_factory=tuple)  # each choice, said once


def detect(data: Path, *, text_column: str | None = None, label_column: str | None = None,
           image_size: int | None = None) -> Detection:
    """The family and settings for ``data`` (a table file or an image folder)."""
    if not data.exists():
        raise ConfigError(f"DATA: {data} does not exist")
    if data.is_dir():
        return _image_folder(data, image_size)
    fmt = TABLE_FORMATS.get(data.suffix.lower())
    if fmt is None:
        raise ConfigError(f"DATA: cannot tell the format of {data.name} (known: "
                          f"{', '.join(sorted(TABLE_FORMATS))}, or an image folder)")
    frame, header = read_sample(data, fmt)
    path_col = _path_column(frame, data.parent)
    if path_col is not None:
        return _manifest(data, fmt, header, frame, path_col, label_column, image_size)
    return _text_table(data, fmt, header, frame, text_column, label_column)


# -- tables ------------------------------------------------------------------------------------
def read_sample(path: Path, fmt: str) -> tuple[pd.DataFrame, bool]:
    """The whole table as strings (header detected for csv/tsv) and whether it has a header."""
    try:
        if fmt == "parquet":
            return pd.read_parquet(path), True
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False), True
        sep = "," if fmt == "csv" else "\t"
        quoting = csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE
        head = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=object,
                           quoting=quoting, keep_default_na=False)
        header = _looks_like_header(list(head.iloc[0]))
        frame = pd.read_csv(path, sep=sep, header=0 if header else None, dtype=object,
                            quoting=quoting, keep_default_na=False, na_values=[""])
        return frame, header
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ConfigError(f"DATA: cannot read {path} as {fmt}: {exc}") from None


def _looks_like_header(first_row: list[Any]) -> bool:
    """A first row of short, non-numeric, distinct names is a header; data otherwise."""
    names = [str(v).strip() for v in first_row]
    if len(set(names)) != len(names) or any(not n or len(n) > 64 for n in names):
        return False
    return not any(_is_number(n) for n in names)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _label_candidates(frame: pd.DataFrame, exclude: set) -> list[tuple[Any, int]]:
    """Columns that can be labels: 2..MAX_CLASSES distinct values, fewer than half the rows,
    no missing values; (column, number of classes)."""
    out = []
    for col in frame.columns:
        if col in exclude:
            continue
        values = frame[col]
        k = values.nunique(dropna=True)
        if values.notna().all() and 2 <= k <= min(MAX_CLASSES, max(2, len(frame) // 2)):
            out.append((col, k))
    return out


def _choose_label(frame: pd.DataFrame, exclude: set, forced: Any, flag_hint: str
                  ) -> tuple[Any, str]:
    if forced is not None:
        col = _existing(frame, forced, "--label-column")
        return col, f"label column {col!r}: given by --label-column"
    cands = _label_candidates(frame, exclude)
    if not cands:
        raise ConfigError(f"no label column found: no column has between 2 and {MAX_CLASSES} "
                          f"distinct values without gaps (columns: "
                          f"{[str(c) for c in frame.columns]}); pass --label-column")
    if len(cands) == 1:
        col, k = cands[0]
        return col, f"label column {col!r}: the only column with few distinct values ({k})"
    named = [(c, k) for c, k in cands if str(c).strip().lower() in LABEL_NAMES]
    if len(named) == 1:
        col, k = named[0]
        others = ", ".join(repr(c) for c, _ in cands if c != col)
        return col, (f"label column {col!r} ({k} classes): named like a label; also possible: "
                     f"{others} (--label-column to choose another)")
    listed = ", ".join(f"{c!r} ({k} values)" for c, k in cands)
    raise ConfigError(f"two or more candidate label columns: {listed}; pass --label-column "
                      f"NAME to choose one{flag_hint}")


def _existing(frame: pd.DataFrame, name: str, flag: str) -> Any:
    for col in frame.columns:
        if str(col) == str(name):
            return col
    raise ConfigError(f"{flag}: no column {name!r}; columns: {[str(c) for c in frame.columns]}")


def _text_table(data: Path, fmt: str, header: bool, frame: pd.DataFrame,
                text_column: str | None, label_column: str | None) -> Detection:
    reasons = [f"{data.name}: {fmt}, " + ("with a header row" if header else
               "no header row (the first row holds data): columns by position")]
    if text_column is not None:
        text = _existing(frame, text_column, "--text-column")
        reasons.append(f"text column {text!r}: given by --text-column")
    else:
        text, why = _choose_text(frame)
        reasons.append(why)
    label, why = _choose_label(frame, {text}, label_column, "")
    reasons.append(why)
    texts = frame[text].dropna().astype(str)
    p95 = int(texts.str.len().quantile(0.95)) if len(texts) else 0
    classes = tuple(sorted({str(v).strip() for v in frame[label].dropna()}))
    return Detection("text_classifier", data, "table", len(frame), classes, fmt, header,
                     _plain(text), _plain(label), text_chars_p95=p95, reasons=tuple(reasons))


def _choose_text(frame: pd.DataFrame) -> tuple[Any, str]:
    """The column of free text: strings, mostly distinct, the longest on average."""
    scored = []
    for col in frame.columns:
        values = frame[col].dropna()
        if len(values) == 0 or not all(isinstance(v, str) for v in values.head(200)):
            continue
        if values.head(200).map(_is_number).mean() > 0.5:
            continue
        distinct = values.nunique() / len(values)
        if distinct >= 0.5:
            scored.append((values.str.len().mean(), distinct, col))
    if not scored:
        raise ConfigError("no text column found (a column of mostly distinct strings); "
                          f"columns: {[str(c) for c in frame.columns]}; pass --text-column")
    scored.sort(reverse=True)
    best = scored[0]
    if len(scored) > 1 and scored[1][0] > 0.5 * best[0]:
        listed = ", ".join(f"{c!r} (mean {m:.0f} chars)" for m, _, c in scored)
        raise ConfigError(f"two or more candidate text columns: {listed}; pass --text-column "
                          "NAME to choose one")
    return best[2], (f"text column {best[2]!r}: the longest free text (mean {best[0]:.0f} "
                     f"chars, {best[1]:.0%} distinct)")


def _plain(col: Any) -> str | int:
    """Column name as the pipeline file takes it: its name, or its position when unnamed."""
    return int(col) if isinstance(col, int) or (hasattr(col, "__index__")
                                                 and not isinstance(col, str)) else str(col)


# -- images ------------------------------------------------------------------------------------
def _path_column(frame: pd.DataFrame, base: Path) -> Any | None:
    """The column whose values are image file paths (relative to the manifest), if any."""
    for col in frame.columns:
        values = frame[col].dropna().astype(str).head(200)
        if len(values) and values.str.lower().str.endswith(IMAGE_SUFFIXES).mean() >= 0.9:
            return col
    return None


def _manifest(data: Path, fmt: str, header: bool, frame: pd.DataFrame, path_col: Any,
              label_column: str | None, image_size: int | None) -> Detection:
    if not header:
        raise ConfigError(f"{data.name}: an image manifest needs a header row naming its path "
                          "and label columns")
    missing = [p for p in frame[path_col].astype(str).head(50) if not (data.parent / p).is_file()]
    if missing:
        raise ConfigError(f"{data.name}: column {path_col!r} holds image paths, but "
                          f"{missing[0]!r} is not a file relative to {data.parent}")
    label, why = _choose_label(frame, {path_col}, label_column, "")
    files = [data.parent / p for p in frame[path_col].astype(str)]
    channels, size, img_reasons = _image_facts(files, image_size)
    classes = tuple(sorted({str(v).strip() for v in frame[label]}))
    reasons = (f"{data.name}: a {fmt} manifest: column {path_col!r} holds image paths",
               why, *img_reasons)
    return Detection("image_classifier", data, "manifest", len(frame), classes, fmt, True,
                     label_column=str(label), path_column=str(path_col), channels=channels,
                     image_size=size, reasons=reasons)


def image_files(folder: Path) -> dict[str, list[Path]]:
    """Class name -> its image files, for an image folder (one subfolder per class)."""
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            out[sub.name] = files
    return out


def _image_folder(folder: Path, image_size: int | None) -> Detection:
    classes = image_files(folder)
    if len(classes) < 2:
        raise ConfigError(f"DATA: {folder} is a folder but not an image folder: it needs one "
                          f"subfolder per class with image files ({', '.join(IMAGE_SUFFIXES)}) "
                          f"in at least two of them; found {len(classes)}")
    files = [f for fs in classes.values() for f in fs]
    channels, size, img_reasons = _image_facts(files, image_size)
    counts = ", ".join(f"{k}: {len(v)}" for k, v in list(classes.items())[:12])
    reasons = (f"{folder.name}/: an image folder, {len(classes)} classes from its subfolders "
               f"({counts}{', ...' if len(classes) > 12 else ''})", *img_reasons)
    return Detection("image_classifier", folder, "image_folder", len(files),
                     tuple(sorted(classes)), channels=channels, image_size=size,
                     reasons=reasons)


def _image_facts(files: list[Path], forced_size: int | None) -> tuple[int, int, list[str]]:
    """Channels and target side from the headers of up to SAMPLE_IMAGES files."""
    from PIL import Image, UnidentifiedImageError

    step = max(1, len(files) // SAMPLE_IMAGES)
    modes: Counter[str] = Counter()
    sizes: Counter[tuple[int, int]] = Counter()
    for f in files[::step]:
        try:
            with Image.open(f) as img:  # the header only
                modes[img.mode] += 1
                sizes[img.size] += 1
        except (UnidentifiedImageError, OSError) as exc:
            raise ConfigError(f"{f}: not a readable image ({exc})") from None
    gray = sum(n for m, n in modes.items() if m in ("1", "L", "LA", "I", "I;16", "F"))
    channels = 1 if gray == sum(modes.values()) else 3
    mode_text = ", ".join(f"{m} x{n}" for m, n in modes.most_common(4))
    reasons = [f"channels {channels}: image modes in {sum(modes.values())} headers read: "
               f"{mode_text}"]
    sides = [s for wh in sizes.elements() for s in wh]
    spread = max(sides) / max(1, min(sides))
    if forced_size is not None:
        reasons.append(f"image_size {forced_size}: given by --image-size")
        return channels, forced_size, reasons
    if spread > MAX_SIZE_SPREAD:
        raise ConfigError(f"mixed image sizes: sides from {min(sides)} to {max(sides)} px "
                          f"(more than {MAX_SIZE_SPREAD:g}x apart); pass --image-size N to "
                          "resize every image to N x N")
    (w, h), n = sizes.most_common(1)[0]
    size = int(statistics.median(sides)) if len(sizes) > 1 else max(w, h)
    reasons.append(f"image_size {size}: " + (f"every image is {w}x{h}" if len(sizes) == 1
                   else f"median side of {len(sizes)} different sizes (most common {w}x{h}, "
                        f"{n} images)"))
    return channels, size, reasons
