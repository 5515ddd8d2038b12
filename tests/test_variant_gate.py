"""The variant gate (registry.choose_variant): pure, table-tested like should_promote."""

from __future__ import annotations

import dataclasses
import math

import pytest

from registry import VariantChoice, choose_variant


def rows(**spec: tuple[float, float]) -> dict[str, dict[str, float]]:
    """variant=(accuracy, texts_per_s); names use _ for - and __ for +."""
    return {k.replace("__", "+").replace("_", "-"): {"accuracy": a, "texts_per_s": s}
            for k, (a, s) in spec.items()}


CASES = [
    # (rows, max_drop, chosen, within-budget set)
    (rows(fp32=(0.83, 100)), 0.01, "fp32", {"fp32"}),
    (rows(fp32=(0.83, 100), onnx=(0.83, 150), onnx_int8=(0.825, 300)), 0.01, "onnx-int8",
     {"fp32", "onnx", "onnx-int8"}),
    # the fastest is over budget: the next fastest within budget wins
    (rows(fp32=(0.83, 100), onnx=(0.83, 150), onnx_int8=(0.81, 300)), 0.01, "onnx",
     {"fp32", "onnx"}),
    # exactly at the budget counts as within (float noise tolerated)
    (rows(fp32=(0.85, 100), onnx_int8=(0.84, 300)), 0.01, "onnx-int8", {"fp32", "onnx-int8"}),
    # just over the budget does not
    (rows(fp32=(0.85, 100), onnx_int8=(0.8399, 300)), 0.01, "fp32", {"fp32"}),
    # a variant better than fp32 is within budget (negative drop)
    (rows(fp32=(0.80, 100), pruned=(0.82, 180)), 0.0, "pruned", {"fp32", "pruned"}),
    # zero budget: only variants at least as good as fp32
    (rows(fp32=(0.80, 100), onnx=(0.80, 150), onnx_int8=(0.7999, 400)), 0.0, "onnx",
     {"fp32", "onnx"}),
    # a slower variant within budget never beats a faster fp32
    (rows(fp32=(0.80, 200), onnx=(0.80, 150)), 0.01, "fp32", {"fp32", "onnx"}),
    # equal speed: fp32 wins the tie, then the name that sorts first
    (rows(fp32=(0.80, 150), onnx=(0.80, 150)), 0.01, "fp32", {"fp32", "onnx"}),
    (rows(fp32=(0.80, 100), pruned=(0.80, 150), onnx=(0.80, 150)), 0.01, "onnx",
     {"fp32", "onnx", "pruned"}),
    # combined variants compete like the others
    (rows(fp32=(0.83, 100), onnx_int8=(0.826, 240), pruned__onnx_int8=(0.822, 330)), 0.01,
     "pruned+onnx-int8", {"fp32", "onnx-int8", "pruned+onnx-int8"}),
    (rows(fp32=(0.83, 100), onnx_int8=(0.826, 240), pruned__onnx_int8=(0.815, 330)), 0.01,
     "onnx-int8", {"fp32", "onnx-int8"}),
]


@pytest.mark.parametrize(("table", "max_drop", "chosen", "within"), CASES)
def test_choose_variant_table(table, max_drop, chosen, within):
    c = choose_variant(table, "accuracy", max_drop)
    assert c.chosen == chosen, c.reason
    assert {n for n, ok in c.within_budget.items() if ok} == within
    assert c.reason.startswith(f"{chosen}:")
    ref = table["fp32"]
    assert c.speedup == pytest.approx(table[chosen]["texts_per_s"] / ref["texts_per_s"])
    assert c.drop == pytest.approx(ref["accuracy"] - table[chosen]["accuracy"])
    for name in set(table) - within:
        assert name in c.reason, "over-budget variants are named in the reason"


def test_missing_or_nan_figures_are_never_chosen():
    table = {"fp32": {"accuracy": 0.8, "texts_per_s": 100},
             "onnx": {"texts_per_s": 900},                          # no accuracy
             "onnx-int8": {"accuracy": float("nan"), "texts_per_s": 800},
             "pruned": {"accuracy": 0.8, "texts_per_s": float("nan")},  # no speed
             "pruned+onnx": {"accuracy": 0.8, "texts_per_s": 0.0}}
    c = choose_variant(table, "accuracy", 0.05)
    assert c.chosen == "fp32"
    assert c.within_budget == {"fp32": True, "onnx": False, "onnx-int8": False,
                               "pruned": True, "pruned+onnx": True}
    assert math.isnan(c.drops["onnx"])


def test_other_metric_and_speed_key():
    table = {"fp32": {"f1_macro": 0.7, "rps": 10, "accuracy": 0.9},
             "onnx-int8": {"f1_macro": 0.65, "rps": 30, "accuracy": 0.9}}
    assert choose_variant(table, "f1_macro", 0.01, speed="rps").chosen == "fp32"
    assert choose_variant(table, "accuracy", 0.01, speed="rps").chosen == "onnx-int8"


@pytest.mark.parametrize(("table", "max_drop", "message"), [
    ({"onnx": {"accuracy": 0.8, "texts_per_s": 1}}, 0.01, "no 'fp32' variant"),
    ({"fp32": {"texts_per_s": 1}}, 0.01, "has no 'accuracy'"),
    ({"fp32": {"accuracy": 0.8, "texts_per_s": 1}}, -0.1, "max_drop must be >= 0"),
])
def test_bad_input_is_an_error(table, max_drop, message):
    with pytest.raises(ValueError, match=message):
        choose_variant(table, "accuracy", max_drop)


def test_choice_is_frozen_and_serialisable():
    c = choose_variant(rows(fp32=(0.8, 100), onnx=(0.8, 200)), "accuracy", 0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.chosen = "fp32"  # type: ignore[misc]
    d = c.to_dict()
    assert d["chosen"] == "onnx" and d["within_budget"] == {"fp32": True, "onnx": True}
    assert isinstance(c, VariantChoice)


def test_the_reason_counts_in_the_familys_unit():
    """The speed key is shared (``texts_per_s``); the reason says what it counts."""
    rows = {"fp32": {"accuracy": 0.9, "texts_per_s": 100.0},
            "onnx-int8": {"accuracy": 0.9, "texts_per_s": 250.0}}
    assert "(250.0 texts/s, 2.50x fp32" in choose_variant(rows, "accuracy", 0.01).reason
    images = choose_variant(rows, "accuracy", 0.01, unit="images")
    assert "(250.0 images/s, 2.50x fp32" in images.reason and "texts" not in images.reason


def test_an_image_familys_variant_table_is_in_images():
    from pipelines.compression import Outcome, Variant, markdown_table
    from pipelines.families.image_classifier.family import ImageClassifier

    rows = {n: {"texts_per_s": tps, "forward_batch_size": 4, "p50_ms_b1": 3.0, "accuracy": 0.9,
                "agreement_with_fp32": 1.0}
            for n, tps in (("fp32", 100.0), ("onnx-int8", 250.0))}
    variants = {n: Variant(n, "torch", figures=f) for n, f in rows.items()}
    unit = ImageClassifier.unit
    outcome = Outcome(variants, choose_variant(rows, "accuracy", 0.01, unit=unit), "accuracy",
                      0.01, unit)
    head = markdown_table(outcome).splitlines()[0]
    assert "| images/s b32 |" in head and "CPU ms/image" in head and "texts" not in head
