"""The webhook receiver's builds: :class:`Rebuilder` runs the rebuilds of ``NAME@champion``, one
at a time, in one background thread, skipping a champion it has built already;
:func:`mlflow_rebuilder` wires it to the MLflow registry and :func:`bentos.build.build_bento`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger(__name__)

CHAMPION = "champion"
#: model-version tags written after a build
TAG_BENTO = "maas.bento_tag"
TAG_BENTO_BUILT_AT = "maas.bento_built_at"


class Rebuilder:
    """Runs rebuilds one at a time in one background thread.

    ``request(name)`` queues a model (requests for a model already queued merge into one); the
    worker reads the model's current champion with ``champion_version(name)`` and, unless it is
    the version this receiver built last for that model, calls ``build(name) -> (bento_tag,
    version)`` and then ``record(name, version, bento_tag)``. A failed build is logged and kept in
    :meth:`status`; the next event for the model tries again. ``forget(name)`` (champion deleted)
    makes the next champion event build even if it names the same version.
    """

    def __init__(self, build: Callable[[str], tuple[str, str]],
                 champion_version: Callable[[str], str | None],
                 record: Callable[[str, str, str], None]):
        self._build, self._champion, self._record = build, champion_version, record
        self._cv = threading.Condition()
        self._pending: dict[str, None] = {}
        self._last: dict[str, str] = {}
        self._busy: str | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.builds: list[dict[str, str]] = []
        self.failures: list[dict[str, str]] = []
        self.skipped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="maas-webhook-build", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def request(self, name: str) -> None:
        with self._cv:
            self._pending[name] = None
            self._cv.notify_all()

    def forget(self, name: str) -> None:
        with self._cv:
            self._last.pop(name, None)

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._pending or self._busy is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def status(self) -> dict[str, Any]:
        with self._cv:
            return {"builds": list(self.builds), "failures": list(self.failures),
                    "skipped": self.skipped, "pending": list(self._pending),
                    "building": self._busy, "last_built": dict(self._last)}

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                name = next(iter(self._pending))
                del self._pending[name]
                self._busy = name
            try:
                self._rebuild(name)
            except Exception as exc:  # one failed build must not stop the worker
                logger.exception("rebuild of %s@%s failed", name, CHAMPION)
                with self._cv:
                    self.failures.append({"name": name, "error": f"{type(exc).__name__}: "
                                                                 f"{str(exc)[:300]}"})
            finally:
                with self._cv:
                    self._busy = None
                    self._cv.notify_all()

    def _rebuild(self, name: str) -> None:
        current = self._champion(name)
        if current is None:
            logger.info("%s has no %s alias now; nothing to build", name, CHAMPION)
            return
        with self._cv:
            if self._last.get(name) == current:
                self.skipped += 1
                logger.info("%s@%s is version %s, already built by this receiver; skipping",
                            name, CHAMPION, current)
                return
        bento_tag, version = self._build(name)
        self._record(name, version, bento_tag)
        with self._cv:
            self._last[name] = version
            self.builds.append({"name": name, "version": version, "bento_tag": bento_tag})
        logger.info("rebuilt %s@%s (version %s) as bento %s", name, CHAMPION, version, bento_tag)


def mlflow_rebuilder(settings: Any = None) -> Rebuilder:
    """A :class:`Rebuilder` on the MLflow registry of ``MLFLOW_TRACKING_URI`` and the BentoML
    store of ``BENTOML_HOME``, building with :func:`bentos.build.build_bento` and ``settings``."""

    def build(name: str) -> tuple[str, str]:
        from bentos.build import build_bento

        result = build_bento(f"models:/{name}@{CHAMPION}", settings)
        return result.bento_tag, result.model_version

    def champion_version(name: str) -> str | None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            return str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def record(name: str, version: str, bento_tag: str) -> None:
        from mlflow import MlflowClient

        client = MlflowClient()
        client.set_model_version_tag(name, version, TAG_BENTO, bento_tag)
        client.set_model_version_tag(name, version, TAG_BENTO_BUILT_AT, datetime.now(
            timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"))

    return Rebuilder(build, champion_version, record)
