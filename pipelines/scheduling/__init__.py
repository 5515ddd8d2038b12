"""Scheduled runs (``maas schedule``): run pipelines on their cron schedules with APScheduler 3.x,
list them, export them as Kubernetes CronJobs.

One long-lived process keeps one job per scheduled pipeline in ``maas_scheduler_jobs`` of the
MLflow tracking database and records every fire in ``maas_schedule_runs`` beside it. Each fire
runs ``python -m pipelines.cli run PIPELINE --trigger schedule --schedule-attempt N`` in a child
process, so a crash or an OOM kill of a run never takes the scheduler down.

Policies (docs/scheduling.md says the same for users): never two runs of one pipeline at once
(in-process, and a per-pipeline lock across processes and manual runs); a failed run is retried
``--retries`` times with doubling backoff inside the same fire, except exit codes 2 (config) and
3 (data validation); fires missed while down are coalesced and run once at start-up within
``--misfire-grace``, else recorded as ``missed``; on SIGTERM/SIGINT no new fire starts, children
get SIGTERM then SIGKILL after ``--shutdown-grace``, their fires are recorded as ``interrupted``.

Modules: ``cron`` (cron strings -> triggers), ``records`` (database URL rules, runs table),
``locks`` (per-pipeline lock, :func:`manual_run_lock`), ``children`` (child processes),
``fire`` (one fire with its retries), ``jobs`` (job store, ``--list``), ``service`` (the
scheduler process), ``k8s`` (``--export k8s``), ``cli`` (the click command).
"""

from pipelines.scheduling.cron import ScheduleError, build_trigger
from pipelines.scheduling.locks import PipelineBusy, manual_run_lock

__all__ = ["PipelineBusy", "ScheduleError", "build_trigger", "manual_run_lock"]
