"""Drift figures between two training sets (and two models' predictions), from scipy.stats.

Pure functions, no MLflow: :func:`profile_data` turns labelled texts into a compact
:class:`DataProfile` that holds no raw text (label counts, a histogram of text lengths, and the
word vocabulary as truncated sha256 hashes with counts), so a champion's training data can be
compared with a challenger's long after the champion's run, whatever ``privacy.log_text`` says.
:func:`compare` computes the figures and judges each against its threshold; the result is a
frozen :class:`DriftReport`.

Each figure is thresholded on an effect size, not on a p-value: on tens of thousands of rows a
chi-square or KS test calls a 1-point shift "significant", and on a few hundred rows a real shift
may not be. A figure is breached when its effect size exceeds its threshold AND, where a test
exists, the test's p-value is below ``alpha`` (large and not noise). See docs/drift.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PROFILE_SCHEMA = 1
_WORD = re.compile(r"\w+")
_HASH_CHARS = 16  # 64 bits of sha256: collisions are negligible for any real vocabulary
_TOL = 1e-12

#: the thresholded figures, in report order
FIGURES = ("label_tvd", "length_ks", "oov_increase", "pred_label_tvd", "disagreement")


@dataclass(frozen=True)
class DataProfile:
    """What drift needs of a training set, without its texts."""

    rows: int
    labels: dict[str, int]          # label name -> rows
    lengths: dict[int, int]         # text length in characters -> rows
    vocab: dict[str, int]           # sha256(salt + lower-cased word)[:16] -> occurrences
    n_tokens: int                   # word occurrences (before any vocabulary cap)
    n_hapax: int                    # words seen exactly once (before any vocabulary cap)
    salt_id: str = ""               # sha256(salt)[:8], "" when unsalted: hashes compare only
    vocab_truncated: bool = False   # True when only the max_vocab most frequent words are kept

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lengths"] = {str(k): v for k, v in sorted(self.lengths.items())}
        return {"schema": PROFILE_SCHEMA, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataProfile:
        """Read back :meth:`to_dict`'s output; ValueError names the bad field."""
        if d.get("schema") != PROFILE_SCHEMA:
            raise ValueError(f"profile.schema: expected {PROFILE_SCHEMA}, got {d.get('schema')!r}")
        try:
            return cls(rows=int(d["rows"]),
                       labels={str(k): int(v) for k, v in d["labels"].items()},
                       lengths={int(k): int(v) for k, v in d["lengths"].items()},
                       vocab={str(k): int(v) for k, v in d["vocab"].items()},
                       n_tokens=int(d["n_tokens"]), n_hapax=int(d["n_hapax"]),
                       salt_id=str(d.get("salt_id", "")),
                       vocab_truncated=bool(d.get("vocab_truncated", False)))
        except KeyError as exc:
            raise ValueError(f"profile.{exc.args[0]}: missing") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"profile: malformed ({exc})") from None


def word_hash(word: str, salt: str = "") -> str:
    return hashlib.sha256((salt + word).encode("utf-8")).hexdigest()[:_HASH_CHARS]


def profile_data(texts: Iterable[str], labels: Iterable[Any], *, salt: str = "",
            max_vocab: int = 200_000) -> DataProfile:
    """Profile labelled texts (pure). Words are ``\\w+`` runs of the lower-cased text; labels are
    kept by their string form (use class names, so that runs compare by name)."""
    texts = ["" if t is None else str(t) for t in texts]
    label_counts = Counter(str(x) for x in labels)
    if sum(label_counts.values()) != len(texts):
        raise ValueError(f"profile: {len(texts)} texts but {sum(label_counts.values())} labels")
    words: Counter[str] = Counter()
    for t in texts:
        words.update(_WORD.findall(t.lower()))
    vocab = Counter({word_hash(w, salt): c for w, c in words.items()})
    kept = dict(vocab.most_common(max_vocab))
    return DataProfile(
        rows=len(texts), labels=dict(sorted(label_counts.items())),
        lengths=dict(sorted(Counter(len(t) for t in texts).items())),
        vocab=kept, n_tokens=sum(words.values()),
        n_hapax=sum(1 for c in words.values() if c == 1),
        salt_id=hashlib.sha256(salt.encode()).hexdigest()[:8] if salt else "",
        vocab_truncated=len(kept) < len(vocab))


