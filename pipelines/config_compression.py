"""The pipeline file's ``compression:`` section (the variants after tuning, their budget and the
settings of int8, pruning and distillation), part of the schema in ``pipelines/config.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: the compression variants a pipeline may ask for (``fp32``, the reference, is always made)
VARIANTS = ("fp32", "onnx", "onnx-int8", "pruned", "pruned+onnx", "pruned+onnx-int8",
            "distilled", "distilled+onnx", "distilled+onnx-int8")
Variant = Literal["fp32", "onnx", "onnx-int8", "pruned", "pruned+onnx", "pruned+onnx-int8",
                  "distilled", "distilled+onnx", "distilled+onnx-int8"]


class Int8Config(_Frozen):
    mode: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="ORT dynamic quantisation, or static (QDQ) calibrated on train rows")
    per_channel: bool = True
    calibration_rows: int = Field(128, ge=8, description="train rows for static calibration")


class PruningConfig(_Frozen):
    """Structured pruning + distilled recovery (pipelines/pruning.py, docs/compression.md)."""

    attention: float = Field(0.0, ge=0, lt=1, description="share of attention heads removed per "
                             "layer; the hidden width shrinks with them (hidden = heads x size)")
    ffn: float = Field(0.5, ge=0, lt=1, description="share of FFN neurons removed per layer")
    amount: float | None = Field(None, gt=0, lt=1, description="shorthand (the older setting): "
                                 "attention = ffn = amount; not together with attention/ffn")
    steps: int = Field(1, ge=1, description="prune in this many equal steps, each recovered")
    recovery_epochs: int = Field(2, ge=0, description="distilled fine-tune epochs after pruning")
    learning_rate: float = Field(1e-4, gt=0, description="recovery AdamW learning rate")
    distill_alpha: float = Field(1.0, ge=0, le=1, description="weight of the teacher's soft "
                                 "labels vs the hard labels (1 = soft only)")
    temperature: float = Field(2.0, gt=0, description="distillation temperature")
    distill_hidden: float = Field(10.0, ge=0, description="weight of the hidden-state MSE to the "
                                  "teacher (used when the hidden width is kept)")
    importance_batches: int = Field(4, ge=0, description="training batches for Taylor "
                                    "importance (0 = all)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("amount") is not None:
            both = sorted(k for k in ("attention", "ffn") if k in data)
            if both:
                raise ValueError(f"amount is a shorthand for attention and ffn: give either "
                                 f"amount or {both}, not both")
            data = {**data, "attention": data["amount"], "ffn": data["amount"]}
        return data

    @model_validator(mode="after")
    def _not_empty(self) -> PruningConfig:
        if self.attention == 0 and self.ffn == 0:
            raise ValueError("attention and ffn are both 0: nothing to prune")
        return self


class DistillationConfig(_Frozen):
    """A student with fewer layers distilled from the tuned model (pipelines/distillation.py)."""

    layers: int | list[int] | None = Field(None, description="teacher layers the student keeps: "
                                           "a count (spread evenly, top kept) or 0-based "
                                           "indices; None = every other layer")
    epochs: int = Field(3, ge=1, description="distillation epochs (fewer when the budget ends)")
    learning_rate: float = Field(1e-4, gt=0)
    temperature: float = Field(2.0, gt=0, description="softening of both models' logits")
    distill_alpha: float = Field(1.0, ge=0, le=1, description="weight of the teacher's soft "
                                 "labels vs the hard labels (1 = soft only)")
    distill_hidden: float = Field(10.0, ge=0, description="weight of the hidden-state MSE, "
                                  "student layer j vs the teacher layer it was copied from")
    unlabelled_path: Path | None = Field(None, description="more texts for the student (the "
                                         "teacher labels them): .txt, one per line, or a table "
                                         "with data.text_column; relative to the pipeline file")
    max_unlabelled_rows: int = Field(20000, ge=1)
    time_budget_s: float = Field(300.0, gt=0, description="the student is trained within this; "
                                 "not made when one epoch would not fit")
    run_deadline_s: float | None = Field(
        None, gt=0, description="seconds from the run's start: the budget is also capped at "
                                "what is left of them when the compress step begins, so that "
                                "a slower machine makes a shorter student (or none) instead "
                                "of a longer run; None = no cap")


class CompressionConfig(_Frozen):
    enabled: bool = True
    variants: list[Variant] | None = Field(
        None,
        description="variants made after tuning; fp32 (the reference) always is; None = the "
                    "family's defaults (text: onnx, onnx-int8, distilled, distilled+onnx-int8; "
                    "the pruned ones are opt-in: docs/compression.md)")
    max_accuracy_drop: float = Field(
        0.01, ge=0, lt=1, description="largest drop of promotion.metric vs fp32 a served "
                                      "variant may have")
    int8: Int8Config = Int8Config()
    pruning: PruningConfig = PruningConfig()
    distillation: DistillationConfig = DistillationConfig()
    threads: int | None = Field(None, ge=1, description="threads for speed figures; None = all "
                                                        "cores")
    speed_rounds: int = Field(3, ge=1, description="interleaved timing rounds per variant")
    latency_samples: int = Field(50, ge=5, description="batch-1 calls for the p50 latency")

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        dupes = sorted({x for x in v if v.count(x) > 1})
        if dupes:
            raise ValueError(f"variants listed twice: {dupes}")
        return v


def within_run_deadline(cfg: Any, elapsed_s: float) -> Any:
    """``cfg`` with ``compression.distillation.time_budget_s`` capped at what is left of its
    ``run_deadline_s`` after ``elapsed_s`` seconds of the run (pure; ``cfg`` itself when there
    is no deadline or it leaves the budget as it is). Nothing left gives a budget that no
    epoch fits: the student is then not made, and the reason says so."""
    d = cfg.compression.distillation
    if d.run_deadline_s is None or d.run_deadline_s - elapsed_s >= d.time_budget_s:
        return cfg
    left = max(d.run_deadline_s - elapsed_s, 1e-3)
    capped = d.model_copy(update={"time_budget_s": left})
    return cfg.model_copy(update={"compression": cfg.compression.model_copy(
        update={"distillation": capped})})
