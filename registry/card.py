"""Model cards, pure: render a version's facts as Markdown, and the card's JSON form.

``render_card(facts)`` is pure: ``facts`` is a JSON-serialisable dict (the card's JSON form, kept
as ``card/model_card.json``) and every key is optional, so a card renders from whatever is known.
Its layout (schema :data:`SCHEMA`)::

    model     {name, version, run_id, model_uri, registered_at, aliases, variant, family}
    pipeline  {name, description, config_hash, git_commit}
    card      {intended_use, limitations, owners: [..], data_license, weights_license}
    data      {fingerprint, files: [{role, path, sha256, rows}], splits: {split: rows},
               labels: [..], label_distribution: {split: {label: n}},
               suite: {name, version, success, expectations, failed: [..]}, data_docs}
    base_checkpoint  {spec, package, package_version, architecture, weights_sha256, max_length,
                      details: {fact: value} (a family's own, e.g. the embedder's pooling, dim)}
    study     {name, metric, direction, states: {COMPLETE: n, ...}, best_trial, best_value,
               best_params, trials: [{number, state, value, params}]}
    evaluation {metrics: {..}, per_class: {label: {precision, recall, f1, support}},
               confusion: {labels, matrix}, confusion_image}
    promotion {promote, reason, metric, candidate, incumbent, delta, min_delta, thresholds,
               incumbent_version}
    drift     {tag: value}  (the version's ``maas.drift.*`` tags; empty = not checked)
    alias_history [{at, actor, event, from, to, reason}]
    serving   {bento_tag, limits: {..}}

:func:`registry.card_store.attach_card` makes the card the version's description (shortened to
fit :data:`DESCRIPTION_MAX`), logs ``card/model_card.md`` and ``card/model_card.json`` on the run
and points the version's ``maas.card_uri`` / ``maas.card_json_uri`` tags at them (``bentos`` reads
those to put the card into a bento). A card never holds data texts, only counts and names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

SCHEMA = "maas-model-card/1"
CARD_MD = "card/model_card.md"
CARD_JSON = "card/model_card.json"
TAG_CARD_URI = "maas.card_uri"
TAG_CARD_JSON_URI = "maas.card_json_uri"
#: model version descriptions are VARCHAR(5000) in MLflow's SQL stores
DESCRIPTION_MAX = 5000
#: trial rows shown in the Markdown (all of them stay in the JSON)
MAX_TRIAL_ROWS = 30
#: split columns in this order (the JSON form sorts its keys)
_SPLITS = {"train": 0, "validation": 1, "test": 2}


# --------------------------------------------------------------------------------------------
# Rendering (pure)
# --------------------------------------------------------------------------------------------


def render_card(facts: dict[str, Any], max_chars: int | None = None) -> str:
    """The card as Markdown. With ``max_chars`` the detail is reduced (trial table, confusion
    table, long lists) until it fits, then cut at a line; a shortened card says where the full
    one is."""
    for detail in (2, 1, 0):
        text = _render(facts, detail)
        if max_chars is None or len(text) <= max_chars:
            return text
    note = "\n\n_(shortened to fit; " + _full_card_hint(facts) + ")_\n"
    cut = text[: max(0, max_chars - len(note))]
    cut = cut[: cut.rfind("\n")] if "\n" in cut else cut
    return cut + note


def card_json(facts: dict[str, Any]) -> str:
    """The card's JSON form (stable key order)."""
    return json.dumps(facts, indent=2, sort_keys=True, default=str) + "\n"


def _render(facts: dict[str, Any], detail: int) -> str:
    sections: list[Callable[[dict[str, Any], int], list[str]]] = [
        _overview, _data, _checkpoint, _study, _evaluation, _promotion, _drift, _history,
        _serving, _machine, _lineage]
    lines = _title(facts, detail)
    for section in sections:
        body = section(facts, detail)
        if body:
            lines += ["", *body]
    return "\n".join(lines).rstrip() + "\n"