@dataclass(frozen=True)
class DriftThresholds:
    """Effect-size limits (a figure above its limit, and significant where a test exists, is a
    breach) and the significance level of the tests."""

    alpha: float = 0.01
    max_label_tvd: float = 0.10       # total variation distance of training label shares
    max_length_ks: float = 0.10       # KS statistic D of training text lengths
    max_oov_increase: float = 0.05    # OOV rate minus its no-drift (Good-Turing) expectation
    max_pred_label_tvd: float = 0.10  # TVD of the two models' predicted label shares
    max_disagreement: float = 0.20    # share of test texts the two models label differently

    def limit(self, figure: str) -> float:
        return float(getattr(self, "max_" + figure))


@dataclass(frozen=True)
class DriftFigure:
    """One figure: its value (None: not computed, see ``reason``), threshold and verdict."""

    name: str
    value: float | None
    threshold: float
    breached: bool
    reason: str
    p_value: float | None = None
    details: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DriftReport:
    figures: tuple[DriftFigure, ...]
    alpha: float
    reference: bool  # a reference data profile was compared

    @property
    def breached(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.figures if f.breached)

    @property
    def status(self) -> str:
        """``drift`` (a figure breached), ``no_reference`` (no data profile to compare; nothing
        breached) or ``ok``."""
        if self.breached:
            return "drift"
        return "ok" if self.reference else "no_reference"

    def figure(self, name: str) -> DriftFigure | None:
        return next((f for f in self.figures if f.name == name), None)

    def blocks(self, mode: str) -> bool:
        """Whether promotion must stop: mode ``block`` and at least one breached figure."""
        if mode not in ("warn", "block"):
            raise ValueError(f"drift mode must be 'warn' or 'block', got {mode!r}")
        return mode == "block" and bool(self.breached)

    def summary(self) -> str:
        """One line: the status, then every computed figure against its threshold."""
        parts = []
        for f in self.figures:
            if f.value is None:
                continue
            mark = " BREACHED" if f.breached else ""
            p = "" if f.p_value is None else f" (p={f.p_value:.2g})"
            parts.append(f"{f.name} {f.value:.3f}{p} vs max {f.threshold:g}{mark}")
        head = {"drift": "drift in " + ", ".join(self.breached), "ok": "no drift",
                "no_reference": "no reference data profile"}[self.status]
        return head + (": " + "; ".join(parts) if parts else "")

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "breached": list(self.breached), "alpha": self.alpha,
                "reference": self.reference, "summary": self.summary(),
                "figures": [dataclasses.asdict(f) for f in self.figures]}

    def to_tags(self, prefix: str = "maas.drift.") -> dict[str, str]:
        """String tags: ``status``, ``breached`` (comma list), ``reason``, and per computed figure
        ``<name>``, ``<name>.threshold``, ``<name>.breached`` and ``<name>.p_value``."""
        tags = {prefix + "status": self.status, prefix + "breached": ",".join(self.breached),
                prefix + "reason": self.summary()}
        for f in self.figures:
            if f.value is None:
                continue
            tags[prefix + f.name] = f"{f.value:.6f}"
            tags[f"{prefix}{f.name}.threshold"] = f"{f.threshold:g}"
            tags[f"{prefix}{f.name}.breached"] = "true" if f.breached else "false"
            if f.p_value is not None:
                tags[f"{prefix}{f.name}.p_value"] = f"{f.p_value:.6g}"
        return tags


def compare(reference: DataProfile | None, current: DataProfile,
            ref_predictions: Sequence[str] | None = None,
            cur_predictions: Sequence[str] | None = None,
            thresholds: DriftThresholds = DriftThresholds()) -> DriftReport:
    """Drift of ``current`` against ``reference`` (pure). Data figures need ``reference`` (None:
    they are recorded as not computed, never breached); prediction figures need both prediction
    lists, one label per text of the same test set in the same order."""
    th = thresholds
    figs: list[DriftFigure] = []
    if reference is None:
        for name in FIGURES[:3]:
            figs.append(_skipped(name, th, "no reference data profile"))
    else:
        figs.append(_judge("label_tvd", *_distribution(reference.labels, current.labels), th))
        figs.append(_judge("length_ks", *_lengths(reference.lengths, current.lengths), th))
        figs.append(_judge("oov_increase", *_oov(reference, current), th))
    if ref_predictions is None or cur_predictions is None:
        for name in FIGURES[3:]:
            figs.append(_skipped(name, th, "no predictions of both models"))
    else:
        if len(ref_predictions) != len(cur_predictions):
            raise ValueError(f"predictions: {len(ref_predictions)} reference vs "
                             f"{len(cur_predictions)} current; both must cover the same texts")
        ref_p = [str(x) for x in ref_predictions]
        cur_p = [str(x) for x in cur_predictions]
        figs.append(_judge("pred_label_tvd", *_distribution(Counter(ref_p), Counter(cur_p)), th))
        figs.append(_judge("disagreement", *_disagreement(ref_p, cur_p), th))
    return DriftReport(figures=tuple(figs), alpha=th.alpha, reference=reference is not None)


