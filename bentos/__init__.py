"""Packaging: import a registered MLflow model version into the BentoML model store and build a
bento serving it (``bentos/text_classifier/service.py``); ``bentos.mlflow_plugin`` is the
``mlflow.deployments`` target ``bentoml``.

Importing this package is cheap: bentoml, mlflow, torch and transformers load on first use.
"""

from bentos.build import BentoSettings, BuildResult, build_bento, parse_model_uri, sanitize_name

__all__ = ["BentoSettings", "BuildResult", "build_bento", "parse_model_uri", "sanitize_name"]
