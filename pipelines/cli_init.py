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
    body = _family_settings(found, test, base)
    return "\n".join(lines + body + _common(found, name, suite)) + "\n"


def _family_settings(found, test: Path | None, base: Path) -> list[str]:
    """The family's own lines (``Family.init_settings``): data, model, tuning."""
    from pipelines.config import ConfigError
    from pipelines.families import family_class

    settings = family_class(found.family).init_settings
    if settings is None:
        raise ConfigError(f"family {found.family!r} cannot be set up by maas init")
    return settings(found, test, base)


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