def _title(facts: dict[str, Any], detail: int) -> list[str]:
    m = facts.get("model") or {}
    p = facts.get("pipeline") or {}
    ev = (facts.get("evaluation") or {}).get("metrics") or {}
    promo = facts.get("promotion") or {}
    lines = [f"# Model card: {m.get('name', '?')} version {m.get('version', '?')}"]
    aliases = ", ".join(f"`{a}`" for a in m.get("aliases") or []) or "none"
    summary = [f"pipeline `{p['name']}`" if p.get("name") else "",
               f"aliases {aliases}",
               f"registered {m['registered_at']}" if m.get("registered_at") else ""]
    lines += ["", "; ".join(s for s in summary if s) + "."]
    key = ", ".join(f"{k} **{_num(ev[k])}**" for k in ("accuracy", "f1_macro") if k in ev)
    if key or promo:
        decision = ("" if "promote" not in promo else
                    "promoted to champion" if promo["promote"] else "not promoted")
        lines.append(" ".join(x for x in (f"Test {key}." if key else "",
                                          f"Gate: {decision}." if decision else "") if x))
    if detail < 2:
        lines += ["", "_" + _full_card_hint(facts) + "_"]
    return lines


def _overview(facts: dict[str, Any], detail: int) -> list[str]:
    card = facts.get("card") or {}
    desc = (facts.get("pipeline") or {}).get("description")
    lines = ["## Overview"]
    if desc:
        lines += ["", str(desc)]
    lines += ["", "**Intended use.** " + (card.get("intended_use") or "_not stated_"),
              "", "**Limitations.** " + (card.get("limitations") or "_not stated_")]
    owners = ", ".join(card.get("owners") or []) or "_not stated_"
    lines += ["", f"- Owners: {owners}",
              f"- Data licence: {card.get('data_license') or '_not stated_'}",
              f"- Base weights licence: {card.get('weights_license') or '_not stated_'}"]
    return lines


def _data(facts: dict[str, Any], detail: int) -> list[str]:
    d = facts.get("data")
    if not d:
        return []
    lines = ["## Data"]
    if d.get("files"):
        rows = [[f"`{f.get('role', '')}`", f"`{f.get('path', '')}`",
                 f"`{str(f.get('sha256', ''))[:16 if detail < 2 else 64]}`",
                 _num(f.get("rows"))] for f in d["files"]]
        lines += ["", *_table(["file", "path", "sha256", "rows"], rows)]
    if d.get("fingerprint"):
        lines += ["", f"Data fingerprint (sha256 over all files): `{d['fingerprint']}`"]
    dist = d.get("label_distribution") or {}
    splits = sorted(dist or d.get("splits") or {}, key=lambda k: (_SPLITS.get(k, 9), k))
    labels = d.get("labels") or sorted({lab for s in dist.values() for lab in s})
    if splits and labels:
        rows = [[_cell(lab), *[_num((dist.get(s) or {}).get(lab, 0)) for s in splits]]
                for lab in labels]
        totals = d.get("splits") or {s: sum((dist.get(s) or {}).values()) for s in splits}
        rows.append(["**rows**", *[_num(totals.get(s)) for s in splits]])
        lines += ["", "Label distribution:", "", *_table(["label", *splits], rows)]
    suite = d.get("suite") or {}
    if suite:
        verdict = "passed" if suite.get("success") else "FAILED"
        n = suite.get("expectations")
        failed = suite.get("failed") or []
        lines += ["", f"Validation: suite `{suite.get('name', '?')}` version "
                      f"{suite.get('version', '?')}: **{verdict}**"
                      + (f" ({n - len(failed)}/{n} expectations met)" if n else "")
                      + (f"; failed: {', '.join(failed)}" if failed else "") + "."]
    if d.get("data_docs"):
        lines += ["", f"Data docs: {_artifact_link(facts, d['data_docs'])}"]
    return lines


