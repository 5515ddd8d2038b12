"""The image part of a pipeline file written by ``maas init`` (``data:``, ``model:``, ``tuning:``).

Sized for a few minutes on 2 CPU cores with the default CNN; every line says what it does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(Path(path).absolute(), base)


def init_settings(found: Any, test: Path | None, base: Path) -> list[str]:
    """YAML lines for a detected image source (``pipelines.init_detect.Detection``)."""
    data = ["data:", f"  path: {_rel(found.source, base)}          # relative to this file"]
    if found.kind == "manifest":
        data += [f"  format: {found.format}",
                 f"  header: {'true' if found.header else 'false'}",
                 f"  label_column: {json.dumps(str(found.label_column))}"]
    data += ([f"  test_path: {_rel(test, base)}"] if test is not None else
             ["  # test_path: held-out test source (none given: a seeded share of the data)"])
    n_train = found.rows if test is not None else int(found.rows * 0.8)
    # about 15k image passes per trial on 2 CPU cores (the digits: 1.4-4 s per epoch of 1,149)
    epochs = 12 if n_train <= 5000 else (6 if n_train <= 30000 else 2)
    batch = 32 if n_train <= 5000 else 64
    size = int(found.image_size or 28)
    return data + [
        "  split: {validation: 0.2, seed: 42}",
        "  options:",
        *([f"    path_column: {json.dumps(str(found.path_column))}   # image paths, relative "
           "to the manifest"] if found.kind == "manifest" else []),
        f"    channels: {int(found.channels or 3)}                       # 1 grayscale, 3 RGB",
        f"    image_size: {size}                    # images are resized to {size}x{size}",
        "",
        "model:",
        "  family: image_classifier",
        "  eval_batch_size: 256",
        "  options:",
        "    arch: cnn                            # conv 32 -> pool -> conv 64 -> pool -> dense"
        " (or resnet18)",
        "    augment_shift: 0                     # random shifts of up to N pixels (training)",
        "",
        "tuning:",
        "  n_trials: 3",
        f"  max_epochs: {epochs}",
        "  timeout_s: 420                        # no new trial after 7 minutes",
        "  sampler_seed: 42",
        "  pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 2}",
        "  search_space:",
        "    learning_rate: {type: float, low: 1.0e-3, high: 5.0e-3, log: true}",
        "    dense: {type: categorical, choices: [64, 128]}",
        "    dropout: {type: float, low: 0.0, high: 0.3}",
        "  fixed:",
        f"    batch_size: {batch}",
        "",
    ]
