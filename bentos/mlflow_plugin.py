"""MLflow deployments target ``bentoml`` (entry point ``mlflow.deployments: bentoml``).

A *deployment* is a bento name in the local BentoML store (``$BENTOML_HOME``): creating one imports
the registered model version into the model store and builds a bento named after the deployment
(:func:`bentos.build_bento`); every BentoML model and bento it builds carries the label
``maas.deployment=<name>``, which is how get/list/delete find them. Serving is ``bentoml serve``
(see :func:`run_local` or the ``serve_command`` in each deployment's description); ``predict``
calls a running server over HTTP.

    from mlflow.deployments import get_deploy_client
    client = get_deploy_client("bentoml")
    client.create_deployment("sentiment", "models:/sst2-sentiment@champion",
                             config={"max_batch_size": "32", "quantize": "true"})
    client.predict("sentiment", ["a gorgeous film"], endpoint="http://127.0.0.1:3000")

This module imports cheaply and never raises at import (bentoml loads on first use).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
)

from bentos.build import (
    CONFIG_FILENAME,
    LABEL_ALIAS,
    LABEL_DEPLOYMENT,
    LABEL_NAME,
    LABEL_RUN_ID,
    LABEL_VERSION,
    BentoSettings,
    bentoml_store_scope,
    sanitize_name,
)

logger = logging.getLogger(__name__)

TARGET = "bentoml"
#: config keys the plugin itself reads; every other key is a BentoSettings field
PLUGIN_KEYS = ("url", "host", "port")
LABEL_URL = "maas.url"
URL_ENV = "MAAS_BENTOML_URL"
#: MLflow flavours the target serves: transformers (text), onnx (ONNX variants), python_function
#: (a family's own model logged from code, served by its family's service; see bentos/build.py)
SUPPORTED_FLAVORS = (None, "transformers", "onnx", "python_function", "pyfunc")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or sanitize_name(name) != name:
        raise MlflowException(
            f"deployment name {name!r} is not a valid BentoML name: use lowercase letters, "
            f"digits, '-', '_' or '.', starting and ending with a letter or digit "
            f"(for example {sanitize_name(str(name))!r})", error_code=INVALID_PARAMETER_VALUE)
    return name


def _check_flavor(flavor: str | None) -> None:
    if flavor not in SUPPORTED_FLAVORS:
        raise MlflowException(f"flavor {flavor!r} is not supported by the bentoml target: "
                              f"it serves MaaS models of the flavours "
                              f"{[f for f in SUPPORTED_FLAVORS if f]}",
                              error_code=INVALID_PARAMETER_VALUE)


def _split_config(config: dict[str, Any] | None) -> tuple[BentoSettings, dict[str, Any]]:
    config = dict(config or {})
    plugin = {k: config.pop(k) for k in PLUGIN_KEYS if k in config}
    try:
        settings = BentoSettings.from_mapping(config)
    except ValueError as exc:
        raise MlflowException(f"bad bentoml deployment config: {exc} (plugin keys: "
                              f"{list(PLUGIN_KEYS)})",
                              error_code=INVALID_PARAMETER_VALUE) from None
    return settings, plugin


def _bentos_of(name: str) -> list[Any]:
    """The bentos of deployment ``name``, newest first (call inside bentoml_store_scope)."""
    import bentoml

    found = [b for b in bentoml.bentos.list() if b.info.labels.get(LABEL_DEPLOYMENT) == name]
    return sorted(found, key=lambda b: b.info.creation_time, reverse=True)


def _models_of(name: str) -> list[Any]:
    import bentoml

    return [m for m in bentoml.models.list() if m.info.labels.get(LABEL_DEPLOYMENT) == name]


def _bento_config(bento: Any) -> dict[str, Any]:
    try:
        return json.loads((Path(bento.path) / "src" / CONFIG_FILENAME).read_text("utf-8"))
    except (OSError, ValueError):
        return {}


def _describe(name: str, bentos: list[Any]) -> dict[str, Any]:
    newest = bentos[0]
    labels = dict(newest.info.labels)
    config = _bento_config(newest)
    tag = str(newest.tag)
    home = os.environ.get("BENTOML_HOME")
    serve = f"bentoml serve {tag} --host 127.0.0.1 --port 3000"
    return {
        "name": name,
        "flavor": config.get("flavor") or "transformers",
        "bento_tag": tag,
        "model_tag": config.get("model_tag", ""),
        "model_name": labels.get(LABEL_NAME, ""),
        "model_version": labels.get(LABEL_VERSION, ""),
        "run_id": labels.get(LABEL_RUN_ID, ""),
        "alias": labels.get(LABEL_ALIAS, ""),
        "variant": (config.get("variant") or {}).get("name", "fp32"),
        "runtime": (config.get("variant") or {}).get("runtime", "torch"),
        "model_uri": (config.get("mlflow") or {}).get("model_uri", ""),
        "url": labels.get(LABEL_URL, ""),
        "settings": config.get("settings", {}),
        "labels": config.get("labels", []),
        "created": newest.info.creation_time.isoformat(),
        "versions": [str(b.tag) for b in bentos],
        "serve_command": (f"BENTOML_HOME={shlex.quote(home)} {serve}" if home else serve),
    }


class BentoMLDeploymentClient(BaseDeploymentClient):
    """Deployments of registered MLflow text classifiers as local BentoML bentos."""

    def __init__(self, target_uri: str = TARGET) -> None:
        super().__init__(target_uri)

    # -- create / update ---------------------------------------------------------------------
    def _build(self, name: str, model_uri: str, settings: BentoSettings,
               plugin: dict[str, Any]) -> dict[str, Any]:
        from bentos.build import build_bento

        labels = {LABEL_DEPLOYMENT: name}
        if plugin.get("url"):
            labels[LABEL_URL] = str(plugin["url"])
        try:
            build_bento(model_uri, settings, bento_name=name, extra_labels=labels)
        except ValueError as exc:  # not a registered model version; unknown/over-budget variant
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return self.get_deployment(name)

    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        """Build a bento named ``name`` from ``model_uri`` (``models:/NAME@ALIAS`` or
        ``models:/NAME/VERSION``); ``config`` holds BentoSettings fields (strings are
        converted) and optionally ``url`` (where the deployment will be served)."""
        _check_name(name)
        _check_flavor(flavor)
        settings, plugin = _split_config(config)
        with bentoml_store_scope():
            if _bentos_of(name):
                raise MlflowException(f"deployment {name!r} already exists; use "
                                      "update_deployment", error_code=RESOURCE_ALREADY_EXISTS)
        return self._build(name, model_uri, settings, plugin)

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        """Build a new bento version of deployment ``name``: ``model_uri`` defaults to the one the
        newest version was built from (so an alias URI picks up a moved alias), ``config`` is
        merged over its settings. Older versions stay in the store until deleted."""
        _check_flavor(flavor)
        current = self.get_deployment(name)
        merged = {**current["settings"], **{k: v for k, v in (config or {}).items()}}
        if current.get("url") and "url" not in merged:
            merged["url"] = current["url"]
        settings, plugin = _split_config(merged)
        return self._build(name, model_uri or current["model_uri"], settings, plugin)

    # -- read / delete -----------------------------------------------------------------------
    def get_deployment(self, name, endpoint=None):
        with bentoml_store_scope():
            bentos = _bentos_of(name)
            if not bentos:
                raise MlflowException(f"no bentoml deployment named {name!r}",
                                      error_code=RESOURCE_DOES_NOT_EXIST)
            return _describe(name, bentos)

    def list_deployments(self, endpoint=None):
        import bentoml

        with bentoml_store_scope():
            names = sorted({b.info.labels[LABEL_DEPLOYMENT] for b in bentoml.bentos.list()
                            if LABEL_DEPLOYMENT in b.info.labels})
            return [_describe(n, _bentos_of(n)) for n in names]

    def delete_deployment(self, name, config=None, endpoint=None):
        """Remove every bento and BentoML model labelled with deployment ``name`` (the MLflow
        registry is not touched). Deleting a deployment that does not exist is a no-op."""
        import bentoml

        with bentoml_store_scope():
            bentos, models = _bentos_of(name), _models_of(name)
            for bento in bentos:
                bentoml.bentos.delete(bento.tag)
            for model in models:
                bentoml.models.delete(model.tag)
        logger.info("deleted deployment %s: %d bento(s), %d model(s)", name, len(bentos),
                    len(models))

    # -- predict -----------------------------------------------------------------------------
    def _url(self, deployment_name: str | None, endpoint: str | None) -> str:
        url = endpoint
        if not url and deployment_name:
            with bentoml_store_scope():
                bentos = _bentos_of(deployment_name)
            if not bentos:
                raise MlflowException(f"no bentoml deployment named {deployment_name!r}",
                                      error_code=RESOURCE_DOES_NOT_EXIST)
            url = bentos[0].info.labels.get(LABEL_URL)
        url = url or os.environ.get(URL_ENV)
        if not url:
            raise MlflowException(
                "predict needs a running server: pass endpoint='http://127.0.0.1:3000', create "
                f"the deployment with config url=..., or set {URL_ENV} (start one with "
                "`mlflow deployments run-local -t bentoml ...` or the deployment's "
                "serve_command)", error_code=INVALID_PARAMETER_VALUE)
        return url.rstrip("/")

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        """POST ``inputs`` to the running server's API, in chunks of its per-request limit. The
        server's ``/metadata`` says which API (``api``: route, input field, max items; a server
        without it is a text classifier: ``/classify``, ``texts``, ``max_texts``). Inputs: one
        item, a list, ``{field: [...]}``, a pandas Series, or a DataFrame with one column (or
        one named after the field); image items are bytes, paths of image files, or base64
        text. Returns ``PredictionsResponse({"predictions": [one answer per item, ...]})``."""
        import httpx

        url = self._url(deployment_name, endpoint)
        predictions: list[Any] = []
        with httpx.Client(timeout=60.0) as http:
            meta = http.get(f"{url}/metadata")
            route, field, output, chunk = _api_of(meta.json() if meta.is_success else {})
            items = _items_of(inputs, field)
            for i in range(0, len(items), chunk):
                resp = http.post(f"{url}{route}", json={field: items[i:i + chunk]})
                if not resp.is_success:
                    raise MlflowException(f"{url}{route} answered {resp.status_code}: "
                                          f"{resp.text[:500]}",
                                          error_code=INVALID_PARAMETER_VALUE
                                          if resp.status_code < 500 else None)
                answer = resp.json()
                predictions.extend(answer[output] if output else answer)
        return PredictionsResponse({"predictions": predictions})


def _api_of(meta: dict[str, Any]) -> tuple[str, str, str, int]:
    """(route, input field, output field or "" for a list answer, items per request) of a
    served MaaS bento's ``/metadata``."""
    api = meta.get("api") or {}
    route = str(api.get("route") or "/classify")
    field = str(api.get("input") or "texts")
    chunk = int(api.get("max_items") or meta.get("max_texts") or 64)
    return route, field, str(api.get("output") or ""), max(1, chunk)


