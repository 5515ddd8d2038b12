"""Compression variants of a registered model version: which one to serve, and its files.

The registered version ``models:/NAME/V`` is the fp32 model (served in the runtime of its tag
``maas.runtime``, default ``torch``); the pipeline records the variants it made in two
model-version tags:

- ``maas.variant``: the chosen variant's name (absent on older versions: ``fp32``);
- ``maas.variants``: JSON ``{name: {"runtime": "torch" | "onnxruntime", "model_uri": ...,
  "run_id": ..., "within_budget": bool, "accuracy": float, "accuracy_drop": float,
  "max_accuracy_drop": float, "texts_per_s": float}}``.

Runtimes are the keys of ``bentos.runtimes.RUNTIMES``. ``torch`` variants of the text family are
transformers-flavour models; ``onnxruntime`` variants are ``mlflow.onnx``
models whose artifact folder holds ``model.onnx`` (one file) and ``extra_files/`` with the
tokenizer files and ``maas_variant.json`` (labels in logit order, input names, output name).
A variant outside its accuracy budget is never served.

mlflow, onnx and onnxruntime are imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bentos.runtimes import RUNTIMES as RUNTIME_TABLE

logger = logging.getLogger(__name__)

TAG_VARIANT = "maas.variant"
TAG_VARIANTS = "maas.variants"
#: the serving runtime of the version's own (fp32) model, set by its family (default torch)
TAG_RUNTIME = "maas.runtime"
DEFAULT_VARIANT = "fp32"
#: the runtimes a variant may name (the serving-runtime table's)
RUNTIMES = tuple(RUNTIME_TABLE)
ONNX_FILE = "model.onnx"
VARIANT_FILE = "maas_variant.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: operators of a (dynamically or statically) int8-quantised ONNX graph
INT8_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
                      "DynamicQuantizeMatMul", "QAttention", "QGemm"})


class VariantOutOfBudget(ValueError):
    """The requested variant's accuracy drop is over its budget (``within_budget`` not true)."""


@dataclass(frozen=True)
class Variant:
    """The variant a bento serves, as recorded on the registered version."""

    name: str
    runtime: str
    model_uri: str
    run_id: str | None = None
    accuracy: float | None = None
    accuracy_drop: float | None = None
    max_accuracy_drop: float | None = None
    texts_per_s: float | None = None
    forward_batch_size: int | None = None  # the forward-pass size measured fastest for it
    chosen: bool = False  # True when it is the version's own choice (maas.variant)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def variant_table(tags: dict[str, str], pinned_uri: str) -> dict[str, dict[str, Any]]:
    """The version's variants by name; ``fp32`` (the version's own model) is always there."""
    raw = tags.get(TAG_VARIANTS)
    table: dict[str, dict[str, Any]] = {}
    if raw:
        try:
            table = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{pinned_uri}: tag {TAG_VARIANTS} is not valid JSON ({exc})") \
                from None
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ValueError(f"{pinned_uri}: tag {TAG_VARIANTS} must be a JSON object "
                             "{name: {runtime, model_uri, within_budget, ...}}")
    fp32 = dict(table.get(DEFAULT_VARIANT) or {})
    # fp32 is the registered version itself: always servable, loaded from the pinned version
    fp32.update(runtime=tags.get(TAG_RUNTIME) or "torch", model_uri=pinned_uri,
                within_budget=True)
    return {**table, DEFAULT_VARIANT: fp32}


def choose_variant(tags: dict[str, str], pinned_uri: str, requested: str | None) -> Variant:
    """The variant to serve: ``requested``, else the version's ``maas.variant``, else ``fp32``.

    Raises ``ValueError`` for an unknown name (listing the known ones), a malformed entry, or a
    variant outside its accuracy budget (naming its accuracy drop and the budget)."""
    table = variant_table(tags, pinned_uri)
    chosen = tags.get(TAG_VARIANT) or DEFAULT_VARIANT
    name = requested or chosen
    if name not in table:
        raise ValueError(f"unknown variant {name!r} for {pinned_uri}: known variants are "
                         f"{', '.join(sorted(table))}")
    entry = table[name]
    if entry.get("error"):
        raise VariantOutOfBudget(f"variant {name!r} of {pinned_uri} failed when it was made and "
                                 f"is never served: {entry['error']}")
    if entry.get("within_budget") is not True:
        servable = sorted(n for n, e in table.items() if e.get("within_budget") is True)
        raise VariantOutOfBudget(
            f"variant {name!r} of {pinned_uri} is outside its accuracy budget and is never "
            f"served: accuracy drop {_fmt(entry.get('accuracy_drop'))} > max_accuracy_drop "
            f"{_fmt(entry.get('max_accuracy_drop'))} (within_budget="
            f"{json.dumps(entry.get('within_budget'))}); variants within budget: "
            f"{', '.join(servable)}")
    runtime, uri = entry.get("runtime"), entry.get("model_uri")
    if runtime not in RUNTIMES or not isinstance(uri, str) or not uri:
        raise ValueError(f"variant {name!r} of {pinned_uri}: entry needs runtime in {RUNTIMES} "
                         f"and a model_uri, got {entry}")
    return Variant(name=name, runtime=runtime, model_uri=uri, run_id=entry.get("run_id"),
                   accuracy=entry.get("accuracy"), accuracy_drop=entry.get("accuracy_drop"),
                   max_accuracy_drop=entry.get("max_accuracy_drop"),
                   texts_per_s=entry.get("texts_per_s"),
                   forward_batch_size=_positive_int(entry.get("forward_batch_size")),
                   chosen=name == chosen)


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else repr(value)


