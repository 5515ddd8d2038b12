"""The image family with ``model.module``: the user's own PyTorch module, ``forward(x)`` on a float
batch ``[B, C, S, S]`` in [0, 1], trained from scratch. The constructor gets ``in_channels``,
``num_labels`` and ``image_size`` where it takes them by name. The contract and everything after
training are the shared own-module code (``user_module.py``, ``own_model.py``, ...); the logged
model also carries the image service's ``maas_variant.json`` (labels, channels, size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.families import user_module as um


class OwnImage:
    """What :class:`~pipelines.families.image_classifier.ImageClassifier` delegates to when
    ``model.module`` is set (``family``: that instance, for its decoded inputs)."""

    kind = "image"

    def __init__(self, family: Any) -> None:
        self.family, self.cfg = family, family.cfg

    def check(self) -> None:
        um.check_config(self.cfg, self.kind)

    def trainer(self, data: Any, params: dict[str, Any], seed: int) -> Any:
        import torch

        from pipelines.families import own_model as om

        channels, size = self.family.input_shape()
        x = np.ascontiguousarray(np.stack(self.family.inputs(data.train)), dtype=np.float32)
        ids = data.ids(data.train)
        labels = [data.id2label[i] for i in range(len(data.id2label))]
        facts = {"in_channels": channels, "num_labels": len(labels), "image_size": size}
        first = min(len(x), int(params.get("batch_size", 32)))
        model = om.make(um.spec_of(self.cfg), self.kind, facts, um.init_of(self.cfg, params),
                        labels, (torch.from_numpy(x[:first]), None),
                        torch.tensor(ids[:first]), seed)
        return om.OwnTrainer(model, lambda idx: (torch.from_numpy(x[idx]), None), ids, params,
                             seed, self.cfg.tuning.max_epochs)

    def compressor(self, model: Any, workdir: Path) -> Any:
        from pipelines.families.own_export import OwnCompressor

        return OwnCompressor(self.cfg, model, workdir)

    def card_facts(self) -> dict[str, Any]:
        from pipelines.families.own_model import card_facts

        channels, size = self.family.input_shape() if self.family._rows else (None, None)
        return {**card_facts(self.cfg, um.spec_of(self.cfg)), "channels": channels,
                "image_size": size}
