"""The image classification family (the contract: ``pipelines/families/base.py``).

Rows are ``(path, label)`` read from an image folder or a manifest (``data.py``); every image is
checked and decoded once, when its source is read (``images.py``: a bad file stops the run with
a DataError naming it, before anything is trained), and cached on the family instance. Channels
and the model's input size come from ``data.options`` or, when not given, from the training
images (grayscale if all of them are, the most common side length). Models: ``model.py`` /
``bentos/image_classifier/maas_nets.py``; training: ``train.py``; variants: ``export.py``;
MLflow: ``tracking.py``. Served by ``bentos/image_classifier/``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bentos.image_classifier.maas_images import DEFAULT_MAX_PIXELS
from pipelines.families.base import Family
from pipelines.families.image_classifier import images as img
from pipelines.families.image_classifier import model as mdl
from pipelines.families.image_classifier.init_template import init_settings
from pipelines.families.image_classifier.own import OwnImage
from pipelines.families.image_classifier.train import HYPERPARAMETERS


class ImageDataOptions(BaseModel):
    """``data.options`` of an image pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    channels: Literal[1, 3] | None = Field(None, description="1 grayscale, 3 RGB; default: "
                                           "1 when every training image is grayscale")
    image_size: int | None = Field(None, ge=4, le=512, description="model input side (pixels); "
                                   "default: the most common side of the training images")
    path_column: str = Field("path", min_length=1, description="manifest column of image paths "
                             "(relative to the manifest)")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=16, description="refuse images over "
                            "width x height (checked from the header, before decoding)")


