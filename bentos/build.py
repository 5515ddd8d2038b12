"""Package a registered MLflow model (any family) as a BentoML bento.

``build_bento("models:/NAME@champion")`` resolves the alias to a pinned registry version, picks
the compression variant to serve (``bentos.variants``: the version's ``maas.variant`` tag or
``settings.variant``; never one outside its accuracy budget), writes its files (never pickle:
safetensors + tokenizer for the transformers flavour, a single-file ONNX graph + extra files for
ONNX variants, else the logged model's artifact folder as it is) into a new model in the BentoML
model store, and builds a bento from the version's service folder (``bentos.service_spec``: the
``maas.service`` tag, default ``bentos/text_classifier/``), with the packages of its serving
runtime (``bentos.runtimes``). The service reads a ``bento_config.json`` written
beside it in the build context (model tag, variant, batching, limits, traffic), so ``bentoml
serve <bento_tag>`` needs no environment variables. The version's model card (``maas.card_uri``
tag, written by ``registry.card``) goes in as ``model_card.md``/``.json``, served at ``GET /card``.

bentoml, mlflow, torch, transformers and onnx are imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bentos import recheck
from bentos.bento_card import bento_card
from bentos.runtimes import runtime as serving_runtime
from bentos.service_spec import ServiceSpec, service_spec
from bentos.settings import BentoSettings
from bentos.variants import Variant, check_no_pickle, choose_variant, save_onnx_variant

logger = logging.getLogger(__name__)

#: the text classifier's service folder and files (the default service; others: service_spec)
SERVICE_DIR = Path(__file__).resolve().parent / "text_classifier"
SERVICE_MODULE = "service"
SERVICE_CLASS = "TextClassifier"
#: the model-runtime module the text service loads from beside itself (copied into every bento)
RUNTIME_MODULE = "maas_runtime"
#: the request-body guard middleware the text service loads from beside itself (copied too)
GUARD_MODULE = "maas_guard"
CONFIG_FILENAME = "bento_config.json"
#: the version's model card inside the bento (served at GET /card; see bentos/bento_card.py)
CARD_FILENAME = "model_card.md"
CARD_JSON_FILENAME = "model_card.json"
#: label keys written on the BentoML model and the bento
LABEL_MANAGED = "maas.managed"
LABEL_NAME = "mlflow.model_name"
LABEL_VERSION = "mlflow.model_version"
LABEL_RUN_ID = "mlflow.run_id"
LABEL_ALIAS = "mlflow.alias"
LABEL_DEPLOYMENT = "maas.deployment"
LABEL_VARIANT = "maas.variant"

_TAG_MAX = 63
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^@]+)@(?P<alias>[^/@]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>.+)/(?P<version>\d+)$")


@dataclass(frozen=True)
class BuildResult:
    bento_tag: str
    model_tag: str
    model_name: str
    model_version: str
    run_id: str | None
    alias: str | None
    serve_command: str
    labels: list[str] = field(default_factory=list)
    bentoml_home: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    variant: str = "fp32"
    runtime: str = "torch"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sanitize_name(name: str) -> str:
    """A valid BentoML tag name (lowercase ``[a-z0-9._-]``, alphanumeric ends, <= 63 chars)."""
    out = re.sub(r"[^a-z0-9._-]+", "-", name.lower())
    out = re.sub(r"-{2,}", "-", out)[:_TAG_MAX]
    out = re.sub(r"^[^a-z0-9]+|[^a-z0-9]+$", "", out)
    return out or "model"


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None,
    VERSION). Anything else raises ``ValueError``."""
    if m := _ALIAS_URI.match(model_uri.strip()):
        return m["name"], m["alias"], None
    if m := _VERSION_URI.match(model_uri.strip()):
        return m["name"], None, m["version"]
    raise ValueError(f"{model_uri!r}: expected a registered model URI 'models:/NAME@ALIAS' or "
                     "'models:/NAME/VERSION'")


def bentoml_home() -> Path:
    """The BentoML home this process uses now (``$BENTOML_HOME``, else ``~/bentoml``)."""
    default = os.path.join(os.path.expanduser("~"), "bentoml")
    return Path(os.path.expandvars(os.path.expanduser(
        os.environ.get("BENTOML_HOME", default)))).resolve()


