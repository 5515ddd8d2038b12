"""Two ``maas promote NAME VERSION`` processes at the same moment, on real stores.

``registry.promote`` takes no lock: it reads the champion, writes the evidence tags, moves the
alias, reads the alias back and records an attempt (``maas.promotion_attempt.*``) with the outcome
it saw. MLflow's alias is one row per (model, alias), so the store itself guarantees a single
champion; what these tests pin down is that both racing calls succeed, both leave an attempt
record, the final champion is one of the two and carries complete evidence, and the records agree
with it. Observed (and allowed here): when both calls read the old champion before either moves
the alias, and the loser reads the alias back before the winner's write lands, BOTH record outcome
``promoted`` with ``previous_champion`` = the old champion; the loser keeps ``maas.promoted_at`` /
``_by`` tags although it was champion only for milliseconds, and nothing marks it superseded later.
Rollback from the winner goes to the old champion (not to the loser), which is the sane result.

Stores: SQLite (the ``mlflow_store`` fixture; both processes open the same file) and, marked
``postgres``, a real ``mlflow server`` on PostgreSQL (the processes talk HTTP to it; the session's
shared ``tracking_server``, with a model name of this test's own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from helpers import GATE, communicate_all, log_echo_model, open_gate

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3

# `maas promote` itself (pipelines.cli:main), started by a tiny launcher that imports everything
# the command needs, then waits at a start gate (helpers.GATE) that the test opens for both
# processes at once, so that they really overlap.
_LAUNCH = textwrap.dedent("""\
    import sys
    import mlflow, registry  # noqa: F401  (what `maas promote` imports lazily)
    from pipelines.cli import main
    """) + GATE + textwrap.dedent("""\
    sys.argv = ["maas", *sys.argv[2:]]
    main()
    """)


def _echo_model_and_versions(name: str, n: int) -> list[str]:
    """Log a tiny pyfunc model once and register it ``n`` times (one run per version)."""
    import mlflow

    from registry import register

    model_uri, _ = log_echo_model("promote-concurrency")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("promote-concurrency").experiment_id
    versions = []
    for _ in range(n):
        run = client.create_run(exp)
        client.set_terminated(run.info.run_id)
        versions.append(str(register(model_uri, name, run_id=run.info.run_id).version))
    return versions


def _race(name: str, versions: list[str], env: dict, cwd: Path) -> list[tuple[int, str, str]]:
    launcher = cwd / "launch_promote.py"
    launcher.write_text(_LAUNCH)
    env = {**env, "PYTHONPATH": str(REPO)}
    ready = [cwd / f"ready-{name}-{v}" for v in versions]
    for f in ready:
        f.unlink(missing_ok=True)
    procs = [subprocess.Popen([sys.executable, str(launcher), str(f), "promote", name, v],
                              cwd=cwd, env={**env, "USER": f"racer-{v}"}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for v, f in zip(versions, ready, strict=True)]
    open_gate(procs, ready, timeout_s=180)
    return communicate_all(procs, timeout=180)


def _attempts(client, name: str, version: str) -> list[dict]:
    tags = client.get_model_version(name, version).tags
    return [json.loads(v) for k, v in tags.items() if k.startswith("maas.promotion_attempt.")]


def _check_round(client, name: str, racers: list[str], before: str | None,
                 results: list[tuple[int, str, str]]) -> dict:
    from registry import champion

    # both processes succeeded and printed a champion
    for rc, stdout, stderr in results:
        assert rc == 0, f"maas promote exited {rc}:\n{stderr[-3000:]}"
        assert f"{name}@champion = version " in stdout
    final = str(champion(name).version)
    assert final in racers, f"champion {final} is none of the racers {racers}"
    # exactly one champion: the alias resolves to one version, and only that version lists it
    holders = [str(v.version) for v in client.search_model_versions(f"name = '{name}'")
               if "champion" in client.get_model_version(name, v.version).aliases]
    assert holders == [final]
    # one attempt record per racer, with its actor
    records = {v: _attempts(client, name, v) for v in racers}
    for v in racers:
        mine = [a for a in records[v] if a["actor"] == f"manual:racer-{v}"]
        assert len(mine) == 1, f"version {v}: attempts {records[v]}"
        assert mine[0]["outcome"] in ("promoted", "superseded"), mine[0]
        records[v] = mine[0]
    # the winner's record says promoted; a "superseded" one names the winner
    assert records[final]["outcome"] == "promoted" and records[final]["champion"] == final
    loser = next(v for v in racers if v != final)
    lost = records[loser]
    assert lost["outcome"] == "superseded" and lost["champion"] == final or \
        lost["outcome"] == "promoted" and lost["champion"] == loser, lost
    # the champion carries complete evidence; its predecessor is a real earlier champion
    tags = client.get_model_version(name, final).tags
    assert tags["maas.promoted_by"] == f"manual:racer-{final}"
    assert tags["maas.previous_champion"] in {before or "", loser}
    assert tags["maas.previous_champion"] == (records[final]["previous"] or "")
    return {"final": final, "loser": loser, "loser_outcome": lost["outcome"],
            "previous": tags["maas.previous_champion"]}


def _run_rounds(name: str, env: dict, cwd: Path) -> list[dict]:
    import mlflow

    from registry import champion, promote, rollback

    client = mlflow.MlflowClient()
    versions = _echo_model_and_versions(name, 1 + 2 * ROUNDS)
    promote(name, versions[0], actor="setup")
    rounds = []
    for r in range(ROUNDS):
        racers = versions[1 + 2 * r: 3 + 2 * r]
        before = str(champion(name).version)
        results = _race(name, racers, env, cwd)
        rounds.append(_check_round(client, name, racers, before, results))
    # the recorded chain still rolls back to real earlier champions
    final = str(champion(name).version)
    prev = client.get_model_version(name, final).tags["maas.previous_champion"]
    assert rollback(name) == prev
    print(f"{name}: rounds {rounds}")
    return rounds


@pytest.mark.slow
def test_concurrent_cli_promotions_sqlite(mlflow_store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    _run_rounds("race-sqlite", env, tmp_path)


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_cli_promotions_postgres_server(tmp_path, tracking_server):
    import mlflow
    from helpers import client_env, tracking_to

    srv = tracking_server  # shared with other tests: a model name of its own
    with tracking_to(srv.url):
        _run_rounds(f"race-pg-{uuid.uuid4().hex[:6]}", client_env(srv), tmp_path)
    assert mlflow.get_tracking_uri() != srv.url
