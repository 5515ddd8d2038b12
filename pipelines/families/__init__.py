"""Model families: one module per family, each a :class:`~pipelines.families.base.Family`
subclass (the contract, in ``base.py``), registered by one line in :data:`FAMILIES`.

Adding a family = one module (a ``Family`` subclass) + its BentoML service folder + one line
below. A family that lives outside this package needs no line here: the pipeline file's
``model.family`` may also be an import path, ``package.module:ClassName`` (the module must be
importable, e.g. installed or on ``PYTHONPATH``). The pipeline only ever calls
:func:`load_family`; nothing else branches on the family's name.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from pipelines.families.base import Family

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

#: family name -> "module:Class" of its Family subclass
FAMILIES: dict[str, str] = {
    "text_classifier": "pipelines.families.text_classifier:TextClassifier",
    "image_classifier": "pipelines.families.image_classifier:ImageClassifier",
    "text_embedder": "pipelines.families.text_embedder:TextEmbedder",
}


def family_path(spec: str) -> str:
    """The "module:Class" import path of ``spec`` (a name in FAMILIES, or itself such a path)."""
    if spec in FAMILIES:
        return FAMILIES[spec]
    module, sep, cls = spec.partition(":")
    if not sep or not module or not cls.isidentifier():
        raise ValueError(f"unknown model family {spec!r}; known: {sorted(FAMILIES)}, or an "
                         "import path 'package.module:ClassName'")
    return spec


def family_class(spec: str) -> type[Family]:
    """The Family subclass named by ``spec`` (see :func:`family_path`)."""
    module, _, name = family_path(spec).partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ValueError(f"model family {spec!r}: cannot import {module!r} ({exc})") from None
    except AttributeError:
        raise ValueError(f"model family {spec!r}: {module!r} has no {name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise ValueError(f"model family {spec!r}: {module}:{name} is not a "
                         "pipelines.families.base.Family subclass")
    return cls


def load_family(cfg: PipelineConfig) -> Family:
    """The family of ``cfg.model.family``, set up for this pipeline."""
    return family_class(cfg.model.family)(cfg)


def get_family(name: str) -> ModuleType:
    """The module of a family (its module-level helpers; older callers). Prefer
    :func:`load_family`."""
    return importlib.import_module(family_path(name).partition(":")[0])
