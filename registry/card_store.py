"""Model cards in the MLflow registry: attach a rendered card to a version (description, tags,
run artifacts), load it back, and bring its live parts (aliases, drift tags, champion history) up
to date. Rendering itself is pure and lives in :mod:`registry.card`."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from registry.alias_history import history
from registry.card import (
    CARD_JSON,
    CARD_MD,
    DESCRIPTION_MAX,
    TAG_CARD_JSON_URI,
    TAG_CARD_URI,
    card_json,
    render_card,
)

logger = logging.getLogger(__name__)

DRIFT_PREFIX = "maas.drift."


def attach_card(name: str, version: str, facts: dict[str, Any], run_id: str) -> str:
    """Log the card on ``run_id`` (``card/model_card.md`` + ``.json``), point the version's
    ``maas.card_uri`` / ``maas.card_json_uri`` tags at them and make the (shortened) card the
    version's description. Returns the full Markdown."""
    client = mlflow.MlflowClient()
    markdown = render_card(facts)
    client.log_text(run_id, markdown, CARD_MD)
    client.log_text(run_id, card_json(facts), CARD_JSON)
    client.set_model_version_tag(name, version, TAG_CARD_URI, f"runs:/{run_id}/{CARD_MD}")
    client.set_model_version_tag(name, version, TAG_CARD_JSON_URI, f"runs:/{run_id}/{CARD_JSON}")
    client.update_model_version(name, version,
                                description=render_card(facts, max_chars=DESCRIPTION_MAX))
    logger.info("model card of %s version %s attached (%d chars)", name, version, len(markdown))
    return markdown


def live_facts(name: str, version: str) -> dict[str, Any]:
    """The parts of a card that change after registration, read from the registry now: the
    version's aliases, its ``maas.drift.*`` tags and the champion history of the model."""
    mv = mlflow.MlflowClient().get_model_version(name, str(version))
    tags = mv.tags or {}
    return {"aliases": sorted(mv.aliases or []),
            "drift": {k: tags[k] for k in sorted(tags) if k.startswith(DRIFT_PREFIX)},
            "alias_history": history(name)}


def current_card(name: str, version: str) -> tuple[str, dict[str, Any] | None]:
    """The version's card with its live parts (aliases, drift tags, champion history) brought
    up to date: (Markdown, facts). A version without a JSON card gives its stored Markdown (or
    description) and None."""
    markdown, facts = load_card(name, version)
    if facts is None:
        return markdown, None
    live = live_facts(name, version)
    facts = {**facts, "model": {**(facts.get("model") or {}), "aliases": live["aliases"]},
             "drift": live["drift"], "alias_history": live["alias_history"]}
    return render_card(facts), facts


def load_card(name: str, version: str) -> tuple[str, dict[str, Any] | None]:
    """(Markdown, JSON facts or None) of a version: its card artifacts, else its description."""
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, str(version))
    tags = mv.tags or {}
    if tags.get(TAG_CARD_URI):
        with tempfile.TemporaryDirectory() as tmp:
            md = mlflow.artifacts.download_artifacts(artifact_uri=tags[TAG_CARD_URI], dst_path=tmp)
            markdown = Path(md).read_text("utf-8")
            facts = None
            if tags.get(TAG_CARD_JSON_URI):
                js = mlflow.artifacts.download_artifacts(artifact_uri=tags[TAG_CARD_JSON_URI],
                                                         dst_path=tmp)
                facts = json.loads(Path(js).read_text("utf-8"))
        return markdown, facts
    return mv.description or "", None
