"""The drift check inside the promotion step.

Every pipeline run logs its family's drift profile of its training split
(``data/profile.json``; text: label counts, text-length histogram, hashed word counts; no raw
data). At promotion the champion's profile is
found through its version's run (``maas.run_id``), compared with the challenger's, together with
both models' predictions on the challenger's test set; the figures become tags on the
challenger's version (``maas.drift.*``) and ``promotion/drift.json`` on the run, and the verdict is
folded into the gate's decision (``promotion.drift.mode: block`` stops a breached promotion).
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.config import DriftConfig, PipelineConfig
from pipelines.data import Dataset
from pipelines.families.base import Family
from registry import Decision, with_drift
from validation.drift import DataProfile, DriftReport, DriftThresholds, compare

log = logging.getLogger(__name__)

PROFILE_ARTIFACT = "data/profile.json"
DRIFT_ARTIFACT = "promotion/drift.json"
#: optional secret salt for the word hashes (the same on every run that should be compared)
SALT_ENV = "MAAS_PROFILE_SALT"
TAG_PREFIX = "maas.drift."


def training_profile(family: Family, data: Dataset) -> DataProfile:
    """The family's drift profile of the training split, labels by class name."""
    return family.drift_profile(data.train, data.names(data.train))


def log_profile(family: Family, data: Dataset) -> DataProfile:
    prof = training_profile(family, data)
    mlflow.log_dict(prof.to_dict(), PROFILE_ARTIFACT)
    return prof


def reference_profile(run_id: str | None) -> DataProfile | None:
    """The training profile logged by pipeline run ``run_id``; None if it has none (a run from
    before profiles existed, a version registered outside the pipeline) or it cannot be read."""
    if not run_id:
        return None
    try:
        raw = mlflow.artifacts.load_dict(f"runs:/{run_id}/{PROFILE_ARTIFACT}")
    except (MlflowException, OSError, ValueError) as exc:
        log.info("no training profile on run %s (%s): drift has no reference", run_id,
                 str(exc)[:200])
        return None
    try:
        return DataProfile.from_dict(raw)
    except ValueError as exc:
        log.warning("run %s: unreadable %s (%s): drift has no reference", run_id,
                    PROFILE_ARTIFACT, exc)
        return None


def thresholds(cfg: DriftConfig) -> DriftThresholds:
    return DriftThresholds(alpha=cfg.alpha, max_label_tvd=cfg.max_label_tvd,
                           max_length_ks=cfg.max_length_ks, max_oov_increase=cfg.max_oov_increase,
                           max_pred_label_tvd=cfg.max_pred_label_tvd,
                           max_disagreement=cfg.max_disagreement)


def check(cfg: PipelineConfig, family: Family, data: Dataset, version: str, champion_mv: Any,
          champion_predictions: list[str] | None, predictions: list[str],
          decision: Decision) -> Decision:
    """Compare the challenger ``version`` with ``champion_mv``, record the evidence on the version
    and the active run, and return the decision with the drift verdict folded in."""
    dc = cfg.promotion.drift
    if not dc.enabled:
        return decision
    ref_run = champion_mv.tags.get("maas.run_id") or champion_mv.run_id
    report = compare(reference_profile(ref_run), training_profile(family, data),
                     champion_predictions,
                     predictions, thresholds(dc))
    context = {"mode": dc.mode, "reference_version": str(champion_mv.version),
               "reference_run_id": ref_run or ""}
    mlflow.log_dict({**report.to_dict(), **context}, DRIFT_ARTIFACT)
    record(cfg.registry.model_name, version, report, context)
    blocks = report.blocks(dc.mode)
    log.log(logging.WARNING if report.breached else logging.INFO, "drift (%s%s): %s", dc.mode,
            ", blocks promotion" if blocks else "", report.summary())
    return with_drift(decision, report.summary(), breached=bool(report.breached), block=blocks)


def record(name: str, version: str, report: DriftReport, context: dict[str, str]) -> None:
    """``maas.drift.*`` tags on the model version; status and figures on the active run."""
    tags = {**report.to_tags(TAG_PREFIX), **{TAG_PREFIX + k: v for k, v in context.items()}}
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    mlflow.set_tags({TAG_PREFIX + "status": report.status,
                     TAG_PREFIX + "breached": ",".join(report.breached)})
    mlflow.log_metrics({f"drift_{f.name}": f.value for f in report.figures
                        if f.value is not None})
