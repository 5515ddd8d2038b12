"""Checks and lookups a pipeline run makes before and around its MLflow parent run: the Optuna
storage (its default, kept apart from the tracking store), the suite check, the git commit and
the unfinished parent run to resume."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient


def default_storage(tracking_uri: str) -> str:
    """Optuna RDB storage: beside a SQLite tracking store, else ``optuna.db`` in the cwd."""
    env = os.environ.get("MAAS_OPTUNA_STORAGE")
    if env:
        return env
    if tracking_uri.startswith("sqlite:///"):
        db = Path(urlparse(tracking_uri).path if tracking_uri.startswith("sqlite:////")
                  else tracking_uri[len("sqlite:///"):])
        return f"sqlite:///{db.with_name('optuna.db')}"
    return "sqlite:///optuna.db"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=False, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def check_storage(storage_url: str, tracking_uri: str) -> None:
    """Optuna and MLflow must not share one database: both keep an alembic ``alembic_version``
    table, and each one's migrations fail on the other's revision."""
    from pipelines.config import ConfigError
    from pipelines.tuning import safe_url

    def norm(url: str) -> str:
        return url.strip().rstrip("/").replace("postgresql+psycopg2://", "postgresql://")

    if norm(storage_url) == norm(tracking_uri):
        raise ConfigError(f"tuning.storage: {safe_url(storage_url)} is also the MLflow tracking "
                          "store; give Optuna its own database (both use an alembic_version "
                          "table), e.g. .../optuna next to .../mlflow")


def check_suite(suite: str) -> None:
    """Fail before any work if the pipeline's expectation suite is unknown or malformed."""
    from validation import load_suite_spec, resolve_suite

    load_suite_spec(resolve_suite(suite))


def find_unfinished_run(experiment_id: str, config_hash: str, fingerprint: str) -> str | None:
    """A parent run of this config and data that was killed before it finished (still RUNNING)."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`maas.config_hash` = '{config_hash}' and "
                       f"tags.`maas.data_fingerprint` = '{fingerprint}' and "
                       "tags.`maas.role` = 'pipeline' and attributes.status = 'RUNNING'"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def optuna_summaries(storage):
    import optuna

    return optuna.get_all_study_summaries(storage, include_best_trial=False)