def _items_of(inputs: Any, field: str) -> list[Any]:
    """The list of items to send in ``field`` (see ``predict``)."""
    single = (str, bytes, Path)
    if isinstance(inputs, single):
        inputs = [inputs]
    if isinstance(inputs, dict):
        inputs = inputs.get(field, inputs.get("inputs"))
    try:
        import pandas as pd

        if isinstance(inputs, pd.DataFrame):
            names = (field, field.rstrip("s"), "text", "sentence", "path", "inputs")
            cols = [c for c in names if c in inputs.columns]
            if not cols and len(inputs.columns) != 1:
                raise MlflowException(f"a DataFrame input needs one column (or one named "
                                      f"{field!r})", error_code=INVALID_PARAMETER_VALUE)
            inputs = inputs[cols[0] if cols else inputs.columns[0]]
        if isinstance(inputs, pd.Series):
            inputs = inputs.tolist()
    except ImportError:  # pragma: no cover - pandas comes with mlflow
        pass
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise MlflowException(f"inputs must be one item, a non-empty list, {{{field!r}: "
                              "[...]}, or a DataFrame/Series of them",
                              error_code=INVALID_PARAMETER_VALUE)
    return [_image_item(x) for x in inputs] if field == "images" else list(inputs)


def _image_item(item: Any) -> str:
    """An image for a JSON request: bytes and image-file paths become base64; other text is
    taken as base64 already (the server refuses it with 400 when it is not)."""
    import base64

    if isinstance(item, str) and len(item) < 4096 and Path(item).is_file():
        item = Path(item)
    if isinstance(item, Path):
        try:
            item = item.read_bytes()
        except OSError as exc:
            raise MlflowException(f"cannot read image {item}: {exc}",
                                  error_code=INVALID_PARAMETER_VALUE) from None
    if isinstance(item, (bytes, bytearray)):
        return base64.b64encode(item).decode("ascii")
    if isinstance(item, str):
        return item
    raise MlflowException(f"an image must be bytes, a file path or base64 text, not "
                          f"{type(item).__name__}", error_code=INVALID_PARAMETER_VALUE)


