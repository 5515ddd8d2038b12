"""The ``maas schedule`` click command: check the pipeline files, then list (``--list``), export
(``--export k8s``) or run the scheduler until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from pipelines.cli_common import EXIT_CONFIG, _errors, _fail
from pipelines.scheduling.cron import ScheduleError, build_trigger
from pipelines.scheduling.k8s import DEFAULT_IMAGE, export_k8s
from pipelines.scheduling.records import resolve_db

log = logging.getLogger(__name__)

NO_RETRY_DEFAULT = "2,3"  # config/usage errors and data-validation failures won't fix themselves


def _codes(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.replace(" ", "").split(",") if x})
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated exit codes, e.g. 2,3") from None


def _load(pipelines: tuple[Path, ...]) -> list[tuple[Path, Any]]:
    from pipelines.config import PipelineConfig

    items, seen = [], {}
    for p in pipelines:
        cfg = PipelineConfig.load(p)
        if cfg.name in seen:
            raise ScheduleError(f"{p} and {seen[cfg.name]} are both pipeline {cfg.name!r}; "
                                "one job per pipeline name")
        seen[cfg.name] = p
        if cfg.schedule:
            try:
                build_trigger(cfg.schedule)  # fail at start, naming the file
            except ScheduleError as exc:
                raise ScheduleError(f"{p}: {exc}") from None
        items.append((p, cfg))
    return items


def _export(items: list[tuple[Path, Any]], output: Path | None, **settings: Any) -> None:
    if not items:
        raise ScheduleError("--export k8s needs at least one PIPELINE file")
    text = export_k8s(items, **settings)
    if output:
        output.write_text(text)
        click.echo(f"wrote {len(items)} CronJob(s) to {output}", err=True)
    else:
        click.echo(text, nl=False)


def _serve(items: list[tuple[Path, Any]], db_url: str, **settings: Any) -> int:
    from pipelines.scheduling.service import ServeOptions, serve

    if not items:
        raise ScheduleError("give at least one PIPELINE file to schedule")
    if not any(c.schedule for _, c in items):
        raise ScheduleError("none of the pipelines has a `schedule` (a cron string)")
    for p, c in items:
        if not c.schedule:
            log.warning("%s (%s) has no schedule: not scheduled", c.name, p)
    return serve(items, db_url, ServeOptions(**settings))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("pipelines", nargs=-1, type=click.Path(path_type=Path))
@click.option("--list", "list_", is_flag=True,
              help="Print next fire times and last outcomes; don't start the scheduler.")
@click.option("--last", default=5, show_default=True, metavar="N",
              help="--list: how many recent fires to show per pipeline.")
@click.option("--export", type=click.Choice(["k8s"]),
              help="Write Kubernetes CronJob manifests instead of scheduling.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="--export: the file to write (default: stdout).")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True,
              help="--export: the container image with maas installed.")
@click.option("--db", metavar="URL",
              help="Database for the scheduler's tables (default: the pipelines' MLflow "
                   "tracking database).")
@click.option("--timezone", "tz", default="UTC", show_default=True,
              help="Time zone the cron schedules are read in.")
@click.option("--retries", default=2, show_default=True, type=click.IntRange(0),
              help="Retries of a failed run (not for exit codes in --no-retry-exit-codes).")
@click.option("--retry-backoff", "backoff_s", default=30.0, show_default=True,
              type=click.FloatRange(0), help="Seconds before the first retry; doubles each time.")
@click.option("--no-retry-exit-codes", "no_retry", default=NO_RETRY_DEFAULT, show_default=True,
              help="Exit codes that are never retried (2 config/usage, 3 data validation).")
@click.option("--misfire-grace", "misfire_grace_s", default=3600, show_default=True,
              type=click.IntRange(1),
              help="A fire missed while down runs once at start-up if at most this many "
                   "seconds late; else it is skipped.")
@click.option("--shutdown-grace", "shutdown_grace_s", default=30.0, show_default=True,
              type=click.FloatRange(0),
              help="On SIGTERM/SIGINT: seconds between SIGTERM and SIGKILL for a running child.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
              help="Stop an attempt running longer than this many seconds (counts as a failure).")
@click.option("--run-now", is_flag=True,
              help="Fire every pipeline once at start-up, then follow the schedule.")
@click.option("--command", "command", hidden=True,
              help="Testing: run this instead of `maas run PIPELINE --trigger schedule "
                   "--schedule-attempt N` ({pipeline}, {name}, {python}, {attempt}, "
                   "{fire_time} are substituted).")
@_errors
def schedule_command(pipelines: tuple[Path, ...], list_: bool, last: int, export: str | None,
                     output: Path | None, image: str, db: str | None, tz: str, retries: int,
                     backoff_s: float, no_retry: str, misfire_grace_s: int,
                     shutdown_grace_s: float, timeout_s: float | None, run_now: bool,
                     command: str | None) -> None:
    """Run pipelines on the cron schedules in their files (one long-lived process).

    \b
    maas schedule A.yaml [B.yaml ...]       run until SIGTERM/Ctrl-C
    maas schedule --list [A.yaml ...]       next fire times and recent outcomes
    maas schedule --export k8s A.yaml -o cronjob.yaml
    Each fire is `maas run PIPELINE --trigger schedule` in a child process. Never two runs
    of one pipeline at once; failed runs are retried with exponential backoff (exit codes
    2 and 3 are not); missed fires are coalesced into one catch-up run within the misfire
    grace. Jobs and outcomes live in the MLflow tracking database (tables
    maas_scheduler_jobs, maas_schedule_runs). See docs/scheduling.md.
    """
    try:
        codes = _codes(no_retry)
        build_trigger("* * * * *", tz)  # the time zone is known
        items = _load(pipelines)
        if export:
            _export(items, output, image=image, tz=tz, retries=retries,
                    misfire_grace_s=misfire_grace_s, no_retry=codes, timeout_s=timeout_s)
            return
        db_url = resolve_db([c for _, c in items], db)
        if list_:
            from pipelines.scheduling.jobs import list_jobs

            click.echo(list_jobs(items, db_url, last))
            return
        sys.exit(_serve(items, db_url, retries=retries, backoff_s=backoff_s,
                        no_retry=frozenset(codes), misfire_grace_s=misfire_grace_s,
                        shutdown_grace_s=shutdown_grace_s, timeout_s=timeout_s, tz=tz,
                        command=command, run_now=run_now))
    except (ScheduleError, click.BadParameter) as exc:  # the rest: the shared mapping (_errors)
        _fail(exc.format_message() if isinstance(exc, click.ClickException) else exc,
              EXIT_CONFIG)