def _checkpoint(facts: dict[str, Any], detail: int) -> list[str]:
    c = facts.get("base_checkpoint")
    if not c:
        return []
    lines = ["## Base checkpoint", "", f"- Checkpoint: `{c.get('spec', '?')}`"]
    if c.get("package"):
        lines.append(f"- Package: `{c['package']}` {c.get('package_version') or ''}".rstrip())
    for key, label in (("architecture", "Architecture"), ("max_length", "Max tokens"),
                       ("weights_sha256", "Weights sha256"), ("module", "Own module"),
                       ("module_sha256", "Module source sha256"),
                       ("init", "Module init (model.init; tuned init.* in the run)"),
                       ("tokenizer", "Tokenizer")):
        if c.get(key) not in (None, ""):
            lines.append(f"- {label}: `{c[key]}`")
    for key, value in (c.get("details") or {}).items():  # a family's own facts (e.g. pooling)
        lines.append(f"- {key}: `{value}`")
    return lines


def _study(facts: dict[str, Any], detail: int) -> list[str]:
    s = facts.get("study")
    if not s:
        return []
    states = s.get("states") or {}
    counts = ", ".join(f"{n} {k.lower()}" for k, n in sorted(states.items()))
    lines = ["## Tuning", "",
             f"- Optuna study `{s.get('name', '?')}`: {_count(sum(states.values()), 'trial')} "
             f"({counts})"
             if states else f"- Optuna study `{s.get('name', '?')}`",
             f"- Objective: {s.get('direction', 'maximize')} validation {s.get('metric', '?')}",
             f"- Best trial: #{s.get('best_trial', '?')}, value {_num(s.get('best_value'))}"]
    params = s.get("best_params") or {}
    if params:
        lines.append("- Best parameters: " + ", ".join(f"`{k}={_num(v)}`"
                                                     for k, v in sorted(params.items())))
    trials = s.get("trials") or []
    if trials and detail >= 2:
        names = sorted({k for t in trials for k in (t.get("params") or {})})
        rows = [[str(t.get("number", "")), str(t.get("state", "")), _num(t.get("value")),
                 *[_num((t.get("params") or {}).get(k)) for k in names]]
                for t in trials[:MAX_TRIAL_ROWS]]
        lines += ["", *_table(["trial", "state", "value", *names], rows)]
        if len(trials) > MAX_TRIAL_ROWS:
            lines.append(f"\n({len(trials) - MAX_TRIAL_ROWS} more trials in the JSON card)")
    return lines


def _evaluation(facts: dict[str, Any], detail: int) -> list[str]:
    ev = facts.get("evaluation")
    if not ev:
        return []
    lines = ["## Test metrics"]
    metrics = {k: v for k, v in (ev.get("metrics") or {}).items() if "." not in k}
    if metrics:
        lines += ["", *_table(["metric", "value"], [[k, _num(v)] for k, v in metrics.items()])]
    per_class = ev.get("per_class") or {}
    if per_class:
        rows = [[_cell(lab), _num(v.get("precision")), _num(v.get("recall")), _num(v.get("f1")),
                 _num(v.get("support"))] for lab, v in per_class.items()]
        lines += ["", "Per class:", "",
                  *_table(["label", "precision", "recall", "f1", "support"], rows)]
    conf = ev.get("confusion") or {}
    if conf.get("labels") and conf.get("matrix") and detail >= 1:
        rows = [[f"**{_cell(lab)}**", *[_num(x) for x in row]]
                for lab, row in zip(conf["labels"], conf["matrix"], strict=True)]
        lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
                  *_table(["true \\ predicted", *[_cell(x) for x in conf["labels"]]], rows)]
    if ev.get("confusion_image"):
        run = (facts.get("model") or {}).get("run_id")
        link = _artifact_link(facts, ev["confusion_image"])
        lines += ["", (f"![confusion matrix]({_ui_url(run, ev['confusion_image'])})  "
                       if run else "") + f"Image: {link}"]
    return lines


def _promotion(facts: dict[str, Any], detail: int) -> list[str]:
    p = facts.get("promotion")
    if not p:
        return []
    verdict = "promote" if p.get("promote") else "reject"
    lines = ["## Promotion decision", "", f"- Decision: **{verdict}**",
             f"- Reason: {p.get('reason') or '-'}",
             f"- Gate metric: {p.get('metric', '?')}: candidate {_num(p.get('candidate'))}, "
             f"champion {_num(p.get('incumbent'))}"
             + (f" (version {p['incumbent_version']})" if p.get("incumbent_version") else "")
             + f", delta {_num(p.get('delta'))}, min_delta {_num(p.get('min_delta'))}"]
    if p.get("thresholds"):
        lines.append("- Thresholds: " + ", ".join(f"{k} >= {_num(v)}"
                                                  for k, v in sorted(p["thresholds"].items())))
    return lines


