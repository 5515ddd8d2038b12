"""Measure classifiers the way they are served: probabilities on the test set in model calls of 32
texts in the data's order, each call's texts sorted by length and run in forward passes padded
to their own longest text (as the bento's runtime does), throughput of such calls with a fixed
thread count, and median latency of single texts. Beside each round's wall-clock texts/s, the CPU
the process itself spent per text (``time.process_time``: every thread, whatever else runs on the
machine), the figure a served rate is compared with (``benchmarks/serving.py``).

Each classifier is timed at its own best forward-pass size (chosen by measurement from
``FORWARDS``: PyTorch fp32 and ONNX Runtime int8 peak at different sizes, and a ratio against a
size that suits only one of them would flatter the other). Timing rounds interleave the
variants, so a change in the machine's load hits all of them alike instead of favouring
whichever ran in a quiet moment.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bentos.machine import describe as describe_machine
from bentos.text_classifier.maas_runtime import DEFAULT_FORWARD_BATCH

BATCH = 32
FORWARD = DEFAULT_FORWARD_BATCH  # the bento runtime's pass size when nothing else is known
FORWARDS = (4, 8, 16, 32)  # forward-pass sizes probed per classifier; the fastest is timed
SPEED_TEXTS = 320  # texts per timing round (10 calls of 32)


class Classifier(Protocol):
    runtime: str

    def predict_proba(self, texts: list[str]) -> np.ndarray: ...


class TorchClassifier:
    """A transformers sequence classifier on its device (inference mode, fp32 on CPU)."""

    runtime = "torch"

    def __init__(self, model, tokenizer, max_length: int) -> None:
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        import torch

        device = next(self.model.parameters()).device
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.max_length, return_tensors="pt").to(device)
        with torch.inference_mode():
            logits = self.model(**enc).logits.float()
        return torch.softmax(logits, dim=-1).cpu().numpy()


@dataclass
class Measured:
    probs: np.ndarray
    texts_per_s: list[float] = field(default_factory=list)
    cpu_ms_per_text: list[float] = field(default_factory=list)  # this process's CPU, per round
    p50_ms_b1: float = float("nan")
    forward: int = FORWARD  # the forward-pass size its texts/s were timed at (its best)
    probe: dict[int, float] = field(default_factory=dict)  # forward size -> texts/s of the probe


def predict_all(clf: Classifier, texts: list[str], batch: int = BATCH,
                forward: int = FORWARD) -> np.ndarray:
    """Probabilities of ``texts`` in calls of ``batch`` texts, each call's texts sorted by length
    (characters) and run in passes of ``forward``; rows come back in input order."""
    parts = []
    for i in range(0, len(texts), batch):
        call = texts[i:i + batch]
        order = sorted(range(len(call)), key=lambda j: len(call[j]))
        probs: list[np.ndarray] = [np.empty(0)] * len(call)
        for k in range(0, len(order), forward):
            idx = order[k:k + forward]
            for j, row in zip(idx, clf.predict_proba([call[j] for j in idx]), strict=True):
                probs[j] = row
        parts.append(np.stack(probs))
    return np.concatenate(parts)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(clfs: dict[str, Classifier], texts: list[str], *, threads: int, rounds: int,
            latency_samples: int) -> dict[str, Measured]:
    """Probabilities on all ``texts`` plus speed figures for every classifier (torch ones run
    with ``threads`` intra-op threads; ORT sessions were made with the same count): a probe
    pass per forward size picks each classifier's best, then ``rounds`` interleaved rounds at
    it."""
    out: dict[str, Measured] = {}
    speed_set = texts[:SPEED_TEXTS]
    with torch_threads(threads):
        for name, clf in clfs.items():
            out[name] = Measured(probs=predict_all(clf, texts))
        for forward in FORWARDS:
            for name, clf in clfs.items():
                out[name].probe[forward] = timed(clf, speed_set, forward)[0]
        for m in out.values():
            m.forward = max(m.probe, key=m.probe.__getitem__)
        for _ in range(rounds):
            for name, clf in clfs.items():
                rate, cpu_ms = timed(clf, speed_set, out[name].forward)
                out[name].texts_per_s.append(rate)
                out[name].cpu_ms_per_text.append(cpu_ms)
        for name, clf in clfs.items():
            out[name].p50_ms_b1 = _p50_single(clf, texts[:latency_samples])
    return out


def timed(clf: Classifier, texts: list[str], forward: int) -> tuple[float, float]:
    """(texts/s, CPU ms per text of this process) of ``texts`` in calls of 32 with passes of
    ``forward``, after one warm call."""
    clf.predict_proba(texts[:BATCH])
    cpu0, t0 = time.process_time(), time.perf_counter()
    predict_all(clf, texts, forward=forward)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return len(texts) / wall, 1000 * cpu / len(texts)


def _p50_single(clf: Classifier, singles: list[str]) -> float:
    clf.predict_proba(singles[:1])
    times = []
    for text in singles:
        t0 = time.perf_counter()
        clf.predict_proba([text])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def figures(m: Measured, reference: np.ndarray, metrics: dict[str, float],
            agreement: dict[str, float] | None = None) -> dict[str, Any]:
    """The speed and quality figures of one variant (``reference``: fp32 outputs; ``agreement``:
    the family's agreement figures, None: a classifier's, computed here)."""
    if agreement is None:
        agreement = {"agreement_with_fp32": float(np.mean(m.probs.argmax(1)
                                                           == reference.argmax(1))),
                     "max_abs_prob_diff_vs_fp32": float(np.abs(m.probs - reference).max())}
    return {
        "texts_per_s": statistics.median(m.texts_per_s),
        "texts_per_s_rounds": [round(v, 2) for v in m.texts_per_s],
        "cpu_ms_per_text": (round(statistics.median(m.cpu_ms_per_text), 3)
                            if m.cpu_ms_per_text else None),
        "cpu_ms_per_text_rounds": [round(v, 3) for v in m.cpu_ms_per_text],
        "p50_ms_b1": m.p50_ms_b1,
        "forward_batch_size": m.forward,
        "texts_per_s_by_forward": {str(k): round(v, 2) for k, v in m.probe.items()},
        **agreement,
        "machine": describe_machine(),  # the CPU these figures hold for (bentos.machine)
        **metrics,
    }
