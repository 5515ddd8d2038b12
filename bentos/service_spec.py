"""Which BentoML service folder a registered version is served from, and what goes into the bento.

A model family names its service as ``package.module:ServiceClass`` (the pipeline records it on
the version as the tag ``maas.service``; versions without it are text classifiers). The service
module's folder is the service folder: every ``*.py`` in it except ``__init__.py`` is copied into
the bento's build context (the service loads its helpers from its own folder, never by package
import), together with the serving-runtime table (``bentos/runtimes.py``, as
``maas_runtimes.py``). An optional ``requirements.txt`` in the folder lists the packages the
service imports (names only; pinned to the installed versions at build), added to the runtime's
own (:data:`bentos.runtimes.RUNTIMES`) and the server's (:data:`SERVER_PACKAGES`).
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from bentos.runtimes import pinned, runtime

TAG_SERVICE = "maas.service"
DEFAULT_SERVICE = "bentos.text_classifier.service:TextClassifier"
#: the runtime table inside every bento (the service loads it from its own folder)
RUNTIMES_FILE = "maas_runtimes.py"
REQUIREMENTS_FILE = "requirements.txt"
#: what every service needs: uvicorn picks these up (C event loop + HTTP parser); BentoML adds
#: its own pinned requirement, bentoml==<installed>, to every bento
SERVER_PACKAGES = ("pydantic", "uvloop", "httptools")


@dataclass(frozen=True)
class ServiceSpec:
    """A service folder: ``module`` (file stem) and ``cls`` inside ``folder``."""

    folder: Path
    module: str
    cls: str

    @property
    def files(self) -> list[Path]:
        """The service's Python files (copied into every bento)."""
        return sorted(p for p in self.folder.glob("*.py") if p.name != "__init__.py")

    @property
    def requirements(self) -> list[str]:
        return self.requirements_in(REQUIREMENTS_FILE)

    def requirements_in(self, filename: str) -> list[str]:
        """Package names listed in ``filename`` of the service folder (none if it is absent)."""
        path = self.folder / filename
        if not path.is_file():
            return []
        lines = (line.split("#", 1)[0].strip() for line in path.read_text("utf-8").splitlines())
        return [line for line in lines if line]

    @property
    def entry(self) -> str:
        """``bentofile.yaml``'s ``service:`` (module stem:class, inside the build context)."""
        return f"{self.module}:{self.cls}"

    @property
    def modules(self) -> list[str]:
        """Module names the copied files import as (cleared around a build): each file's own,
        and ``<service module>_<stem>``, under which a service caches the siblings it loads from
        its folder (another service built earlier in this process left its own there)."""
        stems = [p.stem for p in self.files]
        return stems + [f"{self.module}_{s}" for s in stems] + [Path(RUNTIMES_FILE).stem]

    def packages(self, runtime_name: str) -> list[str]:
        """Pinned packages of a bento serving a model in ``runtime_name`` with this service:
        the server's, the service's (``requirements.txt``, plus ``requirements-<runtime>.txt``
        for what it imports only with that runtime, e.g. transformers beside torch) and the
        runtime's."""
        return pinned((*SERVER_PACKAGES, *self.requirements,
                       *self.requirements_in(f"requirements-{runtime_name}.txt"),
                       *runtime(runtime_name).packages))

    def copy_into(self, ctx: Path) -> list[str]:
        """The service files and the runtime table into build context ``ctx``; their names."""
        names = []
        for src in self.files:
            shutil.copy2(src, ctx / src.name)
            names.append(src.name)
        shutil.copy2(Path(__file__).resolve().parent / "runtimes.py", ctx / RUNTIMES_FILE)
        return [*names, RUNTIMES_FILE]


def service_spec(tags: dict[str, str]) -> ServiceSpec:
    """The service of a version with model-version ``tags`` (``maas.service``; default: the
    text classifier's). ValueError naming the tag when it cannot be found."""
    spec = tags.get(TAG_SERVICE) or DEFAULT_SERVICE
    module, sep, cls = spec.partition(":")
    if not sep or not module or not cls.isidentifier():
        raise ValueError(f"tag {TAG_SERVICE}={spec!r}: expected 'package.module:ServiceClass'")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"tag {TAG_SERVICE}={spec!r}: cannot find {module!r} ({exc})") from None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        raise ValueError(f"tag {TAG_SERVICE}={spec!r}: no Python file for module {module!r} "
                         "(is its package installed here?)")
    origin = Path(found.origin)
    return ServiceSpec(origin.parent, origin.stem, cls)