def run_local(name, model_uri, flavor=None, config=None):
    """Build the deployment's bento (or reuse it when it already exists with the same model URI
    and no config is given) and serve it in the foreground with ``bentoml serve`` on
    ``config['host']`` (default 127.0.0.1) and ``config['port']`` (default 3000) until
    interrupted.

    The signature is what ``mlflow.deployments.run_local`` calls (``name, model_uri, flavor,
    config``: MLflow's base-module docstring also lists ``target``, but the target is not passed).
    """
    _check_name(name)
    _check_flavor(flavor)
    config = dict(config or {})
    host = str(config.pop("host", "127.0.0.1"))
    port = int(config.pop("port", 3000))
    client = BentoMLDeploymentClient(TARGET)
    try:
        current = client.get_deployment(name)
    except MlflowException:
        current = None
    if current is None:
        current = client.create_deployment(name, model_uri, flavor, config)
    elif current["model_uri"] != model_uri or config:
        current = client.update_deployment(name, model_uri, flavor, config)
    cmd = [sys.executable, "-m", "bentoml", "serve", current["bento_tag"], "--host", host,
           "--port", str(port)]
    print(f"serving deployment {name} ({current['bento_tag']}) on http://{host}:{port}",
          file=sys.stderr)
    subprocess.run(cmd, check=True)