class ImageModelOptions(BaseModel):
    """``model.options`` of an image pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    arch: Literal["cnn", "resnet18"] = "cnn"
    checkpoint: Path | None = Field(None, description="a .safetensors file saved by an image "
                                    "pipeline to fine-tune (relative to the pipeline file)")
    augment_shift: int = Field(0, ge=0, le=8, description="random shifts of up to N pixels "
                               "while training; 0 = no augmentation")
    calibration_images: int = Field(256, ge=8, description="training images that calibrate "
                                    "static int8")
    train_threads: int | None = Field(None, ge=1, description="CPU threads while training; "
                                      "default: 1 for networks under 5M parameters, else all")


class ImageClassifier(Family):
    """Classifies images with a small CNN or a resnet18-style network trained from scratch (or
    fine-tuned from a local safetensors checkpoint)."""

    input_kind = "image"
    unit = "images"
    columns = ("path",)
    hyperparameters = HYPERPARAMETERS
    service = "bentos.image_classifier.service:ImageClassifier"
    runtime = "torch"
    variants = ("onnx", "onnx-int8")
    init_settings = staticmethod(init_settings)  # `maas init`: init_template.py
    ModelOptions = ImageModelOptions
    DataOptions = ImageDataOptions

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._records: dict[str, img.ImageRecord] = {}
        self._rows: dict[str, Any] = {}
        self._shape: tuple[int, int] | None = None
        # `model.module`: the user's own nn.Module, trained from scratch (own.py)
        self.own = OwnImage(self) if cfg.model.module else None

    # -- data ---------------------------------------------------------------------------------
    def read(self, path: Path, role: str):
        from pipelines.families.image_classifier.data import read_source

        rows = read_source(path, role, self.cfg.data, self.data_options.path_column)
        todo = [p for p in rows.path if p not in self._records]
        for rec in img.read_images(todo, role, self.data_options.max_pixels):
            self._records[rec.path] = rec
        self._rows[role] = rows
        if role == "path":
            self._shape = None  # detected again from these training images
        return rows

    def fingerprint(self, files: dict[str, Path]) -> str:
        from pipelines.families.image_classifier.data import fingerprint_sources

        rows = {role: self._rows.get(role) for role in files}
        for role, path in files.items():
            if rows[role] is None:
                rows[role] = self.read(path, role)
        return fingerprint_sources(files, rows)

    def record(self, path: str) -> img.ImageRecord:
        if path not in self._records:
            self._records[path] = img.read_images([path], "path", self.data_options.max_pixels)[0]
        return self._records[path]

    def input_shape(self) -> tuple[int, int]:
        """(channels, image_size): the options, else detected from the training images."""
        if self._shape is None:
            opts = self.data_options
            train = [self._records[p] for p in self._rows["path"].path] if "path" in self._rows \
                else list(self._records.values())
            channels = opts.channels or (1 if all(r.channels == 1 for r in train) else 3)
            sides = Counter(max(r.width, r.height) for r in train)
            size = opts.image_size or (sides.most_common(1)[0][0] if sides else 28)
            self._shape = (int(channels), int(size))
        return self._shape

    def inputs(self, rows) -> list[np.ndarray]:
        channels, size = self.input_shape()
        return [img.to_array(self.record(p), channels, size) for p in rows.path]

    def profile(self, rows):
        import pandas as pd

        recs = [self.record(p) for p in rows.path]
        return pd.DataFrame({
            "readable": [True] * len(recs),
            "format": [r.format for r in recs],
            "channels": [r.channels for r in recs],
            "width": [r.width for r in recs],
            "height": [r.height for r in recs],
            "mean_intensity": [round(r.mean_intensity, 3) for r in recs],
            "std_intensity": [round(r.std_intensity, 3) for r in recs],
            "label": rows.label.tolist(),
        })

    def drift_profile(self, rows, labels: list[str]):
        """Label counts and a histogram of mean intensities (whole grey levels) in the
        profile's ``lengths`` slot; no pixels, no vocabulary."""
        from validation.drift import DataProfile

        means = Counter(int(round(self.record(p).mean_intensity)) for p in rows.path)
        return DataProfile(rows=len(rows), labels=dict(Counter(map(str, labels))),
                           lengths=dict(means), vocab={}, n_tokens=0, n_hapax=0)

    def describe(self, rows) -> list[Any]:
        """File names relative to their source when ``privacy.log_text`` is ``full``; row
        numbers otherwise (a file name can say who is in the picture)."""
        if self.cfg.privacy.log_text != "full":
            return super().describe(rows)
        return [Path(p).name for p in rows.path]

    def input_example(self, rows) -> np.ndarray | None:
        """Real images only with ``privacy.log_text: full``; else the synthetic placeholder."""
        if self.cfg.privacy.log_text != "full" or len(rows) == 0:
            return None
        return np.stack(self.inputs(rows.iloc[:2]))

    # -- model --------------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path | None:
        ckpt = self.model_options.checkpoint
        if ckpt is None:
            return None
        base = Path(self.cfg.source_file).parent if self.cfg.source_file else Path.cwd()
        return (base / ckpt.expanduser()).resolve()

    def check(self) -> None:
        if self.own:
            return self.own.check()
        if self.checkpoint is not None:
            mdl.read_checkpoint(self.checkpoint)

    def trainer(self, data, params: dict[str, Any], seed: int):
        if self.own:
            return self.own.trainer(data, params, seed)
        from pipelines.families.image_classifier.train import Trainer, TrainSetup

        channels, size = self.input_shape()
        arch = self.model_options.arch
        if self.checkpoint is not None:
            arch = mdl.read_checkpoint(self.checkpoint)[0].get("arch", arch)
        labels = [data.id2label[i] for i in range(len(data.id2label))]
        spec = mdl.make_spec(arch, channels, size, len(labels), {**HYPERPARAMETERS, **params})
        model = mdl.build(spec, labels, self.checkpoint, seed)
        setup = TrainSetup(inputs=np.stack(self.inputs(data.train)),
                           label_ids=np.asarray(data.ids(data.train)), params=params,
                           seed=seed, max_shift=self.model_options.augment_shift,
                           threads=self.model_options.train_threads)
        return Trainer(model, setup)

    def predict_proba(self, model: mdl.ImageModel, inputs: list[Any], desc: str | None = None):
        if not isinstance(model, mdl.ImageModel):  # an own module's (this run's or a champion's)
            return own_model().predict_proba(model, inputs, self.cfg.model.eval_batch_size)
        return mdl.predict_proba(model, inputs, self.cfg.model.eval_batch_size)

    def labels(self, model: mdl.ImageModel) -> list[str]:
        return list(model.labels)

    # -- MLflow -------------------------------------------------------------------------------
    def save(self, model: mdl.ImageModel, folder: Path) -> None:
        (own_model() if self.own else mdl).save(model, folder)

    def load(self, folder: Path) -> mdl.ImageModel:
        return (own_model() if self.own else mdl).load(folder)

    def log_model(self, model: mdl.ImageModel, name: str, input_example: Any | None = None):
        from pipelines.families.image_classifier.tracking import log_model
        from pipelines.families.own_tracking import log_model as log_own

        return (log_own if self.own else log_model)(model, name, input_example)

    def load_logged(self, model_uri: str) -> mdl.ImageModel:
        from pipelines.families.image_classifier.tracking import load_logged
        from pipelines.families.own_tracking import is_own
        from pipelines.families.own_tracking import load_logged as load_own

        # by what was logged: the champion may be of the other kind than this run's model
        return (load_own if is_own(model_uri) else load_logged)(model_uri)

    # -- compression and card -----------------------------------------------------------------
    def compressor(self, model: mdl.ImageModel, data, workdir: Path):
        if self.own:
            return self.own.compressor(model, workdir)
        from bentos.runtimes import cpu_cores
        from pipelines.families.image_classifier.export import ImageCompressor

        calib = np.stack(self.inputs(data.train.iloc[:self.model_options.calibration_images]))
        comp = self.cfg.compression
        return ImageCompressor(model, calib, workdir, comp.threads or cpu_cores(),
                               per_channel=comp.int8.per_channel,
                               batch_size=self.cfg.model.eval_batch_size)

    def card_facts(self) -> dict[str, Any]:
        if self.own:
            return self.own.card_facts()
        channels, size = self.input_shape() if self._rows else (None, None)
        facts: dict[str, Any] = {"spec": None, "from_scratch": self.checkpoint is None,
                                 "architecture": self.model_options.arch,
                                 "channels": channels, "image_size": size}
        if self.checkpoint is not None:
            from pipelines.card_facts import sha256_file

            facts.update(spec=str(self.checkpoint), weights_sha256=sha256_file(self.checkpoint))
        return facts


def own_model():
    """The own-module model helpers (``model.module``), imported when used."""
    from pipelines.families import own_model

    return own_model
