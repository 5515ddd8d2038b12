"""Packaging: import a registered MLflow model version into the BentoML model store and build a
bento serving it (``bentos/text_classifier/service.py``); ``bentos.mlflow_plugin`` is the
``mlflow.deployments`` target ``bentoml``; ``bentos.webhook`` rebuilds the bento when an MLflow
alias webhook says ``champion`` moved (``bentos.webhook_register`` subscribes a model).

Importing this package is cheap: bentoml, mlflow, torch and transformers load on first use.
"""

from bentos.build import BentoSettings, BuildResult, build_bento, parse_model_uri, sanitize_name
from bentos.webhook import Verdict, verify

__all__ = ["BentoSettings", "BuildResult", "Verdict", "build_bento", "parse_model_uri",
           "sanitize_name", "verify"]
