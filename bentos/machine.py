"""The machine a figure was measured on (CPU model, AVX2/AVX-512/VNNI/BF16/AMX, threads) and the
serving-side re-check of variants: the public import path of
``bentos/text_classifier/maas_machine.py``, which lives in the service folder so that every bento
carries it (the service loads it from its own folder). Pipelines and benchmarks import this."""

from bentos.text_classifier.maas_machine import (
    CPUINFO,
    FEATURES,
    choose,
    describe,
    differs,
    fastest,
    feature_names,
    features_of,
    measure,
    parse_cpuinfo,
    recheck,
    summary,
    threads,
)

__all__ = ["CPUINFO", "FEATURES", "choose", "describe", "differs", "fastest", "feature_names",
           "features_of", "measure", "parse_cpuinfo", "recheck", "summary", "threads"]
