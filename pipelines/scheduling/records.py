"""Where the scheduler's state lives: which database (the DB-URL rules) and the runs table
(``maas_schedule_runs``: one row per attempt or fire outcome: success, failed, retrying,
skipped_overlap, missed, interrupted)."""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.scheduling.cron import ScheduleError

log = logging.getLogger(__name__)

RUNS_TABLE = "maas_schedule_runs"
FALLBACK_DB = "maas-schedule.db"
_DB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mssql", "oracle")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def naive_utc(dt: datetime | None) -> datetime | None:
    """Stored timestamps are naive UTC (SQLite has no time zones)."""
    if dt is not None and dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return dt


def fmt_time(dt: datetime | str | None) -> str:
    if dt is None:
        return "-"
    if isinstance(dt, str):
        dt = datetime.fromisoformat(dt)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def tracking_uri_of(cfg: Any | None) -> str:
    """As ``maas run`` resolves it: the pipeline's tracking_uri, else MLFLOW_TRACKING_URI, else
    MLflow's default (``sqlite:///mlflow.db`` in the working directory)."""
    if cfg is not None and getattr(cfg, "tracking_uri", None):
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    # MLflow's own resolution (sqlite:///mlflow.db, or a legacy ./mlruns file store that holds
    # runs; artifacts of the SQLite default also live in ./mlruns, which MLflow tells apart)
    import mlflow

    return mlflow.get_tracking_uri()


def store_url(tracking_uri: str) -> str | None:
    """The SQLAlchemy URL of a database tracking store (None for a server or a file store)."""
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in tracking_uri else ""
    if scheme not in _DB_SCHEMES:
        return None
    if scheme == "postgres":  # MLflow accepts it, SQLAlchemy 2 does not
        return "postgresql" + tracking_uri[len("postgres"):]
    return tracking_uri


def resolve_db(cfgs: list[Any], db: str | None) -> str:
    """The database of the scheduler's tables: ``--db``, else the pipelines' common tracking
    database, else ``maas-schedule.db`` in the working directory."""
    if db:
        return store_url(db) or db
    urls = {store_url(tracking_uri_of(c)) for c in (cfgs or [None])}
    if len(urls) > 1:
        shown = ", ".join(sorted(str(u) for u in urls))
        raise ScheduleError(f"the pipelines use different tracking stores ({shown}); "
                            "pass --db URL for the scheduler's tables")
    url = urls.pop()
    if url is None:
        url = f"sqlite:///{Path.cwd() / FALLBACK_DB}"
        log.warning("the MLflow tracking store is not a database; scheduler tables go to %s "
                    "(pass --db to choose)", url)
    return url


def make_engine(url: str):
    import sqlalchemy as sa

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # maas run writes the same file meanwhile
    return sa.create_engine(url, **kwargs)


def _runs_table(metadata):
    import sqlalchemy as sa

    return sa.Table(
        RUNS_TABLE, metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pipeline", sa.String(200), nullable=False, index=True),
        sa.Column("fire_time", sa.DateTime),
        sa.Column("attempt", sa.Integer),
        sa.Column("started_at", sa.DateTime),
        sa.Column("ended_at", sa.DateTime),
        sa.Column("exit_code", sa.Integer),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
    )


class Store:
    """The runs table (SQLAlchemy Core) in the scheduler's database; its engine also serves the
    APScheduler job store and the per-pipeline locks."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.url = url
        self.engine = make_engine(url)
        self.runs = _runs_table(sa.MetaData())

    def shown_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def create(self) -> None:
        self.runs.create(self.engine, checkfirst=True)

    def has_table(self, name: str) -> bool:
        import sqlalchemy as sa

        db = self.engine.url.database
        if self.engine.dialect.name == "sqlite" and db and db != ":memory:" \
                and not Path(db).exists():
            return False  # don't create the file just to look
        return sa.inspect(self.engine).has_table(name)

    def record(self, pipeline: str, outcome: str, *, fire_time: datetime | None = None,
               attempt: int | None = None, started_at: datetime | None = None,
               ended_at: datetime | None = None, exit_code: int | None = None,
               note: str | None = None) -> None:
        row = {"pipeline": pipeline, "outcome": outcome, "fire_time": naive_utc(fire_time),
               "attempt": attempt, "started_at": naive_utc(started_at),
               "ended_at": naive_utc(ended_at), "exit_code": exit_code, "note": note,
               "host": socket.gethostname(), "pid": os.getpid()}
        try:
            with self.engine.begin() as conn:
                conn.execute(self.runs.insert().values(**row))
        except Exception as exc:  # noqa: BLE001 - never let bookkeeping kill a fire
            log.warning("could not record %s outcome %s: %s", pipeline, outcome, exc)

    def last_runs(self, pipeline: str, n: int) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        if not self.has_table(RUNS_TABLE):
            return []
        q = (sa.select(self.runs).where(self.runs.c.pipeline == pipeline)
             .order_by(self.runs.c.id.desc()).limit(n))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def pipelines_with_runs(self) -> list[str]:
        import sqlalchemy as sa

        if not self.has_table(RUNS_TABLE):
            return []
        with self.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(sa.select(self.runs.c.pipeline).distinct()))
