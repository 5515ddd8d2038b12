"""Progress bars only on a terminal: in a log file (stderr redirected) a pipeline run writes one
line per epoch and per trial, and no bar redraws."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from helpers import write_pipeline

from pipelines.progress import bars_enabled, progress

REPO = Path(__file__).resolve().parents[1]
#: what a tqdm bar leaves in a file: a redraw (carriage return) or its "n/total [" counter
BAR = re.compile(r"\r|\d+/\d+ \[")


@pytest.fixture
def tty():
    """A real terminal (the slave end of a pseudo-terminal) and its master end to read from."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    stream = open(slave, "w", buffering=1)  # noqa: SIM115 - closed below
    yield stream, master
    stream.close()
    os.close(master)


def _read_all(fd: int) -> str:
    out = b""
    while select.select([fd], [], [], 0.5)[0]:
        out += os.read(fd, 65536)
    return out.decode()


def _closed_file(tmp_path: Path):
    fh = open(tmp_path / "closed.log", "w")  # noqa: SIM115 - closed at once: that is the case
    fh.close()
    return fh


@pytest.mark.parametrize(("case", "expected"), [
    ("tty", True), ("file", False), ("stringio", False), ("closed", False), ("no_isatty", False),
])
def test_bars_enabled_only_on_a_terminal(case, expected, tty, tmp_path):
    with open(tmp_path / "run.log", "w") as log_file:
        stream = {"tty": tty[0], "file": log_file, "stringio": io.StringIO(),
                  "closed": _closed_file(tmp_path), "no_isatty": object()}[case]
        assert bars_enabled(stream) is expected


def test_a_bar_draws_on_a_terminal_and_not_in_a_file(tty, tmp_path):
    stream, master = tty
    bar = progress(range(3), file=stream, desc="epoch", mininterval=0)
    assert bar.disable is False
    list(bar)
    bar.close()
    drawn = _read_all(master)
    assert "epoch" in drawn and "3/3" in drawn
    with open(tmp_path / "run.log", "w") as log_file:
        bar = progress(range(3), file=log_file, desc="epoch", mininterval=0)
        assert bar.disable is True
        list(bar)
        bar.close()
    assert (tmp_path / "run.log").read_text() == ""
    assert progress(range(3), file=stream, enabled=False).disable is True  # the caller's veto


@pytest.mark.slow  # a full `maas run` (tiny model): 72 s on the shared 2-core box (load 8)
def test_a_run_logged_to_a_file_has_one_line_per_epoch_and_trial_and_no_bars(
        tmp_path, tiny_checkpoint):
    """`maas run` with stderr redirected to a file, 2 trials x 2 epochs: exactly 4 epoch lines,
    2 trial lines, no bar redraws, and a short log overall."""
    pipe = write_pipeline(tmp_path, tiny_checkpoint, name="logs", tuning__n_trials=2,
                          tuning__max_epochs=2, tuning__pruner={"type": "none"},
                          data__max_rows=200)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "BENTOML_HOME": str(tmp_path / "bentoml"), "PYTHONPATH": str(REPO)}
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(pipe),
                               "--no-build"], cwd=tmp_path, env=env, stdout=log_file,
                              stderr=subprocess.STDOUT, timeout=600, check=False)
    text = log_path.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = text.splitlines()
    epochs = [ln for ln in lines if re.search(r"trial \d+ epoch \d/2: train_loss=\S+ "
                                              r"val_accuracy=\S+ \(\d+\.\d s\)", ln)]
    trials = [ln for ln in lines if re.search(r"trial \d+ COMPLETE: value=\S+ \(\d+\.\d s\)", ln)]
    assert len(epochs) == 4, "\n".join(lines)
    assert len(trials) == 2, "\n".join(lines)
    assert not BAR.search(text), [ln for ln in lines if BAR.search(ln)][:5]
    assert len(lines) < 80, f"{len(lines)} lines:\n" + "\n".join(lines)
