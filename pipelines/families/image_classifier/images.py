"""Image files of a data source: safe decoding (limits before pixels), arrays and profiles.

The checks themselves live in ``bentos/image_classifier/maas_images.py`` (one implementation for
the pipeline and the service); here a bad file becomes a ``pipelines.data.DataError`` (exit 3)
naming it, and each decoded image becomes one cached :class:`ImageRecord`: its profile row and
its raw pixels (converted to the model's input size later, when channels and size are known).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bentos.image_classifier import maas_images

#: file name endings read as images (case-insensitive); other files in a class folder are refused
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: image files larger than this are refused without being read (bytes)
MAX_FILE_BYTES = 256 * 1024 * 1024
#: bad files named in one error message before "and N more"
MAX_NAMED = 5


@dataclass(frozen=True)
class ImageRecord:
    """One checked image: the profile facts and the decoded image (``PIL.Image.Image``)."""

    path: str
    format: str
    channels: int
    width: int
    height: int
    mean_intensity: float
    std_intensity: float
    image: Any


def read_image(path: Path, max_pixels: int) -> ImageRecord:
    """Check and decode one file (read once: the checks and the decoding see the same bytes);
    ``maas_images.ImageError`` naming it. A file over :data:`MAX_FILE_BYTES` is not read."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise maas_images.ImageTooLarge(f"{path}: {size} bytes is over {MAX_FILE_BYTES} "
                                            "bytes per image file")
        data = path.read_bytes()
    except OSError as exc:
        raise maas_images.ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    decoded = maas_images.decode(data, str(path), max_pixels)
    mean, std = maas_images.stats(decoded.image)
    return ImageRecord(path=str(path), format=decoded.format, channels=decoded.channels,
                       width=decoded.width, height=decoded.height, mean_intensity=mean,
                       std_intensity=std, image=decoded.image)


def read_images(paths: list[str], role: str, max_pixels: int) -> list[ImageRecord]:
    """Every file checked and decoded; one DataError naming the bad files (all of them counted,
    the first :data:`MAX_NAMED` named with the reason) before anything is trained."""
    from pipelines.data import DataError

    records, bad = [], []
    for p in paths:
        try:
            records.append(read_image(Path(p), max_pixels))
        except maas_images.ImageError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - MAX_NAMED} more)" if len(bad) > MAX_NAMED else ""
        raise DataError(f"data.{role}: {len(bad)} of {len(paths)} image files cannot be used"
                        f"{more}: " + "; ".join(bad[:MAX_NAMED]))
    return records


def to_array(record: ImageRecord, channels: int, size: int) -> Any:
    """The record's pixels as the model's float32 ``(channels, size, size)`` input."""
    return maas_images.to_array(record.image, channels, size)
