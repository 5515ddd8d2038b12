"""`maas schedule`: real APScheduler in a scheduler process, real child processes, real SQLite.

Most tests replace the pipeline command with a cheap child (the hidden ``--command``, given the
attempt and fire time as arguments) that appends ``NAME start|end|term TIME ATTEMPT PID FIRE``
lines to a file (``armed`` once a child's SIGTERM handler is in place); one slow test runs
`maas run`.
"""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from pipelines.scheduling.cron import ScheduleError, build_trigger
from pipelines.scheduling.fire import FireSpec, Verdict, judge
from pipelines.scheduling.jobs import JOBS_TABLE, ScopedJobStore, job_id
from pipelines.scheduling.records import RUNS_TABLE

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import os, signal, sys, time
name, mode, log, attempt, fire = sys.argv[1:6]
attempt = int(attempt)
def w(ev):
    with open(log, "a") as f:
        f.write(f"{name} {ev} {time.time():.3f} {attempt} {os.getpid()} {fire}\n")
w("start")
kind, _, arg = mode.partition(":")
if kind == "sleep":
    time.sleep(float(arg))
elif kind == "fail_then_ok":
    if attempt <= int(arg):
        w("end"); sys.exit(1)
elif kind == "exit":
    w("end"); sys.exit(int(arg))
elif kind == "crash_once":
    if attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
elif kind == "polite":
    def on_term(*_):
        w("term"); sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    w("armed")
    time.sleep(120)
elif kind == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    w("armed")
    time.sleep(120)
