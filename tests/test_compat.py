"""The library adapters against the installed libraries: each test fails loudly when Optuna or
BentoML changes the behaviour that ``pipelines/_compat.py`` / ``bentos/_compat.py`` stand in for,
and a grep keeps private library attributes out of every other module."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import optuna
import pytest

from pipelines import _compat

REPO = Path(__file__).resolve().parents[1]


def _storage(tmp_path: Path, heartbeat: int | None = 1) -> optuna.storages.RDBStorage:
    kwargs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat:
            kwargs = {"heartbeat_interval": heartbeat, "grace_period": 2 * heartbeat,
                      "failed_trial_callback":
                          optuna.storages.RetryFailedTrialCallback(max_retry=1)}
        return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}", **kwargs)


def test_heartbeat_interval_only_for_rdb_storage_with_one(tmp_path):
    assert _compat.heartbeat_interval(optuna.storages.InMemoryStorage()) is None
    assert _compat.heartbeat_interval(_storage(tmp_path, None)) is None
    (tmp_path / "b").mkdir()
    assert _compat.heartbeat_interval(_storage(tmp_path / "b", 3)) == 3


def test_heartbeat_keeps_its_trial_alive_and_a_stopped_one_goes_stale_and_is_retried(tmp_path):
    """Optuna's own heartbeat runs only inside Study.optimize (optuna/optuna#3293): ours must make
    ``fail_stale_trials`` spare the beating trial and fail + re-queue the one that stopped."""
    storage = _storage(tmp_path)
    study = optuna.create_study(study_name="hb", storage=storage)
    stopped = _compat.ask(study)
    with _compat.heartbeat(storage, "hb", stopped.number):
        pass  # one beat, then silence: a worker that died
    beating = _compat.ask(study)
    with _compat.heartbeat(storage, "hb", beating.number):
        time.sleep(4.5)  # > grace period (2 s) + SQLite's 1 s clock resolution
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[stopped.number] == optuna.trial.TrialState.FAIL, states
    assert states[beating.number] == optuna.trial.TrialState.RUNNING, states
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1, states
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        assert optuna.storages.RetryFailedTrialCallback.retried_trial_number(waiting[0]) \
            == stopped.number
    study.tell(beating, 1.0)


def test_without_heartbeat_a_silent_trial_is_never_failed(tmp_path):
    """The control: a RUNNING trial with no heartbeat recorded is not stale in Optuna's eyes, so
    the trials stay alive only because of the beats above (not by accident)."""
    storage = _storage(tmp_path)
    study = optuna.create_study(study_name="silent", storage=storage)
    trial = _compat.ask(study)
    time.sleep(3.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    (frozen,) = study.get_trials(deepcopy=False)
    assert frozen.number == trial.number and frozen.state == optuna.trial.TrialState.RUNNING


def test_ask_warns_on_heartbeat_storage_and_the_adapter_silences_exactly_that(tmp_path):
    """If Optuna stops warning (e.g. ask-and-tell got its own heartbeat), revisit the adapter."""
    study = optuna.create_study(study_name="warn", storage=_storage(tmp_path))
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        study.ask()
    assert any(_compat._ASK_WARNING in str(w.message) for w in plain), \
        [str(w.message) for w in plain]
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        _compat.ask(study)
    assert not any(_compat._ASK_WARNING in str(w.message) for w in ours)


def test_run_study_refuses_a_study_it_has_no_storage_for(tmp_path):
    from pipelines import tuning

    study = optuna.create_study(storage=_storage(tmp_path, None))
    with pytest.raises(ValueError, match="open_study"):
        tuning.run_study(study, objective=None, n_trials=1,
                         storage_url=f"sqlite:///{tmp_path / 'optuna.db'}")


_BENTO_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    first, second = Path(sys.argv[1]), Path(sys.argv[2])
    os.environ["BENTOML_HOME"] = str(first)
    import bentoml
    assert bentoml.models.list() == []          # BentoML resolves its home: the first one
    os.environ["BENTOML_HOME"] = str(second)
    from bentos.build import bentoml_store_scope
    with bentoml_store_scope() as home:
        assert home == second.resolve(), home
        with bentoml.models.create("compat-probe") as m:
            (Path(m.path) / "weights.txt").write_text("x")
        tag = str(m.tag)
        assert [str(x.tag) for x in bentoml.models.list()] == [tag]
        assert bentoml.bentos.list() == []
    assert (second / "models" / "compat-probe").is_dir(), "model not in the second home"
    assert not (first / "models" / "compat-probe").exists(), "model leaked into the first home"
    try:                                         # outside the scope: back on the first home
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        print("FIRST-HOME-AGAIN")
    else:
        print("BENTOML-FOLLOWS-ENV")
""")


def test_bentoml_store_scope_follows_the_current_home(tmp_path):
    """In a fresh process: BentoML keeps its first home by itself; inside the scope the public
    ``bentoml.models`` API reads and writes the current ``$BENTOML_HOME``; after it, the first."""
    proc = subprocess.run([sys.executable, "-c", _BENTO_SCRIPT, str(tmp_path / "one"),
                           str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # BENTOML-FOLLOWS-ENV would mean BentoML re-reads BENTOML_HOME itself: drop bentos/_compat.py
    assert proc.stdout.strip().splitlines()[-1] == "FIRST-HOME-AGAIN", proc.stdout


#: a private attribute of one of the four libraries: ``lib._x`` / ``lib.a._x`` imports or
#: attribute chains, or ``from lib... import _x``; plus Optuna/BentoML objects' private members
PRIVATE = re.compile(
    r"\b(?:optuna|mlflow|bentoml|apscheduler)(?:\.\w+)*\._[a-z]\w*"
    r"|from\s+(?:optuna|mlflow|bentoml|apscheduler)[\w.]*\s+import\s+\(?\s*_[a-z]"
    r"|\b(?:study|trial|storage|frozen)\._(?:storage|trial_id|study_id)\b")
ADAPTERS = {"pipelines/_compat.py", "bentos/_compat.py"}


def test_no_private_optuna_bentoml_or_mlflow_api_outside_the_adapters():
    hits = []
    for folder in ("pipelines", "registry", "bentos", "validation"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in ADAPTERS or rel.startswith("pipelines/schedul"):  # APScheduler: its own
                continue
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if PRIVATE.search(line.split("#", 1)[0]):
                    hits.append(f"{rel}:{no}: {line.strip()}")
    assert not hits, "private library API outside the adapters:\n" + "\n".join(hits)
