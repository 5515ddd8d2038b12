"""pipelines.variant_speed: every classifier is timed at the forward-pass size it runs fastest at
(chosen by measurement), so a speed ratio never compares one variant's best against another's
handicap. The classifiers here cost a known time per pass so that the right answer is known."""

from __future__ import annotations

import time

import numpy as np

from pipelines.variant_speed import FORWARDS, figures, measure


class _Costed:
    """Probabilities after sleeping ``fixed + per_text * n ** power`` seconds per pass of n."""

    runtime = "test"

    def __init__(self, fixed: float, per_text: float, power: float) -> None:
        self.fixed, self.per_text, self.power = fixed, per_text, power
        self.passes: list[int] = []

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        self.passes.append(len(texts))
        time.sleep(self.fixed + self.per_text * len(texts) ** self.power)
        return np.tile([0.25, 0.75], (len(texts), 1)).astype(np.float32)


def test_each_classifier_is_timed_at_its_own_best_forward_size():
    texts = [f"text number {i} " + "x" * (i % 7) for i in range(64)]
    # pass overhead dominates: the biggest pass wins; cost grows faster than the pass: the
    # smallest wins
    overhead = _Costed(fixed=0.004, per_text=0.00001, power=1)
    quadratic = _Costed(fixed=0.0, per_text=0.00004, power=2)
    out = measure({"overhead": overhead, "quadratic": quadratic}, texts, threads=1, rounds=2,
                  latency_samples=3)
    assert set(out["overhead"].probe) == set(FORWARDS)
    assert out["overhead"].forward == max(FORWARDS)
    assert out["quadratic"].forward == min(FORWARDS)
    # the timed rounds ran at the chosen size: the last passes of each are of that size
    assert max(overhead.passes[-4:]) == 1  # latency samples are single texts
    f = figures(out["overhead"], out["quadratic"].probs, {"accuracy": 1.0})
    assert f["forward_batch_size"] == max(FORWARDS) and len(f["texts_per_s_rounds"]) == 2
    assert f["texts_per_s"] > out["overhead"].probe[min(FORWARDS)]


class _Burning(_Costed):
    """Spends ``per_text`` seconds of this process's CPU per text (a busy loop, not a sleep)."""

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        end = time.process_time() + self.per_text * len(texts)
        while time.process_time() < end:
            pass
        return np.tile([0.25, 0.75], (len(texts), 1)).astype(np.float32)


def test_each_round_records_the_cpu_the_process_spent_per_text():
    """CPU ms per text comes from the process's own counter: a sleeping classifier spends
    almost none, a busy one what it burns, whatever the wall clock says."""
    texts = [f"text {i}" for i in range(32)]
    out = measure({"sleeping": _Costed(fixed=0.0, per_text=0.001, power=1),
                   "burning": _Burning(fixed=0.0, per_text=0.001, power=1)},
                  texts, threads=1, rounds=3, latency_samples=1)
    sleeping = figures(out["sleeping"], out["sleeping"].probs, {"accuracy": 1.0})
    burning = figures(out["burning"], out["burning"].probs, {"accuracy": 1.0})
    assert len(burning["cpu_ms_per_text_rounds"]) == 3
    assert burning["cpu_ms_per_text"] >= 1.0  # 1 ms burnt per text, plus the loop around it
    assert sleeping["cpu_ms_per_text"] < 0.5