def target_help():
    fields = ", ".join(BentoSettings.model_fields)
    return f"""\
Target `bentoml`: builds a local BentoML bento (in $BENTOML_HOME, default ~/bentoml) that serves a
registered MLflow transformers text classifier with adaptive batching.

Target URI: `bentoml` (no path). The MLflow registry is the one of MLFLOW_TRACKING_URI.
Model URI: `models:/NAME@ALIAS` (e.g. @champion) or `models:/NAME/VERSION`.
Deployment name: a BentoML name (lowercase letters, digits, '-', '_', '.'); it is the bento name,
and every bento/model built for it is labelled maas.deployment=<name>.

Config (-C key=value): BentoSettings fields {fields};
plus `url` (where the deployment is served; used by predict), and for run-local `host`/`port`.
`-C variant=onnx-int8` serves that compression variant of the version (default: the version's
chosen one, tag maas.variant); a variant outside its accuracy budget is refused.

  mlflow deployments create -t bentoml --name sentiment -m models:/sst2-sentiment@champion \\
      -C max_batch_size=32 -C variant=onnx-int8
  mlflow deployments run-local -t bentoml --name sentiment -m models:/sst2-sentiment@champion \\
      -C port=3000
  mlflow deployments predict -t bentoml --name sentiment --input-path texts.json  # needs url
  (any family: the server's /metadata names its API; e.g. {{"images": ["digit.png"]}})
  mlflow deployments update -t bentoml --name sentiment            # rebuild from the same alias
  mlflow deployments delete -t bentoml --name sentiment            # bentos + BentoML models
"""
