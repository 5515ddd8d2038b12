"""Safe decoding of untrusted image files and their conversion to model input arrays.

Copied into every image bento beside ``service.py`` (which loads it from its own folder); the
pipeline's image family imports it as ``bentos.image_classifier.maas_images``. Pillow and numpy
only, no imports from the ``bentos`` package.

:func:`decode` checks an image in this order, each check before any pixel is decoded:

1. ``Image.open`` reads the header only: anything that is not PNG, JPEG, BMP or WebP is refused
   (``formats=`` restricts which decoders Pillow may even try);
2. width x height against ``max_pixels`` (a decompression bomb is refused from its header; the
   error is :class:`ImageTooLarge`);
3. ``verify()`` (checksums, truncated chunks), then the file is opened again (a verified image
   cannot be used) and fully decoded with ``load()``; ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays
   False, so a truncated file fails here.

Every failure is an :class:`ImageError` whose message names the image (``name``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: decoders Pillow may use on untrusted input
FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
#: default pixel limit per image (width x height): 4096 x 4096
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """An image that cannot be used; the message names it."""


class ImageTooLarge(ImageError):
    """An image whose header announces more pixels than allowed (refused before decoding)."""


@dataclass(frozen=True)
class Decoded:
    """One checked, fully decoded image (``image``: a loaded ``PIL.Image.Image``)."""

    image: Any
    format: str
    width: int
    height: int
    channels: int  # 1 (grayscale) or 3 (colour), after dropping alpha


def _pil() -> Any:
    from PIL import Image, ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone in this process switched it on: refuse to work
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; MaaS needs it False so "
                           "that truncated images are refused")
    return Image


def _source(data: bytes | Path) -> Any:
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data


def decode(data: bytes | Path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Check and decode one image (bytes or a file path); :class:`ImageError` naming ``name``."""
    Image = _pil()
    fmt, width, height = "image", 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(_source(data), formats=FORMATS) as head:
                fmt, (width, height) = head.format, head.size
                _check_size(name, width, height, max_pixels)
                head.verify()
            img = Image.open(_source(data), formats=FORMATS)
            img.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"{name}: image is too large ({exc})") from None
        except Image.UnidentifiedImageError:
            raise ImageError(f"{name}: not a PNG, JPEG, BMP or WebP image") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise ImageError(f"{name}: corrupt or truncated {fmt} image "
                             f"({type(exc).__name__}: {exc})") from None
    if (img.format, img.size) != (fmt, (width, height)):
        raise ImageError(f"{name}: the file changed while it was read")
    return Decoded(image=img, format=fmt, width=width, height=height,
                   channels=1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3)


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{name}: {width}x{height} = {width * height} pixels is over "
                            f"max_pixels={max_pixels}")


def to_array(image: Any, channels: int, size: int) -> Any:
    """A decoded image as a float32 ``(channels, size, size)`` array in [0, 1]: alpha dropped
    (composited on black), converted to grayscale (``L``) or RGB, resized with bilinear filtering
    when it is not ``size`` x ``size`` already."""
    import numpy as np

    Image = _pil()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return arr[None, :, :] if channels == 1 else arr.transpose(2, 0, 1).copy()


def stats(image: Any) -> tuple[float, float]:
    """Mean and standard deviation of the grayscale intensity (0..255) of a decoded image."""
    import numpy as np

    arr = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.float32)
    return float(arr.mean()), float(arr.std())