# ---- the statistics: each returns (value | None, p_value | None, details, note) ------------

def _distribution(ref: Mapping[str, int], cur: Mapping[str, int]):
    """TVD of two categorical distributions; chi-square test of homogeneity and Cramér's V."""
    from scipy.stats import chi2_contingency

    keys = sorted(set(ref) | set(cur))
    a = [int(ref.get(k, 0)) for k in keys]
    b = [int(cur.get(k, 0)) for k in keys]
    na, nb = sum(a), sum(b)
    if na == 0 or nb == 0:
        return None, None, {}, "an empty sample"
    tvd = 0.5 * sum(abs(x / na - y / nb) for x, y in zip(a, b, strict=True))
    cols = [(x, y) for x, y in zip(a, b, strict=True) if x + y > 0]
    details = {"reference_n": float(na), "current_n": float(nb)}
    if len(cols) < 2:  # one category in both: identical distributions
        return tvd, 1.0, {**details, "chi2": 0.0, "cramers_v": 0.0}, ""
    res = chi2_contingency([[x for x, _ in cols], [y for _, y in cols]], correction=False)
    chi2 = float(res.statistic)
    cramers_v = math.sqrt(chi2 / (na + nb))  # 2 x k table: min(r, c) - 1 = 1
    return tvd, float(res.pvalue), {**details, "chi2": chi2, "cramers_v": cramers_v}, ""


def _lengths(ref: Mapping[int, int], cur: Mapping[int, int]):
    """Two-sample KS test of text lengths (histograms expanded); D is the effect size."""
    import numpy as np
    from scipy.stats import ks_2samp

    def expand(h: Mapping[int, int]):
        return np.repeat(np.array(list(h), dtype=float), np.array(list(h.values()), dtype=int))

    a, b = expand(ref), expand(cur)
    if a.size == 0 or b.size == 0:
        return None, None, {}, "an empty sample"
    res = ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue), {
        "reference_median": float(np.median(a)), "current_median": float(np.median(b)),
        "reference_mean": float(a.mean()), "current_mean": float(b.mean())}, ""


def _oov(ref: DataProfile, cur: DataProfile):
    """Share of the current word occurrences whose word the reference never saw, minus what a
    sample of the reference's own distribution would show (Good-Turing: hapaxes / tokens)."""
    if ref.salt_id != cur.salt_id:
        return None, None, {}, "profiles hashed with different salts"
    seen = sum(cur.vocab.values())
    if seen == 0 or ref.n_tokens == 0:
        return None, None, {}, "no words in one of the samples"
    oov = sum(c for h, c in cur.vocab.items() if h not in ref.vocab) / seen
    expected = ref.n_hapax / ref.n_tokens
    return oov - expected, None, {"oov_rate": oov, "expected_oov_rate": expected}, ""


def _disagreement(ref: Sequence[str], cur: Sequence[str]):
    if not ref:
        return None, None, {}, "no test predictions"
    n_diff = sum(1 for x, y in zip(ref, cur, strict=True) if x != y)
    return n_diff / len(ref), None, {"n": float(len(ref)), "n_disagree": float(n_diff)}, ""


def _judge(name: str, value: float | None, p_value: float | None, details: dict[str, float],
           note: str, th: DriftThresholds) -> DriftFigure:
    limit = th.limit(name)
    if value is None:
        return DriftFigure(name, None, limit, False, f"{name} not computed: {note}")
    large = value > limit + _TOL
    significant = p_value is None or p_value < th.alpha
    breached = large and significant
    p = "" if p_value is None else f", p={p_value:.3g} (alpha {th.alpha:g})"
    if breached:
        why = f"{name} {value:.4f} > {limit:g}{p}"
    elif large:
        why = f"{name} {value:.4f} > {limit:g} but not significant{p}"
    else:
        why = f"{name} {value:.4f} <= {limit:g}{p}"
    return DriftFigure(name, float(value), limit, breached, why, p_value, dict(details))


def _skipped(name: str, th: DriftThresholds, note: str) -> DriftFigure:
    return DriftFigure(name, None, th.limit(name), False, f"{name} not computed: {note}")