def check_no_pickle(path: Path) -> None:
    bad = [p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if bad:
        raise RuntimeError(f"refusing to package pickle-based weight files {bad}")


# -- onnxruntime variants ----------------------------------------------------------------------
def _check_single_file(model_path: Path) -> Any:
    """The ONNX graph without its weights loaded; refuses graphs with external data."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False)
    external = [t.name for t in graph.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ValueError(f"{model_path.name} keeps {len(external)} tensor(s) in external data "
                         f"files (e.g. {external[0]!r}); log it with save_as_external_data=False")
    return graph


def _position_limit(graph: Any) -> int | None:
    """Rows of the position-embedding table, when the graph has one (the longest input)."""
    for init in graph.graph.initializer:
        if "position_embeddings" in init.name and len(init.dims) == 2:
            return int(init.dims[0])
    return None


def read_onnx_variant(folder: Path, variant: Variant) -> dict[str, Any]:
    """Checks the downloaded ``mlflow.onnx`` folder and returns its ``maas_variant.json`` with
    ``max_positions`` added (None when the graph does not show it)."""
    model_path, meta_path = folder / ONNX_FILE, folder / "extra_files" / VARIANT_FILE
    if not model_path.is_file():
        raise ValueError(f"variant {variant.name!r} ({variant.model_uri}) has no {ONNX_FILE}")
    if not meta_path.is_file():
        raise ValueError(f"variant {variant.name!r} ({variant.model_uri}) has no "
                         f"extra_files/{VARIANT_FILE} (labels, inputs, output)")
    meta = json.loads(meta_path.read_text("utf-8"))
    if not meta.get("labels") or not meta.get("output_name"):
        raise ValueError(f"{VARIANT_FILE} of variant {variant.name!r} needs labels and "
                         f"output_name, got {meta}")
    graph = _check_single_file(model_path)
    meta["max_positions"] = _position_limit(graph)
    meta["dtype"] = "int8" if {n.op_type for n in graph.graph.node} & INT8_OPS else "float32"
    return meta


def save_onnx_variant(variant: Variant, dest: Path) -> dict[str, Any]:
    """Download the variant's ``mlflow.onnx`` model and write ``model.onnx``, the tokenizer
    files and ``maas_variant.json`` into ``dest`` (a BentoML model folder). Returns the
    variant's metadata (labels, input names, output name, max_length, max_positions)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="maas-onnx-") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=variant.model_uri,
                                                          dst_path=tmp))
        meta = read_onnx_variant(folder, variant)
        shutil.copy2(folder / ONNX_FILE, dest / ONNX_FILE)
        for item in (folder / "extra_files").iterdir():
            if item.is_file():
                shutil.copy2(item, dest / item.name)
    check_no_pickle(dest)
    smoke_test_onnx(dest, meta)
    return meta


def _smoke_input(arg, np):
    """Ones in the declared dtype and shape of one graph input: a batch of one, named (dynamic)
    axes of 4 (4 tokens of text; an image graph's spatial axes are fixed)."""
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(int32)": np.int32}.get(arg.type, np.int64)
    shape = [d if isinstance(d, int) else (1 if i == 0 else 4) for i, d in enumerate(arg.shape)]
    return np.ones(shape, dtype=dtype)


def smoke_test_onnx(folder: Path, meta: dict[str, Any]) -> None:
    """Loads the graph with ONNX Runtime (CPU) and checks the declared output gives one logit per
    label: a broken export fails the build, not the server."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    if meta["output_name"] not in names:
        raise ValueError(f"model.onnx has outputs {names}, not {meta['output_name']!r}")
    feed = {i.name: _smoke_input(i, np) for i in sess.get_inputs()}
    logits = sess.run([meta["output_name"]], feed)[0]
    if logits.shape != (1, len(meta["labels"])):
        raise ValueError(f"model.onnx gives logits of shape {logits.shape} for one input, "
                         f"expected (1, {len(meta['labels'])}) for labels {meta['labels']}")