def _drift(facts: dict[str, Any], detail: int) -> list[str]:
    drift = facts.get("drift") or {}
    lines = ["## Drift evidence", ""]
    if not drift:
        return lines + ["Not checked (the version has no `maas.drift.*` tags)."]
    return lines + _table(["figure", "value"],
                          [[f"`{k}`", _cell(_num(v))] for k, v in sorted(drift.items())])


def _history(facts: dict[str, Any], detail: int) -> list[str]:
    events = facts.get("alias_history")
    if events is None:
        return []
    lines = ["## Champion alias history", ""]
    if not events:
        return lines + ["The `champion` alias of this model has not moved yet."]
    shown = events if detail >= 1 else events[-5:]
    rows = [[str(e.get("at", "")), _cell(e.get("actor") or "?"), str(e.get("event", "")),
             f"{e.get('from') or '-'} -> {e.get('to') or '-'}", _cell(e.get("reason") or "")]
            for e in shown]
    return lines + _table(["when", "who", "event", "from -> to", "reason"], rows)


def _serving(facts: dict[str, Any], detail: int) -> list[str]:
    s = facts.get("serving")
    if not s:
        return []
    lines = ["## Serving", "", f"- Bento: `{s['bento_tag']}`" if s.get("bento_tag") else
             "- Bento: none recorded for this version when the card was written"]
    if s.get("served_version"):
        lines.append(f"- Registry version served: `{s['served_version']}`")
    limits = s.get("limits") or {}
    if limits:
        lines += ["", *_table(["limit", "value"], [[k, _num(v)] for k, v in limits.items()])]
    return lines


def _machine(facts: dict[str, Any], detail: int) -> list[str]:
    """The CPU the speed figures (and so the variant choice) hold for: int8's and bf16's worth
    depends on VNNI, AVX-512 BF16 and AMX, so a bento on another CPU re-times its variants."""
    m = facts.get("machine")
    if not m:
        return []
    feats = [k for k, v in (m.get("features") or {}).items() if v]
    return ["## Machine", "",
            f"- CPU: {m.get('cpu_model') or 'unknown'}; {m.get('threads')} threads",
            "- ISA features: " + (", ".join(feats) if feats else
                                  "none of AVX2, AVX-512, VNNI, BF16, AMX"),
            f"- Measured for: {m.get('measured_for') or 'variant choice'}"]


def _lineage(facts: dict[str, Any], detail: int) -> list[str]:
    m, p = facts.get("model") or {}, facts.get("pipeline") or {}
    items = [("MLflow run", m.get("run_id")), ("Model URI", m.get("model_uri")),
             ("Model family", m.get("family")), ("Served variant", m.get("variant")),
             ("Config hash", p.get("config_hash")), ("Git commit", p.get("git_commit")),
             ("Card generated", facts.get("generated_at"))]
    lines = [f"- {k}: `{v}`" for k, v in items if v]
    return ["## Lineage", "", *lines] if lines else []


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ").strip()


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value)


def _full_card_hint(facts: dict[str, Any]) -> str:
    run = (facts.get("model") or {}).get("run_id")
    where = f" of run `{run}`" if run else ""
    return f"full card: artifact `{CARD_MD}`{where}; `maas card NAME/VERSION` prints it"


def _artifact_link(facts: dict[str, Any], path: str) -> str:
    run = (facts.get("model") or {}).get("run_id")
    if not run:
        return f"`{path}`"
    return f"[`{path}`]({_ui_url(run, path)}) (artifact of run `{run}`)"


def _ui_url(run_id: str, path: str) -> str:
    """A link the MLflow UI resolves against its own address (its ``get-artifact`` route)."""
    from urllib.parse import quote

    return f"get-artifact?path={quote(path, safe='')}&run_uuid={quote(str(run_id), safe='')}"
