"""Shared pieces of the image-family tests (tests/test_image_*.py): small image folders, a
pipeline config for them, one trained digits model per test run and bad image files."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

from helpers import made_once_per_run

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "data" / "digits"
FAMILY = "image_classifier"


def copy_digits(dest: Path, split: str = "train", classes: tuple[int, ...] = (0, 1, 2),
                per_class: int = 12) -> Path:
    """A small ImageFolder: the first ``per_class`` digits of each of ``classes``."""
    for c in classes:
        (dest / str(c)).mkdir(parents=True, exist_ok=True)
        for f in sorted((DIGITS / split / str(c)).iterdir())[:per_class]:
            shutil.copy2(f, dest / str(c) / f.name)
    return dest


def pipeline_cfg(data: Path, test: Path | None = None, source: Path | None = None,
                 data_options: dict[str, Any] | None = None,
                 model_options: dict[str, Any] | None = None,
                 data_fields: dict[str, Any] | None = None, **sections: Any):
    """A PipelineConfig of the image family on ``data`` (a folder or manifest); ``data_fields``
    adds fields to the ``data:`` section, ``sections`` whole sections."""
    from pipelines.config import PipelineConfig

    raw: dict[str, Any] = {
        "name": "images", "registry": {"model_name": "images"},
        "data": {"path": str(data), "options": data_options or {},
                 **({"test_path": str(test)} if test else {}), **(data_fields or {})},
        "model": {"family": FAMILY, "options": model_options or {}},
        "tuning": {"max_epochs": 1, "search_space": {
            "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-3}}},
        **sections,
    }
    return PipelineConfig.from_dict(raw, source=source)


def png_bytes(size: tuple[int, int] = (8, 8), mode: str = "L", fmt: str = "PNG",
              value: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(buf, fmt)
    return buf.getvalue()


def bad_files() -> dict[str, bytes]:
    """Bad image files by case: each must be refused naming the file."""
    good = (DIGITS / "test" / "3").iterdir().__next__().read_bytes()
    return {
        "truncated.png": good[: len(good) // 2],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2,
        "text.png": b"this is a text file, not an image\n",
        "empty.png": b"",
        "bomb.png": png_bytes((3000, 3000)),  # 9 M pixels: over the tests' max_pixels
        "gif.png": png_bytes(fmt="GIF"),      # a real image in a format that is not accepted
    }


# -- one trained model per test run -------------------------------------------------------------
def digits_setup(folder: Path | None = None):
    """(family, dataset) of data/digits at 8x8 grayscale."""
    from pipelines.data import load_data, split_data
    from pipelines.families import load_family

    cfg = pipeline_cfg(DIGITS / "train", DIGITS / "test",
                       data_options={"image_size": 8, "channels": 1})
    family = load_family(cfg)
    return family, split_data(load_data(cfg.data, family), cfg.data)


def _train_digits(out: Path) -> None:
    family, data = digits_setup()
    trainer = family.trainer(data, {"learning_rate": 3e-3, "batch_size": 32}, seed=7)
    for _ in range(6):
        trainer.train_epoch()
    family.save(trainer.model, out)


def trained_digits(tmp_path_factory) -> Path:
    """The folder of a CNN trained on data/digits (8x8, 6 epochs; made once per test run)."""
    return made_once_per_run(tmp_path_factory, "image-digits-cnn", _train_digits)