@contextlib.contextmanager
def bentoml_store_scope() -> Iterator[Path]:
    """Point BentoML's stores at the *current* ``$BENTOML_HOME``.

    BentoML resolves its home once per process, so a process that changes ``BENTOML_HOME`` later
    (tests, notebooks, several pipelines) would otherwise keep writing to the first one. Inside
    this context the home, model/bento stores and tmp dir follow the variable (the one use of
    BentoML internals, isolated in :mod:`bentos._compat`).
    """
    from bentos._compat import stores_at

    with stores_at(bentoml_home()) as home:
        yield home


def _resolve_version(name: str, alias: str | None, version: str | None):
    from mlflow import MlflowClient

    client = MlflowClient()
    if alias is not None:
        mv = client.get_model_version_by_alias(name, alias)
    else:
        mv = client.get_model_version(name, version)
    return mv


def _load_components(model_uri: str):
    import mlflow

    # the pinned version (or the variant's own logged model), so an alias move cannot mix models
    comp = mlflow.transformers.load_model(model_uri, return_type="components")
    model, tokenizer = comp.get("model"), comp.get("tokenizer")
    if model is None or tokenizer is None:
        raise ValueError(f"{model_uri} has no model+tokenizer components "
                         f"(found {sorted(comp)}); log it with mlflow.transformers.log_model("
                         "transformers_model={'model': ..., 'tokenizer': ...})")
    return model, tokenizer, comp.get("task")


def _labels_of(model) -> list[str]:
    id2label = getattr(model.config, "id2label", None) or {}
    n = int(getattr(model.config, "num_labels", len(id2label)) or len(id2label))
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def _check_no_pickle(path: Path) -> None:
    check_no_pickle(path)
    if not any(path.glob("*.safetensors")):
        raise RuntimeError(f"no safetensors weights were written to {path}")


@contextlib.contextmanager
def _fresh_module(*names: str) -> Iterator[None]:
    """BentoML imports the service by module name (``service``) into this process; make sure a
    cached module of that name (an earlier build, or someone else's) is not reused, and put
    things back afterwards."""
    saved = {name: sys.modules.pop(name, None) for name in names}
    try:
        yield
    finally:
        for name, module in saved.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module


@contextlib.contextmanager
def _build_context(context_dir: str | Path | None) -> Iterator[Path]:
    if context_dir is not None:
        path = Path(context_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="maas-bento-") as tmp:
        yield Path(tmp)


def write_build_context(ctx: Path, config: dict[str, Any], bentofile: dict[str, Any],
                        card: tuple[str, dict[str, Any]] | None = None,
                        service: ServiceSpec | None = None) -> None:
    """The service's files (``service``, default: the text classifier's) and the runtime table,
    ``bento_config.json``, the model card (Markdown + JSON, when given) and a
    ``bentofile.yaml``."""
    import yaml

    (service or service_spec({})).copy_into(ctx)
    (ctx / CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    if card is not None:
        (ctx / CARD_FILENAME).write_text(card[0], "utf-8")
        (ctx / CARD_JSON_FILENAME).write_text(json.dumps(card[1], indent=2, sort_keys=True)
                                              + "\n", "utf-8")
    (ctx / "bentofile.yaml").write_text(yaml.safe_dump(bentofile, sort_keys=False), "utf-8")


def _serve_command(bento_tag: str, home: Path) -> str:
    import shlex

    cmd = f"bentoml serve {bento_tag} --host 127.0.0.1 --port 3000"
    return f"BENTOML_HOME={shlex.quote(str(home))} {cmd}" if "BENTOML_HOME" in os.environ else cmd


def _write_model_files(variant: Variant, dest: Path) -> dict[str, Any]:
    """The variant's files into the BentoML model folder ``dest``; returns what the service needs
    to know about them (labels, runtime, and for ONNX the graph's inputs/output/limits)."""
    if serving_runtime(variant.runtime).model_file:  # an ONNX graph + its extra files
        meta = save_onnx_variant(variant, dest)
        return {"labels": [str(x) for x in meta["labels"]], "task": "text-classification",
                "architecture": "onnx", "flavor": "onnx",
                "onnx": {k: meta.get(k) for k in ("input_names", "output_name", "max_length",
                                                   "max_positions", "dtype")}}
    info = _model_info(variant.model_uri)
    if "transformers" not in info.flavors:
        return _write_logged_model(variant, info, dest)
    model, tokenizer, task = _load_components(variant.model_uri)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _check_no_pickle(dest)
    return {"labels": _labels_of(model), "task": task or "text-classification",
            "architecture": type(model).__name__, "flavor": "transformers"}


def _model_info(model_uri: str):
    from mlflow.models import get_model_info

    return get_model_info(model_uri)


def _write_logged_model(variant: Variant, info: Any, dest: Path) -> dict[str, Any]:
    """Any other flavour: the logged model's folder as it is (its family's service reads it);
    labels from the model's ``metadata.labels``."""
    import mlflow

    labels = [str(x) for x in ((info.metadata or {}).get("labels") or [])]
    if not labels:
        raise ValueError(f"{variant.model_uri} has no metadata.labels (log the model with "
                         "metadata={'labels': [...]} in probability-column order)")
    with tempfile.TemporaryDirectory(prefix="maas-model-") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=variant.model_uri,
                                                          dst_path=tmp))
        check_no_pickle(folder)
        shutil.copytree(folder, dest, dirs_exist_ok=True)
    flavor = next((f for f in info.flavors if f != "python_function"), "python_function")
    return {"labels": labels, "task": "classification", "flavor": flavor,
            "architecture": ",".join(sorted(info.flavors))}


