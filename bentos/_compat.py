"""BentoML adapter: the one thing packaging needs that BentoML has no public API for.

Re-pointing the local model and bento stores at a new ``$BENTOML_HOME`` inside a running process.
BentoML reads ``BENTOML_HOME`` once per process into cached dependency-injection singletons
(``bentoml._internal.configuration.containers.BentoMLContainer``), so a process that changes the
variable later (tests, notebooks, the MLflow deployment plugin serving several homes) would keep
writing to the first home. The public functions (``bentoml.models.create``/``list``,
``bentoml.bentos.build_bentofile``/``list``) take the store only as a private ``_model_store`` /
``_bento_store`` argument (checked on 1.4.40). Upstream: bentoml/BentoML#4080 "Can't modify
BENTOML_HOME when running build_bentofile from Python" (closed; the reporter's workaround was this
same container patch). ``tests/test_compat.py`` runs this against the installed BentoML: if the
container's providers change, or BentoML starts following the variable by itself, it fails there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def stores_at(home: Path) -> Iterator[Path]:
    """Inside the block, BentoML's home, model/bento/env stores and tmp dir live under ``home``."""
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    for sub in ("", "bentos", "models", "envs", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    c = BentoMLContainer
    patches = [
        (c.bentoml_home, str(home)),
        (c.bento_store_dir, str(home / "bentos")),
        (c.model_store_dir, str(home / "models")),
        (c.env_store_dir, str(home / "envs")),
        (c.tmp_bento_store_dir, str(home / "tmp")),
        (c.bento_store, BentoStore(str(home / "bentos"))),
        (c.model_store, ModelStore(str(home / "models"))),
        (c.tmp_bento_store, BentoStore(str(home / "tmp"))),
    ]
    with contextlib.ExitStack() as stack:
        for provider, value in patches:
            stack.enter_context(provider.patch(value))
        yield home
