"""Package a registered MLflow text classifier as a BentoML bento.

``build_bento("models:/NAME@champion")`` resolves the alias to a pinned registry version, loads the
transformers components of that version, writes them (safetensors + tokenizer files, never pickle)
into a new model in the BentoML model store, and builds a bento from the service in
``bentos/text_classifier/``. The service reads a ``bento_config.json`` written beside it in the build
context (model tag, batching, limits, traffic), so ``bentoml serve <bento_tag>`` needs no
environment variables.

bentoml, mlflow, torch and transformers are imported inside the functions only.
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

logger = logging.getLogger(__name__)

SERVICE_DIR = Path(__file__).resolve().parent / "text_classifier"
SERVICE_MODULE = "service"
SERVICE_CLASS = "TextClassifier"
CONFIG_FILENAME = "bento_config.json"
#: what the service imports at serving time, pinned to the versions installed here (BentoML adds
#: its own pinned requirement, bentoml==<installed>, to every bento)
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "pydantic")
#: label keys written on the BentoML model and the bento
LABEL_MANAGED = "maas.managed"
LABEL_NAME = "mlflow.model_name"
LABEL_VERSION = "mlflow.model_version"
LABEL_RUN_ID = "mlflow.run_id"
LABEL_ALIAS = "mlflow.alias"
LABEL_DEPLOYMENT = "maas.deployment"

_TAG_MAX = 63
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^@]+)@(?P<alias>[^/@]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>.+)/(?P<version>\d+)$")


@dataclass(frozen=True)
class BentoSettings:
    """Serving settings baked into the bento.

    ``max_batch_size`` caps the texts per model call (BentoML's adaptive batcher merges the texts
    of concurrent requests and splits a large request across calls; 1 turns batching off).
    ``max_latency_ms`` is *not* a target latency: BentoML 1.4's batcher cancels queued requests
    whose estimated completion time exceeds it and answers them 503 (its estimate is rough,
    especially before it has seen batches of many sizes), so keep it well above the p99 you
    expect; admission control is ``max_concurrency`` (in-flight requests per service, the excess
    gets 429) and ``timeout`` (seconds per request, then 504). ``max_texts``/``max_chars`` are
    the per-request limits (400 naming the limit). ``quantize`` applies dynamic int8
    quantisation of ``nn.Linear`` at load time on CPU (ignored on GPU, where the model runs in
    bf16/fp16).
    """

    max_batch_size: int = 32
    max_latency_ms: int = 5000
    max_texts: int = 64
    max_chars: int = 2000
    timeout: float = 30.0
    max_concurrency: int = 64
    workers: int = 1
    quantize: bool = False
    service_name: str | None = None
    #: tokeniser truncation length; None = min(tokenizer.model_max_length, max positions)
    max_tokens: int | None = None
    #: torch CPU threads per worker; None = cores // workers, less one for the event loop
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_latency_ms", "max_texts", "max_chars",
                     "max_concurrency", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BentoSettings.{name} must be a positive integer, got {value!r}")
        for name in ("max_tokens", "torch_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"BentoSettings.{name} must be a positive integer or None, "
                                 f"got {value!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) \
                or self.timeout <= 0:
            raise ValueError(f"BentoSettings.timeout must be > 0 seconds, got {self.timeout!r}")
        if not isinstance(self.quantize, bool):
            raise ValueError(  # noqa: TRY004 (callers handle ValueError for all settings)
                f"BentoSettings.quantize must be a bool, got {self.quantize!r}")
        if self.service_name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*",
                                                              self.service_name):
            raise ValueError("BentoSettings.service_name must be a Python-identifier-like name "
                             f"(letters, digits, _), got {self.service_name!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, config: dict[str, Any] | None) -> BentoSettings:
        """Settings from a plain mapping (e.g. an MLflow deployment ``config``); string values
        such as ``"32"`` or ``"true"`` (from ``mlflow deployments create -C k=v``) are converted.
        Unknown keys raise ``ValueError``."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config or {}) - set(known))
        if unknown:
            raise ValueError(f"unknown bento setting(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, raw in (config or {}).items():
            default = known[key].default
            values[key] = _coerce(key, raw, default)
        return cls(**values)


def _coerce(key: str, raw: Any, default: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"bento setting {key}: expected a boolean, got {raw!r}")
    if key == "service_name":
        return text or None
    if text.lower() in ("", "none", "null") and default is None:
        return None
    try:
        return float(text) if isinstance(default, float) else int(text)
    except ValueError:
        raise ValueError(f"bento setting {key}: expected a number, got {raw!r}") from None


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
    return Path(os.path.expandvars(os.path.expanduser(
        os.environ.get("BENTOML_HOME", os.path.join(os.path.expanduser("~"), "bentoml"))))).resolve()


@contextlib.contextmanager
def bentoml_store_scope() -> Iterator[Path]:
    """Point BentoML's stores at the *current* ``$BENTOML_HOME``.

    BentoML resolves its home once per process (cached DI singletons), so a process that changes
    ``BENTOML_HOME`` later (tests, notebooks, several pipelines) would otherwise keep writing to the
    first one. Inside this context the home, model/bento stores and tmp dir follow the variable.
    """
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    home = bentoml_home()
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


def _pinned_packages() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for pkg in SERVING_PACKAGES:
        try:
            v = version(pkg)
        except PackageNotFoundError:
            pins.append(pkg)
            continue
        pins.append(f"{pkg}=={v.split('+', 1)[0]}")  # drop local labels such as +cpu / +cu124
    return pins


def _resolve_version(name: str, alias: str | None, version: str | None):
    from mlflow import MlflowClient

    client = MlflowClient()
    if alias is not None:
        mv = client.get_model_version_by_alias(name, alias)
    else:
        mv = client.get_model_version(name, version)
    return mv


def _load_components(name: str, version: str):
    import mlflow

    # pinned to the version resolved above, so a concurrent alias move cannot mix versions
    comp = mlflow.transformers.load_model(f"models:/{name}/{version}", return_type="components")
    model, tokenizer = comp.get("model"), comp.get("tokenizer")
    if model is None or tokenizer is None:
        raise ValueError(f"models:/{name}/{version} has no model+tokenizer components "
                         f"(found {sorted(comp)}); log it with mlflow.transformers.log_model("
                         "transformers_model={'model': ..., 'tokenizer': ...})")
    return model, tokenizer, comp.get("task")


def _labels_of(model) -> list[str]:
    id2label = getattr(model.config, "id2label", None) or {}
    n = int(getattr(model.config, "num_labels", len(id2label)) or len(id2label))
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def _check_no_pickle(path: Path) -> None:
    bad = [p.name for p in path.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl",
                                                             ".pickle", ".ckpt")]
    if bad:
        raise RuntimeError(f"refusing to package pickle-based weight files {bad}")
    if not any(path.glob("*.safetensors")):
        raise RuntimeError(f"no safetensors weights were written to {path}")


