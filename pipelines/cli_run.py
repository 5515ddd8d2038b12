"""The pipeline-running ``maas`` commands: ``run``, ``tune`` (distributed tuning) and
``validate`` (the expectation-suite gate only), with the end-of-run summary they print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from pipelines.cli_common import DEFAULT_PIPELINE, EXIT_BUSY, EXIT_DATA, _errors, _fail


def _parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    from pipelines.config import ConfigError

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE (e.g. tuning.n_trials=1)")
        k, v = pair.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"--set {k.strip()}: cannot parse the value {v!r} ({problem}); "
                              "quote it or fix the YAML (e.g. a list is [1, 2])") from None
    return out


@click.command("run")
@click.argument("pipeline", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field by its dotted path (repeatable).")
@click.option("--no-build", is_flag=True, help="Skip packaging the champion as a bento.")
@click.option("--storage", help="Optuna RDB storage URL (default: optuna.db beside mlflow.db).")
@click.option("--trigger", default="manual", type=click.Choice(["manual", "schedule"]),
              help="Recorded on the run as maas.trigger; `schedule` (a scheduler's run) takes "
                   "no per-pipeline lock: the scheduler keeps runs apart.")
@click.option("--schedule-attempt", type=click.IntRange(1), hidden=True,
              help="Set by `maas schedule`: the attempt of this fire (tag maas.schedule_attempt).")
@click.option("--no-resume", is_flag=True, help="Never resume an unfinished run.")
@_errors
def run(pipeline: Path | None, overrides: tuple[str, ...], no_build: bool, storage: str | None,
        trigger: str, schedule_attempt: int | None, no_resume: bool) -> None:
    """Run a pipeline file end to end (default: the packaged sentiment pipeline)."""
    from pipelines.config import PipelineConfig
    from pipelines.run import run_pipeline
    from pipelines.scheduling import PipelineBusy, manual_run_lock

    cfg = PipelineConfig.load(pipeline or DEFAULT_PIPELINE, _parse_overrides(overrides))
    try:
        with manual_run_lock(cfg, trigger=trigger):
            result = run_pipeline(cfg, trigger=trigger, schedule_attempt=schedule_attempt,
                                  storage=storage, build=not no_build, resume=not no_resume)
    except PipelineBusy as exc:
        _fail(exc, EXIT_BUSY)
    click.echo(_summary(result))


def _summary(r) -> str:
    from pipelines.redact import redact

    lines = [
        "",
        f"MaaS pipeline {r.pipeline!r} finished in {r.seconds:.0f} s"
        + (" (resumed run)" if r.resumed else ""),
        (f"  MLflow run        {r.run_id}  (tracking: {redact(r.tracking_uri)}; "
         "`mlflow ui` to browse)"),
        (f"  data sha256       {r.data_fingerprint[:16]}...  validation: "
         f"{'passed' if r.validation_success else 'FAILED'}"),
        f"  Optuna study      {r.study_name}  best trial #{r.best_trial} {r.best_params}",
        "  test metrics      " + ", ".join(f"{k}={v:.4f}" for k, v in r.test_metrics.items()),
        f"  registered        {r.model_name} version {r.model_version} (alias challenger)",
        *([(f"  variant           {r.variant} ({r.variant_speedup:.2f}x fp32's speed; "
            "table in the run's compression/variants.md)")] if r.variant else []),
        f"  promoted          {'yes' if r.promoted else 'no'}: {r.decision_reason}",
        f"  champion          {r.model_name}@champion = version {r.champion_version}",
    ]
    if r.bento_tag:
        lines += [f"  bento             {r.bento_tag}",
                  f"  serve with        {r.serve_command}"]
    elif r.champion_version:
        lines += [(f"  bento             not rebuilt (champion unchanged); "
                   f"`maas build {r.model_name}@champion` packages it")]
    return redact("\n".join(lines))


@click.command("tune")
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--storage", required=True, envvar="MAAS_OPTUNA_STORAGE",
              help="Optuna RDB storage URL shared by all workers, e.g. postgresql://host/db.")
@click.option("--worker", is_flag=True,
              help="Only add trials to the running pipeline's study, then exit.")
@click.option("--run-id", help="Worker: the parent MLflow run to join (default: the newest "
                               "unfinished run of this pipeline on the same data).")
@click.option("--wait", "wait_s", default=600.0, show_default=True,
              help="Worker: seconds to wait for the coordinator's study to appear.")
@click.option("--seed", type=int, default=None,
              help="Worker: its TPE sampler seed (default: derived from the pid and clock, so "
                   "workers explore different parameters; give distinct seeds to reproduce).")
@click.option("--no-build", is_flag=True, help="Skip packaging the champion as a bento.")
@_errors
def tune(pipeline: Path, storage: str, worker: bool, run_id: str | None, wait_s: float,
         seed: int | None, no_build: bool) -> None:
    """Distributed tuning: many processes/machines share one Optuna study in an RDB storage.

    \b
    coordinator:  maas tune PIPELINE.yaml --storage postgresql://.../optuna
                  (the whole pipeline; it tunes too, then evaluates, registers, promotes)
    workers:      maas tune PIPELINE.yaml --storage postgresql://.../optuna --worker
    The trial budget (tuning.n_trials) is met exactly, whatever the number of workers.
    """
    from pipelines.config import PipelineConfig
    from pipelines.run import join_study, run_pipeline

    cfg = PipelineConfig.load(pipeline)
    if worker:
        name = join_study(cfg, storage, run_id=run_id, wait_s=wait_s, seed=seed)
        click.echo(f"worker done: study {name} has its {cfg.tuning.n_trials} trials")
        return
    result = run_pipeline(cfg, storage=storage, build=not no_build)
    click.echo(_summary(result))


@click.command("validate")
@click.argument("pipeline", required=False, type=click.Path(path_type=Path))
@_errors
def validate(pipeline: Path | None) -> None:
    """Check a pipeline's config and data against its expectation suite only (no MLflow run)."""
    from pipelines.config import PipelineConfig
    from pipelines.data import load_data
    from pipelines.families import load_family
    from validation import validate as gx_validate

    cfg = PipelineConfig.load(pipeline or DEFAULT_PIPELINE)
    family = load_family(cfg)
    raw = load_data(cfg.data, family)
    report = gx_validate(family.profile(raw.all_rows), cfg.validation.suite)
    click.echo(report.summary())
    if not report.success:
        sys.exit(EXIT_DATA)
