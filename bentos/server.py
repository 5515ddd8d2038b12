"""Run ``bentoml serve <bento_tag>`` as a child process for tests, benchmarks and scripts.

The server runs in its own process group (so its workers go down with it), binds 127.0.0.1 on a
free port by default, is waited for on ``/readyz`` and is always stopped on exit (SIGTERM to the
group, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bentos.processes import stop_group

#: environment for the child: no usage tracking (no network here), offline hub, quiet tokenizers
QUIET_ENV = {
    "BENTOML_DO_NOT_TRACK": "True",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")[-tail:]
        except OSError:
            return ""


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session=True``), then
    SIGKILL it after ``grace_s``; nothing when ``proc`` has already exited."""
    if proc.poll() is not None:
        return
    stop_group(proc, grace_s, reap_s=10)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout_s: float,
               log_path: Path | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = log_path.read_text("utf-8", "replace")[-4000:] if log_path else ""
            raise RuntimeError(f"server exited with code {proc.returncode} before it was "
                               f"ready:\n{log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s")


@contextlib.contextmanager
def serve_bento(bento_tag: str, *, host: str = "127.0.0.1", port: int | None = None,
                bentoml_home: str | os.PathLike | None = None,
                env: dict[str, str] | None = None, startup_timeout_s: float = 120.0,
                log_path: str | os.PathLike | None = None,
                cwd: str | os.PathLike | None = None) -> Iterator[RunningServer]:
    """``bentoml serve bento_tag`` on ``host:port`` until the block ends. ``bento_tag`` may
    also be a service import path (``module:Class``) found in ``cwd``."""
    port = port or free_port(host)
    child_env = {**os.environ, **QUIET_ENV, **(env or {})}
    if bentoml_home is not None:
        child_env["BENTOML_HOME"] = str(bentoml_home)
    with contextlib.ExitStack() as stack:
        if log_path is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="maas-serve-"))
            log_path = Path(tmp) / "server.log"
        log_path = Path(log_path)
        log = stack.enter_context(open(log_path, "wb"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", bento_tag, "--host", host,
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env,
            start_new_session=True, cwd=str(cwd or tempfile.gettempdir()))
        try:
            url = f"http://{host}:{port}"
            wait_ready(url, proc, startup_timeout_s, log_path)
            yield RunningServer(url=url, process=proc, log_path=log_path)
        finally:
            stop_process(proc)