@contextlib.contextmanager
def _fresh_module(name: str) -> Iterator[None]:
    """BentoML imports the service by module name (``service``) into this process; make sure a
    cached module of that name (an earlier build, or someone else's) is not reused, and put
    things back afterwards."""
    saved = sys.modules.pop(name, None)
    try:
        yield
    finally:
        sys.modules.pop(name, None)
        if saved is not None:
            sys.modules[name] = saved


@contextlib.contextmanager
def _build_context(context_dir: str | Path | None) -> Iterator[Path]:
    if context_dir is not None:
        path = Path(context_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="maas-bento-") as tmp:
        yield Path(tmp)


def write_build_context(ctx: Path, config: dict[str, Any], bentofile: dict[str, Any]) -> None:
    """The service file, its ``bento_config.json`` and a ``bentofile.yaml`` in ``ctx``."""
    import yaml

    shutil.copy2(SERVICE_DIR / f"{SERVICE_MODULE}.py", ctx / f"{SERVICE_MODULE}.py")
    (ctx / CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    (ctx / "bentofile.yaml").write_text(yaml.safe_dump(bentofile, sort_keys=False), "utf-8")


def _serve_command(bento_tag: str, home: Path) -> str:
    import shlex

    cmd = f"bentoml serve {bento_tag} --host 127.0.0.1 --port 3000"
    return f"BENTOML_HOME={shlex.quote(str(home))} {cmd}" if "BENTOML_HOME" in os.environ else cmd


def build_bento(model_uri: str, settings: BentoSettings | None = None, *,
                bento_name: str | None = None,
                extra_labels: dict[str, str] | None = None,
                context_dir: str | Path | None = None) -> BuildResult:
    """Import the registered model version behind ``model_uri`` into the BentoML model store and
    build a bento serving it. Returns the tags and the command that serves it.

    ``bento_name`` defaults to the (sanitised) registered model name; ``extra_labels`` are added
    to the BentoML model and the bento; ``context_dir`` keeps the build context (``service.py``,
    ``bento_config.json``, ``bentofile.yaml``) there, so ``bentoml build DIR`` can rebuild it."""
    import bentoml

    settings = settings or BentoSettings()
    name, alias, version = parse_model_uri(model_uri)
    mv = _resolve_version(name, alias, version)
    version = str(mv.version)
    tags = dict(getattr(mv, "tags", None) or {})
    run_id = mv.run_id or tags.get("maas.run_id") or None
    logger.info("building a bento for %s -> %s version %s (run %s)", model_uri, name, version,
                run_id)

    model, tokenizer, task = _load_components(name, version)
    labels = _labels_of(model)
    model_name = sanitize_name(name)
    bento_name = sanitize_name(bento_name) if bento_name else model_name
    str_labels = {
        LABEL_MANAGED: "true",
        LABEL_NAME: name,
        LABEL_VERSION: version,
        LABEL_RUN_ID: run_id or "",
        LABEL_ALIAS: alias or "",
        LABEL_DEPLOYMENT: bento_name,
        **(extra_labels or {}),
    }
    metadata = {
        "mlflow_model_name": name,
        "mlflow_version": version,
        "mlflow_run_id": run_id or "",
        "alias": alias or "",
        "aliases": list(getattr(mv, "aliases", None) or []),
        "model_uri": model_uri,
        "pinned_uri": f"models:/{name}/{version}",
        "mlflow_source": str(mv.source or ""),
        "task": task or "text-classification",
        "labels": labels,
        "quantize": settings.quantize,
        "architecture": type(model).__name__,
    }

    with bentoml_store_scope() as home:
        with bentoml.models.create(name=model_name, labels=str_labels, metadata=metadata) as bm:
            model.save_pretrained(bm.path)
            tokenizer.save_pretrained(bm.path)
            _check_no_pickle(Path(bm.path))
        model_tag = str(bm.tag)
        logger.info("imported %s as BentoML model %s", model_uri, model_tag)

        config = {
            "model_tag": model_tag,
            "settings": settings.to_dict(),
            "mlflow": {k: metadata[k] for k in ("mlflow_model_name", "mlflow_version",
                                                "mlflow_run_id", "alias", "model_uri")},
            "labels": labels,
        }
        description = (f"MaaS text classifier: MLflow model `{name}` version {version}"
                       f"{f' (alias `{alias}`)' if alias else ''}, run `{run_id}`; labels "
                       f"{labels}; BentoML model `{model_tag}`.")
        bentofile = {
            "service": f"{SERVICE_MODULE}:{SERVICE_CLASS}",
            "name": bento_name,
            "description": description,
            "labels": str_labels,
            "include": [f"{SERVICE_MODULE}.py", CONFIG_FILENAME],
            "python": {"packages": _pinned_packages(), "lock_packages": False},
        }
        try:
            with _build_context(context_dir) as ctx:
                write_build_context(ctx, config, bentofile)
                with _fresh_module(SERVICE_MODULE):
                    # the same call as the `bentoml build <ctx>` CLI
                    bento = bentoml.bentos.build_bentofile(str(ctx / "bentofile.yaml"),
                                                           build_ctx=str(ctx))
        except BaseException:
            logger.error("bento build failed; removing the BentoML model %s", model_tag)
            with contextlib.suppress(Exception):
                bentoml.models.delete(model_tag)
            raise
        bento_tag = str(bento.tag)
    logger.info("built bento %s", bento_tag)
    return BuildResult(
        bento_tag=bento_tag,
        model_tag=model_tag,
        model_name=name,
        model_version=version,
        run_id=run_id,
        alias=alias,
        serve_command=_serve_command(bento_tag, home),
        labels=labels,
        bentoml_home=str(home),
        settings=settings.to_dict(),
    )
