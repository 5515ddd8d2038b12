"""The ``maas`` command group: handlers and library verbosity are set here, and the commands,
one function each, are added from their modules (``cli_run``: run/tune/validate,
``cli_registry``: promote/rollback/models/card/build, ``cli_suite``, ``cli_webhook``,
``scheduling.cli``); ``cli_common`` holds the exit codes and the error mapping they share.

Exit codes: 0 ok, 1 unexpected error, 2 bad config or arguments, 3 bad data (incl. the GX gate),
4 registry refused (unknown model/version, nothing to roll back to, permission denied on the
tracking server), 5 already running. Every message is passed through ``pipelines.redact``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

# re-exported: scripts and tests import these from here
from pipelines.cli_common import DEFAULT_PIPELINE, _errors  # noqa: F401
from pipelines.cli_run import _summary  # noqa: F401


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bar
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the per-load "LOAD REPORT"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    from pipelines.redact import RedactingFilter

    for handler in logging.getLogger().handlers:  # credentials never reach the terminal/log
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    sys.excepthook = _redacting_excepthook
    quiet = logging.INFO if verbose else logging.WARNING
    for name in ("mlflow", "optuna", "great_expectations", "bentoml", "alembic", "urllib3",
                 "httpx", "matplotlib", "PIL", "filelock", "huggingface_hub"):
        logging.getLogger(name).setLevel(quiet)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore")


def _redacting_excepthook(kind, value, tb) -> None:
    """Unexpected errors still show their traceback (exit 1), with credentials masked."""
    import traceback

    from pipelines.redact import redact

    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show library logs and warnings.")
def main(verbose: bool) -> None:
    """MaaS: turn a labelled data set into a served model.

    \b
    maas init DATA --test TEST    write NAME.yaml (+ its suite) for a data file or image folder
    maas run                      run pipelines/sentiment.yaml on the embedded default
    maas run my.yaml --set tuning.n_trials=1
    maas models NAME              versions, aliases, metrics, promotion decisions
    maas promote NAME VERSION     move the champion alias by hand
    maas rollback NAME            champion back to the previous champion
    maas build NAME@champion      bento from a registry alias

    The MLflow store is the pipeline's tracking_uri, else MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db in the working directory (see it with `mlflow ui`).
    """
    _setup_logging(verbose)


def _register_subcommands() -> None:
    from pipelines.cli_init import init
    from pipelines.cli_registry import build, card, models, promote, rollback
    from pipelines.cli_run import run, tune, validate
    from pipelines.cli_suite import suite
    from pipelines.cli_webhook import webhook
    from pipelines.scheduling.cli import schedule_command

    for command in (init, run, tune, validate, promote, rollback, models, card, build, suite,
                    webhook):
        main.add_command(command)
    main.add_command(schedule_command, "schedule")


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