def _description(name: str, version: str, alias: str | None, run_id: str | None,
                 variant: Variant, labels: list[str], model_tag: str) -> str:
    return (f"MaaS model: MLflow model `{name}` version {version}"
            f"{f' (alias `{alias}`)' if alias else ''}, run `{run_id}`; variant "
            f"`{variant.name}` ({variant.runtime}); labels {labels}; BentoML model "
            f"`{model_tag}`.")


def _bento_config(model_tag: str, settings: BentoSettings, metadata: dict[str, Any],
                  variant: Variant, files: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_tag": model_tag,
        "settings": settings.to_dict(),
        "mlflow": {k: metadata[k] for k in ("mlflow_model_name", "mlflow_version",
                                            "mlflow_run_id", "alias", "model_uri")},
        "labels": files["labels"],
        "flavor": files["flavor"],
        "variant": {**variant.to_dict(), **({"onnx": files["onnx"]} if "onnx" in files
                                           else {})},
    }


def _build_from_context(ctx: Path, config: dict[str, Any], bentofile: dict[str, Any],
                        card: tuple[str, dict[str, Any]] | None, service: ServiceSpec):
    import bentoml

    write_build_context(ctx, config, bentofile, card, service)
    cwd = os.getcwd()
    try:
        with _fresh_module(*service.modules):
            # the same call as the `bentoml build <ctx>` CLI
            return bentoml.bentos.build_bentofile(str(ctx / "bentofile.yaml"),
                                                  build_ctx=str(ctx))
    finally:
        _restore_cwd(cwd)


def _restore_cwd(cwd: str) -> None:
    """Back to ``cwd``: a build that fails while importing the service leaves the process in the
    build context, which is deleted next, and every later relative path would then fail."""
    try:
        if os.getcwd() == cwd:
            return
    except OSError:  # the folder it is in is gone
        pass
    os.chdir(cwd)


def _model_metadata(mv: Any, model_uri: str, run_id: str | None, alias: str | None,
                    settings: BentoSettings, variant: Variant) -> dict[str, Any]:
    name, version = mv.name, str(mv.version)
    return {"mlflow_model_name": name, "mlflow_version": version,
            "mlflow_run_id": run_id or "", "alias": alias or "",
            "aliases": list(getattr(mv, "aliases", None) or []), "model_uri": model_uri,
            "pinned_uri": f"models:/{name}/{version}", "mlflow_source": str(mv.source or ""),
            "quantize": settings.quantize,
            # BentoML metadata takes no None values
            "variant": {k: v for k, v in variant.to_dict().items() if v is not None}}


def _import_model(model_uri: str, name: str, variant: Variant, labels: dict[str, str],
                  metadata: dict[str, Any],
                  check: recheck.Plan | None = None) -> tuple[str, dict[str, Any]]:
    """The variant's files as a new model in the BentoML store: (its tag, what
    :func:`_write_model_files` says about them); ``check``'s candidates go in beside them."""
    import bentoml

    with bentoml.models.create(name=sanitize_name(name), labels=labels,
                               metadata=metadata) as bm:
        files = _write_model_files(variant, Path(bm.path))
        if check is not None:
            files["candidates"] = check.write(Path(bm.path), _write_model_files)
        bm.info.metadata.update(labels=files["labels"], task=files["task"],
                                architecture=files["architecture"])
    model_tag = str(bm.tag)
    logger.info("imported %s (variant %s) as BentoML model %s", model_uri, variant.name,
                model_tag)
    return model_tag, files


