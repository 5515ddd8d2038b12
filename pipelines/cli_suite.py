"""The ``maas suite`` commands: ``maas suite init`` drafts a versioned expectation suite from a
pipeline's own data (taken as a trusted sample) and checks the data passes it."""

from __future__ import annotations

import os
from pathlib import Path

import click

from pipelines.cli_common import EXIT_DATA, _errors, _fail


@click.group("suite")
def suite() -> None:
    """Expectation suites: draft one from a pipeline's own data (`maas suite init`)."""


@suite.command("init")
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              help="Suite JSON to write (default: the path the pipeline's validation.suite "
                   "names, else <pipeline name>.suite.json beside the pipeline file).")
@click.option("--name", help="Suite name (default: the file name without .suite.json/.json).")
@click.option("--force", is_flag=True, help="Overwrite an existing suite file.")
@click.option("--pii", is_flag=True, help="Add the PII checks of validation.pii on `text`.")
@click.option("--share-tolerance", type=click.FloatRange(0, 1, max_open=True), default=0.5,
              show_default=True, help="Each class's share may move by this fraction of its "
                                      "observed share.")
@_errors
def suite_init(pipeline: Path, out: Path | None, name: str | None, force: bool, pii: bool,
               share_tolerance: float) -> None:
    """Draft a versioned GX suite from PIPELINE.yaml's data, taken as a trusted sample.

    \b
    Profiles exactly the rows `maas run` validates (loaded with the pipeline's own settings):
    label set, nulls, text length bounds, duplicate rate, per-class share bounds (+ PII with
    --pii); every expectation says why in its meta. Then checks the data passes the draft.
    Review the bounds before trusting the suite: see docs/suites.md.
    """
    import json

    from pipelines.config import ConfigError, PipelineConfig
    from pipelines.data import load_data
    from pipelines.families import load_family
    from validation import validate as gx_validate

    cfg = PipelineConfig.load(pipeline)
    target = (out or cfg.validation.suite_path
              or pipeline.parent / f"{cfg.name}.suite.json").expanduser().absolute()
    if target.exists() and not force:
        raise ConfigError(f"{target}: a suite already exists there; pass --force to overwrite "
                          "it, or --out to write elsewhere")
    family = load_family(cfg)
    raw = load_data(cfg.data, family)
    frame = family.profile(raw.all_rows)
    suite_name = name or target.name.removesuffix(".json").removesuffix(".suite")
    spec = _draft(frame, raw, suite_name, share_tolerance=share_tolerance, pii=pii)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w" if force else "x", encoding="utf-8") as fh:
        fh.write(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    click.echo(f"wrote suite {spec['name']!r} v{spec['meta']['version']} "
               f"({len(spec['expectations'])} expectations from {len(frame)} rows) to {target}")
    used = cfg.validation.suite_path
    if used is None or used.resolve() != target.resolve():
        rel = os.path.relpath(target, pipeline.absolute().parent)
        click.echo(f"{pipeline} still uses suite {cfg.validation.suite!r}; to use the draft, set "
                   f"in it:\n  validation:\n    suite: {rel}")
    report = gx_validate(frame, target)
    click.echo(report.summary())
    if not report.success:
        _fail(f"the draft fails on the data it was drafted from (see above; --pii finds personal "
              f"data in it?): edit {target} or clean the data", EXIT_DATA)


def _draft(frame, raw, suite_name: str, *, share_tolerance: float, pii: bool) -> dict:
    """The suite drafted from ``frame`` (of the loaded data ``raw``); failures as ConfigError or
    DataError."""
    from pipelines.config import ConfigError
    from pipelines.data import DataError
    from validation import ProfileError, draft_suite

    try:
        return draft_suite(frame, suite_name, share_tolerance=share_tolerance, pii=pii,
                           fingerprint=raw.fingerprint,
                           source=", ".join(Path(f).name for f in raw.files.values()))
    except ProfileError as exc:
        raise DataError(str(exc)) from None
    except ImportError as exc:  # --pii without validation.pii
        raise ConfigError(f"--pii: {exc}") from None
