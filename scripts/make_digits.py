"""Write scikit-learn's bundled handwritten digits as PNG files in an ImageFolder layout.

    python scripts/make_digits.py [OUT]        # default: data/digits

Writes ``OUT/train/<digit>/<index>.png`` and ``OUT/test/<digit>/<index>.png``: the 1,797 8x8
grayscale images of ``sklearn.datasets.load_digits()`` (pixel values 0..16 scaled to 0..255),
split 80/20, stratified by digit, with a fixed seed. ``<index>`` is the image's row in the
scikit-learn data set. The output is the same bytes on every run (no timestamps in the PNGs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

SEED = 20261204
TEST_SIZE = 0.2


def write_digits(out: Path) -> dict[str, int]:
    """The PNG files under ``out``; returns the number of images per split."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    index = np.arange(len(images))
    train, test = train_test_split(index, test_size=TEST_SIZE, random_state=SEED,
                                   stratify=digits.target)
    counts = {}
    for split, rows in (("train", train), ("test", test)):
        for i in sorted(rows):
            folder = out / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png", optimize=True)
        counts[split] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="data/digits", type=Path)
    args = parser.parse_args()
    counts = write_digits(args.out)
    print(f"wrote {counts['train']} train and {counts['test']} test images under {args.out}")


if __name__ == "__main__":
    main()