def _bentofile(bento_name: str, labels: dict[str, str], variant: Variant,
               description: str, service: ServiceSpec) -> dict[str, Any]:
    """The ``bentofile.yaml`` contents: the service, its files, labels and pinned packages."""
    from bentos.service_spec import RUNTIMES_FILE

    return {
        "service": service.entry, "name": bento_name,
        "description": description,
        "labels": labels,
        "include": [*(p.name for p in service.files), RUNTIMES_FILE,
                    CONFIG_FILENAME, CARD_FILENAME, CARD_JSON_FILENAME],
        "python": {"packages": service.packages(variant.runtime), "lock_packages": False},
    }


def build_bento(model_uri: str, settings: BentoSettings | None = None, *,
                bento_name: str | None = None,
                extra_labels: dict[str, str] | None = None,
                context_dir: str | Path | None = None) -> BuildResult:
    """Import the registered model version behind ``model_uri`` (its chosen compression variant,
    or ``settings.variant``) into the BentoML model store and build a bento serving it. Returns
    the tags and the command that serves it.

    ``bento_name`` defaults to the (sanitised) registered model name; ``extra_labels`` are added
    to the BentoML model and the bento; ``context_dir`` keeps the build context (``service.py``,
    ``maas_runtime.py``, ``bento_config.json``, ``bentofile.yaml``) there, so ``bentoml build
    DIR`` can rebuild it. A variant outside its accuracy budget, or unknown, is a ValueError."""
    import bentoml

    settings = settings or BentoSettings()
    name, alias, version = parse_model_uri(model_uri)
    mv = _resolve_version(name, alias, version)
    version = str(mv.version)
    tags = dict(getattr(mv, "tags", None) or {})
    run_id = mv.run_id or tags.get("maas.run_id") or None
    variant = choose_variant(tags, f"models:/{name}/{version}", settings.variant)
    service = service_spec(tags)
    # variants to re-time when served on a CPU unlike the one the choice was made on
    check = recheck.plan(tags, f"models:/{name}/{version}", variant, service.folder,
                         settings.variant)
    variant = check.settle(variant, _write_model_files, settings)  # re-timed on this CPU
    if settings.forward_batch_size is None and variant.forward_batch_size:
        # the pass size the pipeline measured fastest for this variant (else the runtime's)
        settings = settings.model_copy(update={"forward_batch_size": variant.forward_batch_size})
    logger.info("building a bento for %s -> %s version %s (run %s), variant %s (%s)", model_uri,
                name, version, run_id, variant.name, variant.runtime)
    bento_name = sanitize_name(bento_name) if bento_name else sanitize_name(name)
    str_labels = {LABEL_MANAGED: "true", LABEL_NAME: name, LABEL_VERSION: version,
                  LABEL_RUN_ID: run_id or "", LABEL_ALIAS: alias or "",
                  LABEL_DEPLOYMENT: bento_name, LABEL_VARIANT: variant.name,
                  **(extra_labels or {})}
    metadata = _model_metadata(mv, model_uri, run_id, alias, settings, variant)

    with bentoml_store_scope() as home:
        model_tag, files = _import_model(model_uri, name, variant, str_labels, metadata, check)
        config = _bento_config(model_tag, settings, metadata, variant, files)
        config["machine_check"] = check.config(files.get("candidates") or {})
        bentofile = _bentofile(bento_name, str_labels, variant, _description(
            name, version, alias, run_id, variant, files["labels"], model_tag), service)
        try:
            with _build_context(context_dir) as ctx:
                bento = _build_from_context(ctx, config, bentofile,
                                            bento_card(mv, tags, alias, variant, settings,
                                                       model_tag), service)
        except BaseException:
            logger.error("bento build failed; removing the BentoML model %s", model_tag)
            with contextlib.suppress(Exception):
                bentoml.models.delete(model_tag)
            raise
        bento_tag = str(bento.tag)
    logger.info("built bento %s", bento_tag)
    return BuildResult(bento_tag=bento_tag, model_tag=model_tag, model_name=name,
                       model_version=version, run_id=run_id, alias=alias,
                       serve_command=_serve_command(bento_tag, home), labels=files["labels"],
                       bentoml_home=str(home), settings=settings.to_dict(),
                       variant=variant.name, runtime=variant.runtime)
