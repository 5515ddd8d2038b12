"""The toy family's BentoML service: ``POST /classify`` with ``{"rows": [[x1, x2], ...]}``
answers the label and per-label probabilities of each row, in order; ``/metadata`` says what
is served. Copied into the bento with ``toy_net.py`` and the runtime table (``maas_runtimes``),
both loaded from this file's folder; ``bento_config.json`` beside it names the model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import bentoml

HERE = Path(__file__).resolve().parent
CONFIG = json.loads((HERE / "bento_config.json").read_text("utf-8")) \
    if (HERE / "bento_config.json").is_file() else {"model_tag": None, "variant": {}}


def _beside(stem: str) -> Any:
    name = f"{__name__}_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


toy_net = _beside("toy_net")
runtimes = _beside("maas_runtimes")
RUNTIME = (CONFIG.get("variant") or {}).get("runtime") or "torch"


@bentoml.service(resources={"cpu": "1"}, traffic={"timeout": 30})
class ToyService:
    if CONFIG["model_tag"]:
        model = bentoml.models.BentoModel(CONFIG["model_tag"])

    def __init__(self) -> None:
        folder = Path(self.model.path)
        self.net, self.labels = toy_net.load_net(next(folder.rglob(toy_net.WEIGHTS)),
                                                 next(folder.rglob(toy_net.LABELS)))
        self.gpu = runtimes.has_gpu(RUNTIME)

    @bentoml.api(route="/classify")
    def classify(self, rows: list[list[float]]) -> list[dict[str, Any]]:
        if not 1 <= len(rows) <= 256 or any(len(r) != 2 for r in rows):
            raise bentoml.exceptions.InvalidArgument("rows: 1 to 256 rows of [x1, x2]")
        out = []
        for probs in toy_net.probabilities(self.net, rows):
            best = max(range(len(probs)), key=probs.__getitem__)
            out.append({"label": self.labels[best],
                        "probabilities": dict(zip(self.labels, probs, strict=True))})
        return out

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict[str, Any]:
        return {"model_tag": CONFIG["model_tag"], "labels": self.labels, "runtime": RUNTIME,
                "gpu": self.gpu, "mlflow": CONFIG.get("mlflow", {})}
