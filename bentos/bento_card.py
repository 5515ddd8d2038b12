"""The model card a bento carries (``model_card.md`` / ``.json``, served at ``GET /card``): the
registry version's card, found through its version tags (set by ``registry.card.attach_card``;
bentos does not import registry), plus a last section on what the bento serves and its limits."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from bentos.settings import BentoSettings
from bentos.variants import Variant

logger = logging.getLogger(__name__)

TAG_CARD_URI = "maas.card_uri"
TAG_CARD_JSON_URI = "maas.card_json_uri"


def bento_card(mv: Any, tags: dict[str, str], alias: str | None, variant: Variant,
               settings: BentoSettings, model_tag: str) -> tuple[str, dict[str, Any]]:
    """The version's model card (its ``card/`` artifacts, else its description) plus a last
    section saying what this bento serves and its limits; the service adds the bento tag."""
    import mlflow

    name, version = mv.name, str(mv.version)
    markdown, facts = "", {}
    try:
        with tempfile.TemporaryDirectory(prefix="maas-card-") as tmp:
            if tags.get(TAG_CARD_URI):
                markdown = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=tags[TAG_CARD_URI], dst_path=tmp)).read_text("utf-8")
            if tags.get(TAG_CARD_JSON_URI):
                facts = json.loads(Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=tags[TAG_CARD_JSON_URI], dst_path=tmp)).read_text("utf-8"))
    except Exception:  # the bento is still built: its card then says what is missing
        logger.warning("could not fetch the model card of %s version %s", name, version,
                       exc_info=True)
    if not markdown:
        markdown = (f"# Model card: {name} version {version}\n\nNo model card was recorded for "
                    "this version (registered outside `maas run`)."
                    + (f"\n\n{mv.description}" if getattr(mv, "description", None) else "")
                    + "\n")
    limits = {k: getattr(settings, k) for k in ("max_batch_size", "max_latency_ms", "max_texts",
                                                "max_chars", "timeout", "max_concurrency",
                                                "workers")}
    served = {"registry_version": f"models:/{name}/{version}", "alias": alias,
              "variant": variant.name, "runtime": variant.runtime, "bento_model_tag": model_tag,
              "limits": limits}
    lines = ["", "## Served by this bento", "",
             f"- Registry version: `models:/{name}/{version}`"
             + (f" (built from alias `{alias}`)" if alias else ""),
             f"- Variant: `{variant.name}` ({variant.runtime}); BentoML model `{model_tag}`",
             "- Limits: " + ", ".join(f"{k}={v}" for k, v in limits.items())]
    return markdown.rstrip() + "\n" + "\n".join(lines) + "\n", {**facts, "served_by": served}