w("end")
'''


def pipeline_file(folder: Path, name: str, schedule: str | None, **extra) -> Path:
    cfg = {"name": name, "data": {"path": "data.tsv"},
           "tuning": {"search_space": {"lr": {"type": "float", "low": 1e-5, "high": 1e-4}}},
           "registry": {"model_name": f"{name}-model"}, **extra}
    if schedule is not None:
        cfg["schedule"] = schedule
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Scheduler:
    """`maas schedule ...` in its own process, output in a file."""

    def __init__(self, cwd: Path, args: list[str], env: dict[str, str], tag: str = "sched"):
        self.out = cwd / f"{tag}.log"
        self.fh = open(self.out, "w")  # noqa: SIM115 - closed by stop()/kill()
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "schedule", *args],
                                     cwd=cwd, env=env, stdout=self.fh, stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.fh.close()

    def output(self) -> str:
        return self.out.read_text()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "child.py").write_text(CHILD)
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "PYTHONPATH": _pythonpath()}


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture
def schedulers():
    started: list[Scheduler] = []
    yield started
    for s in started:
        s.kill()


def child_cmd(tmp: Path, mode: str) -> str:
    return (f"{sys.executable} {tmp / 'child.py'} {{name}} {mode} {tmp / 'events.txt'} "
            "{attempt} {fire_time}")


def dispatcher(tmp: Path, modes: dict[str, str]) -> str:
    """One --command for several pipelines: a tiny script runs the child in each one's mode."""
    (tmp / "dispatch.py").write_text(
        "import os, sys\nmodes = " + repr(modes) + "\n"
        f"os.execv(sys.executable, [sys.executable, {str(tmp / 'child.py')!r}, sys.argv[1], "
        f"modes[sys.argv[1]], {str(tmp / 'events.txt')!r}, *sys.argv[2:]])\n")
    return f"{sys.executable} {tmp / 'dispatch.py'} {{name}} {{attempt}} {{fire_time}}"


def events(tmp: Path) -> list[list[str]]:
    f = tmp / "events.txt"
    return [line.split() for line in f.read_text().splitlines()] if f.exists() else []


def rows(db: Path, pipeline: str | None = None) -> list[dict]:
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        q = f"SELECT * FROM {RUNS_TABLE}" + (" WHERE pipeline = ?" if pipeline else "")
        return [dict(r) for r in con.execute(q + " ORDER BY id", (pipeline,) if pipeline else ())]
    except sqlite3.OperationalError:  # table not created yet
        return []
    finally:
        con.close()


def wait_for(pred, timeout: float, what: str, sched: Scheduler | None = None):
    """Poll ``pred`` until it is truthy (returned) or ``timeout`` s pass (fail with the
    scheduler's output). Deadlines that include a process start are generous (2 minutes): they
    only bound a failure, a passing test returns as soon as the condition holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if sched is not None and sched.proc.poll() is not None:
            break
        time.sleep(0.1)
    out = sched.output() if sched is not None else ""
    pytest.fail(f"timed out waiting for {what}\n--- scheduler output ---\n{out}")


def _list_in_process(files: list[str], env: dict[str, str]):
    """`maas schedule --list FILES` in this process (Click's runner; the cwd is the test's
    folder): only its parsing and output are under test, not a process boundary."""
    from click.testing import CliRunner

    from pipelines.cli import main

    keys = ("MLFLOW_TRACKING_URI",)
    return CliRunner().invoke(main, ["schedule", "--list", *files],
                              env={k: env[k] for k in keys}, catch_exceptions=False)


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


# ------------------------------------------------------------------------------------------ unit

def test_cron_parsing_standard_weekdays_seconds_and_macros():
    start = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)  # a Wednesday
    sunday = build_trigger("0 3 * * 0").get_next_fire_time(None, start)
    assert sunday == datetime(2025, 1, 5, 3, 0, tzinfo=timezone.utc)  # 0 = Sunday, as in cron
    assert build_trigger("0 3 * * 7").get_next_fire_time(None, start).weekday() == 6
    weekdays = build_trigger("30 2 * * 1-5")
    t, seen = start, set()
    for _ in range(7):
        t = weekdays.get_next_fire_time(None, t + timedelta(seconds=1))
        seen.add(t.strftime("%a"))
    assert seen == {"Mon", "Tue", "Wed", "Thu", "Fri"}
    secs = build_trigger("*/5 * * * * *")  # 6 fields: leading seconds
    assert secs.get_next_fire_time(None, start + timedelta(seconds=1)) == start + timedelta(
        seconds=5)
    assert build_trigger("@daily").get_next_fire_time(None, start) == datetime(
        2025, 1, 2, tzinfo=timezone.utc)
    for bad in ("* * *", "61 * * * *", "0 3 * * 9", "1 2 3 4 5 6 7"):
        with pytest.raises(ScheduleError):
            build_trigger(bad)


SPEC = FireSpec(pipeline="p", path="/x/p.yaml", retries=2, backoff_s=30.0,
                no_retry=frozenset({2, 3}))


@pytest.mark.parametrize(("code", "note", "attempt", "stopping", "expected"), [
    (0, None, 1, False, Verdict("success", None)),
    (0, None, 3, True, Verdict("success", None)),  # finished before the shutdown got to it
    (1, None, 1, False, Verdict("retrying", "retry in 30 s", 30.0)),
    (1, "killed by SIGKILL", 2, False, Verdict("retrying", "killed by SIGKILL; retry in 60 s",
                                                60.0)),
    (1, None, 3, False, Verdict("failed", "gave up after 3 attempt(s)")),
    (2, None, 1, False, Verdict("failed", "exit 2 (config/usage error): not retried")),
    (3, None, 1, False, Verdict("failed", "exit 3 (data validation failed): not retried")),
    (-15, "killed by SIGTERM", 1, True, Verdict("interrupted", "killed by SIGTERM")),
    (1, None, 1, True, Verdict("interrupted", "scheduler shutting down")),
])
def test_judge_an_attempt(code, note, attempt, stopping, expected):
    assert judge(code, note, attempt, SPEC, stopping) == expected


def test_fire_command_passes_the_attempt_as_a_maas_run_option():
    fire = datetime(2025, 1, 1, 3, tzinfo=timezone.utc)
    assert SPEC.argv(2, fire) == [sys.executable, "-m", "pipelines.cli", "run", "/x/p.yaml",
                                  "--trigger", "schedule", "--schedule-attempt", "2"]
    custom = FireSpec(pipeline="p", path="/x/p.yaml", command="{python} t.py {name} {attempt} "
                                                              "{fire_time} {pipeline}")
    assert custom.argv(3, fire) == [sys.executable, "t.py", "p", "3",
                                    "2025-01-01T03:00:00+00:00", "/x/p.yaml"]


def test_apscheduler_events_carry_the_coalesced_fire_and_the_misses():
    """The public APScheduler 3.x behaviour the scheduler is built on: a due job's callable runs
    once for the latest of its coalesced fires and EVENT_JOB_EXECUTED carries that fire time; a
    fire beyond the misfire grace gives EVENT_JOB_MISSED and the callable does not run. If an
    APScheduler release changes this, this test fails before any schedule does."""
    import threading

    from apscheduler.events import EVENT_JOB_EXECUTED, EVENT_JOB_MISSED
    from apscheduler.schedulers.background import BackgroundScheduler

    now = datetime.now(timezone.utc).replace(microsecond=0)
    seen: list[tuple[str, int, datetime]] = []
    done = threading.Event()

    def on_event(event):
        seen.append((event.job_id, event.code, event.scheduled_run_time))
        if len(seen) == 2:
            done.set()

    sched = BackgroundScheduler(timezone=timezone.utc,
                                job_defaults={"coalesce": True, "max_instances": 1})
    sched.add_listener(on_event, EVENT_JOB_EXECUTED | EVENT_JOB_MISSED)
    minutely = build_trigger("* * * * *")
    sched.add_job("pipelines.scheduling.jobs:due", minutely, id="late", misfire_grace_time=600,
                  next_run_time=now.replace(second=0) - timedelta(minutes=5))
    sched.add_job("pipelines.scheduling.jobs:due", build_trigger("0 0 1 1 *"), id="missed",
                  misfire_grace_time=60, next_run_time=now - timedelta(minutes=10))
    sched.start()
    try:
        assert done.wait(10), seen
    finally:
        sched.shutdown(wait=True)
    latest_due = minutely.get_next_fire_time(None, now - timedelta(seconds=59))
    assert sorted(seen) == [("late", EVENT_JOB_EXECUTED, latest_due),
                            ("missed", EVENT_JOB_MISSED, now - timedelta(minutes=10))]


def test_scoped_job_store_sees_only_its_own_jobs(tmp_path):
    from apscheduler.schedulers.background import BackgroundScheduler

    from pipelines.scheduling.records import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    now = datetime.now(timezone.utc)
    mine, other = ScopedJobStore(engine, [job_id("a")]), ScopedJobStore(engine, [job_id("b")])
    sched = BackgroundScheduler(jobstores={"mine": mine, "other": other}, timezone=timezone.utc)
    sched.start(paused=True)
    try:
        sched.add_job("pipelines.scheduling.jobs:due", build_trigger("0 0 1 1 *"),
                      id=job_id("a"), jobstore="mine", next_run_time=now + timedelta(hours=1))
        sched.add_job("pipelines.scheduling.jobs:due", build_trigger("0 0 1 1 *"),
                      id=job_id("b"), jobstore="other", next_run_time=now - timedelta(hours=1))
        assert [j.id for j in mine.get_all_jobs()] == [job_id("a")]
        assert mine.get_due_jobs(now) == []  # b is overdue, but not this store's
        assert [j.id for j in other.get_due_jobs(now)] == [job_id("b")]
        # the earliest of its own jobs, not the table's (b's overdue time would spin it)
        assert abs(mine.get_next_run_time() - (now + timedelta(hours=1))) < timedelta(seconds=1)
    finally:
        sched.shutdown(wait=False)
        engine.dispose()


def test_manual_run_lock_is_skipped_only_for_scheduled_runs(tmp_path):
    from types import SimpleNamespace

    from pipelines.scheduling import PipelineBusy, manual_run_lock

    cfg = SimpleNamespace(name="p", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with manual_run_lock(cfg):
        with pytest.raises(PipelineBusy, match="already running"), manual_run_lock(cfg):
            pass
        with manual_run_lock(cfg, trigger="schedule"):  # the scheduler holds the lock itself
            pass
    with manual_run_lock(cfg):  # released
        pass


def test_export_k8s_cronjob(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow@db:5432/mlflow")
    pipeline_file(tmp_path, "nightly", "30 2 * * 1-5")
    out = tmp_path / "cron.yaml"
    res = CliRunner().invoke(main, ["schedule", "--export", "k8s", "nightly.yaml", "-o", str(out),
                                    "--image", "ghcr.io/acme/maas:1.2", "--retries", "3",
                                    "--misfire-grace", "900"])
    assert res.exit_code == 0, res.output
    (doc,) = list(yaml.safe_load_all(out.read_text()))
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "CronJob"
    assert doc["metadata"]["name"] == "maas-nightly"
    spec = doc["spec"]
    assert spec["schedule"] == "30 2 * * 1-5"
    assert spec["timeZone"] == "Etc/UTC"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] == 900
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 3
    fail_rule = job["podFailurePolicy"]["rules"][0]
    assert fail_rule["action"] == "FailJob" and fail_rule["onExitCodes"]["values"] == [2, 3]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/acme/maas:1.2"
    assert c["command"] == ["maas", "run", "nightly.yaml", "--trigger", "schedule"]
    assert {"name": "MLFLOW_TRACKING_URI",
            "value": "postgresql://mlflow@db:5432/mlflow"} in c["env"]

    # stdout, several pipelines: one document each; 6-field or no schedule: exit 2
    pipeline_file(tmp_path, "hourly", "@hourly")
    res = CliRunner().invoke(main, ["schedule", "--export", "k8s", "nightly.yaml", "hourly.yaml"])
    assert res.exit_code == 0, res.output
    docs = list(yaml.safe_load_all(res.output))
    assert [d["spec"]["schedule"] for d in docs] == ["30 2 * * 1-5", "0 * * * *"]
    pipeline_file(tmp_path, "fast", "*/5 * * * * *")
    res = CliRunner().invoke(main, ["schedule", "--export", "k8s", "fast.yaml"])
    assert res.exit_code == 2 and "seconds field" in res.output
    pipeline_file(tmp_path, "never", None)
    res = CliRunner().invoke(main, ["schedule", "--export", "k8s", "never.yaml"])
    assert res.exit_code == 2 and "no schedule" in res.output


def test_bad_schedule_and_missing_schedule_exit_2(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    pipeline_file(tmp_path, "bad", "every day please")
    res = CliRunner().invoke(main, ["schedule", "bad.yaml"])
    assert res.exit_code == 2 and "bad.yaml" in res.output and "cron fields" in res.output
    pipeline_file(tmp_path, "never", None)
    res = CliRunner().invoke(main, ["schedule", "never.yaml"])
    assert res.exit_code == 2 and "none of the pipelines has a `schedule`" in res.output
    res = CliRunner().invoke(main, ["schedule", "--list", "never.yaml"])
    assert res.exit_code == 0 and "never: not scheduled" in res.output
    pipeline_file(tmp_path, "typo", "0 3 * * *", tunning={"n_trials": 2})  # the shared mapping
    res = CliRunner().invoke(main, ["schedule", "typo.yaml"])
    assert res.exit_code == 2 and res.output.startswith("error: ") and "tunning" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert not (tmp_path / "mlflow.db").exists()  # --list creates nothing


# ------------------------------------------------------------------ the scheduler, in a process

def test_overlap_never_two_runs_at_once(tmp_path, env, schedulers):
    """Every second, a 2.5 s run: fires are skipped while it runs (max_instances in the process),
    and a second scheduler process with its own store but the same pipeline is held off by the
    cross-process lock. The child's start/end stamps never overlap."""
    pipeline_file(tmp_path, "ov", "* * * * * *")
    args = ["ov.yaml", "--command", child_cmd(tmp_path, "sleep:2.5"), "--shutdown-grace", "5"]
    a = Scheduler(tmp_path, args, env, "a")
    schedulers.append(a)
    b = Scheduler(tmp_path, [*args, "--db", f"sqlite:///{tmp_path / 'other.db'}"], env, "b")
    schedulers.append(b)

    def enough():
        # two runs *recorded* as successes, not just two child "end" stamps: the scheduler writes
        # the outcome after the child exits, and a stop between the two lost the second record
        recorded = rows(tmp_path / "mlflow.db", "ov") + rows(tmp_path / "other.db", "ov")
        done = sum(r["outcome"] == "success" for r in recorded)
        notes = " ".join(r["note"] or "" for r in recorded if r["outcome"] == "skipped_overlap")
        return done >= 2 and "still going" in notes and "running elsewhere" in notes

    for sched in (a, b):  # started (imports done) before the clock for the runs starts
        wait_for(lambda s=sched: "scheduler running" in s.output(), 120,
                 "the scheduler to start", sched)
    wait_for(enough, 25, "two recorded successful runs and both kinds of skipped fires", a)
    assert a.stop() == 0 and b.stop() == 0, a.output() + b.output()

    intervals: dict[str, list[float]] = {}
    for _name, ev, t, _attempt, pid, _fire in events(tmp_path):
        intervals.setdefault(pid, [float("inf"), float("inf")])
        intervals[pid][0 if ev == "start" else 1] = float(t)
    spans = sorted(tuple(span) for span in intervals.values())  # unfinished: end = inf
    for (_s1, e1), (s2, _e2) in itertools.pairwise(spans):
        assert s2 >= e1, f"runs overlap: {spans}"
    recorded = rows(tmp_path / "mlflow.db", "ov") + rows(tmp_path / "other.db", "ov")
    assert sum(r["outcome"] == "success" for r in recorded) >= 2
    assert all(r["fire_time"] for r in recorded)


def test_retry_with_backoff_and_no_retry_for_exit_2_and_3(tmp_path, env, schedulers):
    names = {"flaky": "fail_then_ok:2", "always": "exit:1", "badcfg": "exit:2",
             "baddata": "exit:3", "crash": "crash_once"}
    files = [str(pipeline_file(tmp_path, n, "0 0 1 1 *")) for n in names]
    # one command for all pipelines: the mode is chosen by name inside a tiny dispatcher
    dispatch = dispatcher(tmp_path, names)
    s = Scheduler(tmp_path, [*files, "--run-now", "--retries", "2", "--retry-backoff", "0.4",
                             "--command", dispatch], env)
    schedulers.append(s)
    db = tmp_path / "mlflow.db"

    def settled():
        final = {r["pipeline"] for r in rows(db) if r["outcome"] in ("success", "failed")}
        return final >= set(names)

    wait_for(settled, 120, "every pipeline to succeed or fail for good", s)
    assert s.stop() == 0, s.output()

    flaky = rows(db, "flaky")
    assert [(r["attempt"], r["outcome"], r["exit_code"]) for r in flaky] == [
        (1, "retrying", 1), (2, "retrying", 1), (3, "success", 0)]
    assert len({r["fire_time"] for r in flaky}) == 1  # one fire, three attempts
    gap1 = ts(flaky[1]["started_at"]) - ts(flaky[0]["ended_at"])
    gap2 = ts(flaky[2]["started_at"]) - ts(flaky[1]["ended_at"])
    assert gap1 >= timedelta(seconds=0.38) and gap2 >= timedelta(seconds=0.78), (gap1, gap2)
    assert gap2 < timedelta(seconds=3)

    always = rows(db, "always")
    assert [r["outcome"] for r in always] == ["retrying", "retrying", "failed"]
    assert "gave up after 3 attempt" in always[-1]["note"]

    for name, code in (("badcfg", 2), ("baddata", 3)):
        (only,) = rows(db, name)
        assert (only["outcome"], only["exit_code"], only["attempt"]) == ("failed", code, 1)
        assert "not retried" in only["note"]
        assert sum(e[0] == name and e[1] == "start" for e in events(tmp_path)) == 1

    crash = rows(db, "crash")
    assert [(r["outcome"], r["exit_code"]) for r in crash] == [("retrying", -9), ("success", 0)]
    assert "SIGKILL" in crash[0]["note"]

    # --list: next fire times from the job store and the recent outcomes
    listed = _list_in_process(files, env)
    assert listed.exit_code == 0, listed.output
    next_jan = f"{datetime.now(timezone.utc).year + 1}-01-01 00:00:00Z"
    out = listed.stdout
    assert out.count(f"next fire {next_jan}") == len(names), out
    assert "flaky: schedule '0 0 1 1 *' (UTC)" in out
    flaky_block = out.split("flaky:")[1].split("\n", 4)
    assert "retrying" in flaky_block[1] and "success" in flaky_block[3], out
    assert "exit 2 (config/usage error): not retried" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_terminates_children_and_keeps_the_job_store(tmp_path, env, schedulers, sig):
    """Policy: on SIGTERM/SIGINT no new fire, children get SIGTERM, SIGKILL after the grace; the
    fires are recorded as interrupted; exit 0; the jobs stay in the store."""
    names = {"polite": "polite", "stubborn": "stubborn"}
    files = [str(pipeline_file(tmp_path, n, "0 0 1 1 *")) for n in names]
    dispatch = dispatcher(tmp_path, names)
    s = Scheduler(tmp_path, [*files, "--run-now", "--shutdown-grace", "1.5", "--command",
                             dispatch], env)
    schedulers.append(s)
    # both children started and have their SIGTERM handlers installed
    wait_for(lambda: {e[0] for e in events(tmp_path) if e[1] == "armed"} == set(names), 120,
             "both children to start and install their signal handlers", s)
    t0 = time.monotonic()
    assert s.stop(sig) == 0, s.output()
    took = time.monotonic() - t0
    assert 1.4 <= took < 8, took  # the stubborn child was killed after the 1.5 s grace

    evs = events(tmp_path)
    assert any(e[0] == "polite" and e[1] == "term" for e in evs)
    for pid in {e[4] for e in evs}:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    db = tmp_path / "mlflow.db"
    (polite,) = rows(db, "polite")
    (stubborn,) = rows(db, "stubborn")
    assert (polite["outcome"], polite["exit_code"]) == ("interrupted", 143)
    assert (stubborn["outcome"], stubborn["exit_code"]) == ("interrupted", -9)
    con = sqlite3.connect(db)
    stored = dict(con.execute(f"SELECT id, next_run_time FROM {JOBS_TABLE}").fetchall())
    con.close()
    next_jan = datetime(datetime.now(timezone.utc).year + 1, 1, 1, tzinfo=timezone.utc)
    assert stored == {job_id("polite"): next_jan.timestamp(),
                      job_id("stubborn"): next_jan.timestamp()}
    assert "scheduler stopped" in s.output()


def _set_next_run_time(db: Path, jid: str, when: datetime) -> None:
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    store = SQLAlchemyJobStore(url=f"sqlite:///{db}", tablename=JOBS_TABLE)
    store.start(BackgroundScheduler(timezone=timezone.utc), "default")  # never started: no fire
    job = store.lookup_job(jid)
    job.next_run_time = when  # as a scheduler stopped at `when` would have left it
    store.update_job(job)
    store.shutdown()


def test_misfire_coalesced_into_one_catch_up_run_within_grace(tmp_path, env, schedulers):
    """While down: a per-minute pipeline missed 5 fires (the last within the grace) -> exactly one
    catch-up run, for the latest missed fire; a yearly one missed its fire 10 min ago (beyond the
    2 min grace) -> recorded as missed, not run, next fire next year."""
    files = [str(pipeline_file(tmp_path, "minutely", "* * * * *")),
             str(pipeline_file(tmp_path, "yearly", "0 0 1 1 *"))]
    args = [*files, "--misfire-grace", "120", "--command", child_cmd(tmp_path, "sleep:0")]
    db = tmp_path / "mlflow.db"
    first = Scheduler(tmp_path, args, env, "first")
    schedulers.append(first)
    wait_for(lambda: "scheduler running" in first.output(), 120, "the scheduler to start",
             first)
    assert first.stop() == 0
    before = len(rows(db, "minutely"))  # a fire of the first run, if a minute turned meanwhile

    second_of_minute = datetime.now(timezone.utc).second
    if second_of_minute >= 50:  # the restart must not straddle a minute: its fire isn't catch-up
        time.sleep(61 - second_of_minute)
    now = datetime.now(timezone.utc)
    five_min_ago = now.replace(second=0, microsecond=0) - timedelta(minutes=5)
    _set_next_run_time(db, job_id("minutely"), five_min_ago)
    _set_next_run_time(db, job_id("yearly"), now - timedelta(minutes=10))

    restarted_at = datetime.now(timezone.utc)
    second = Scheduler(tmp_path, args, env, "second")
    schedulers.append(second)
    wait_for(lambda: rows(db, "minutely")[before:] and rows(db, "yearly"), 120,
             "the catch-up run and the missed record", second)
    time.sleep(1.0)  # no second catch-up run may follow
    assert second.stop() == 0

    catch_up = [r for r in rows(db, "minutely")[before:] if ts(r["fire_time"]).replace(
        tzinfo=timezone.utc) < restarted_at]
    assert [r["outcome"] for r in catch_up] == ["success"]
    fired_for = ts(catch_up[0]["fire_time"]).replace(tzinfo=timezone.utc)
    assert restarted_at - timedelta(seconds=61) < fired_for <= restarted_at  # the latest one
    assert fired_for > five_min_ago
    (missed,) = rows(db, "yearly")
    assert missed["outcome"] == "missed" and missed["attempt"] is None
    assert not any(e[0] == "yearly" for e in events(tmp_path))
    listed = _list_in_process([files[1]], env)
    assert f"next fire {now.year + 1}-01-01 00:00:00Z" in listed.stdout, listed.output


@pytest.mark.postgres
def test_postgres_store_and_advisory_lock(tmp_path, env, schedulers, pg_url):
    """Tracking store on PostgreSQL: job store and runs there; the overlap guard is an advisory
    lock (held here by the test, as another scheduler would)."""
    import sqlalchemy as sa

    from pipelines.scheduling.locks import pipeline_lock

    files = [str(pipeline_file(tmp_path, "free", "0 0 1 1 *")),
             str(pipeline_file(tmp_path, "busy", "0 0 1 1 *"))]
    engine = sa.create_engine(pg_url)
    held = pipeline_lock(pg_url, "busy")
    assert held.acquire(wait=False)
    try:
        s = Scheduler(tmp_path, [*files, "--run-now", "--command",
                                 child_cmd(tmp_path, "sleep:0")],
                      {**env, "MLFLOW_TRACKING_URI": pg_url})
        schedulers.append(s)

        def outcomes():
            try:
                with engine.connect() as conn:
                    return dict(conn.execute(sa.text(
                        f"SELECT pipeline, outcome FROM {RUNS_TABLE}")).fetchall())
            except sa.exc.ProgrammingError:
                return {}

        got = wait_for(lambda: len(outcomes()) == 2 and outcomes(), 120, "both outcomes",
                       s)
        assert s.stop() == 0
        assert got == {"free": "success", "busy": "skipped_overlap"}
        with engine.connect() as conn:
            ids = {r[0] for r in conn.execute(sa.text(f"SELECT id FROM {JOBS_TABLE}"))}
        assert ids == {job_id("free"), job_id("busy")}
    finally:
        held.release()
        engine.dispose()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scheduled_fire_runs_maas_run_tagged_schedule(tmp_path, tiny_checkpoint, mlflow_store,
                                                      schedulers):
    """The real thing, once: the fire runs `maas run PIPELINE --trigger schedule` on a tiny
    pipeline and the MLflow parent run is tagged maas.trigger=schedule."""
    from helpers import write_pipeline
    from mlflow import MlflowClient

    path = write_pipeline(tmp_path, tiny_checkpoint, schedule="0 0 1 1 *",
                          tuning__n_trials=1, tuning__max_epochs=1)
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    s = Scheduler(tmp_path, [str(path), "--run-now", "--retries", "0"], env)
    schedulers.append(s)
    db = tmp_path / "mlflow.db"
    wait_for(lambda: [r for r in rows(db, "tiny") if r["outcome"] in ("success", "failed")],
             800, "the scheduled maas run to finish", s)
    assert s.stop() == 0
    (rec,) = rows(db, "tiny")
    assert rec["outcome"] == "success", (rec, s.output())
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id],
                              filter_string="tags.`maas.role` = 'pipeline'")
    assert len(runs) == 1 and runs[0].data.tags["maas.trigger"] == "schedule"
    assert runs[0].data.tags["maas.schedule_attempt"] == "1"  # `maas run --schedule-attempt 1`
    assert runs[0].info.status == "FINISHED"
