"""Plain-text tables of a results document: the summary (ASR per attack, over-refusal in all and per prompt
set, capability, KL and greedy agreement on benign text, paired differences) and held-out ASR per source
with the trigger rate; the terminal's view of what report.html shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..fileio import json_safe
from .results import EvalResult

__all__ = ["rate_cell", "signed", "source_rows", "summary_rows", "summary_table", "text_table"]


def rate_cell(entry: Mapping[str, Any] | None) -> str:
    """A rate with its 95% interval, `-` when there is none."""
    if not entry or entry.get("value") is None or not math.isfinite(entry["value"]):
        return "-"
    return f"{100 * entry['value']:5.1f}% [{100 * entry['low']:.0f}, {100 * entry['high']:.0f}]"


def _diff(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("difference") is None:
        return "-"
    return (
        f"{signed(100 * entry['difference'], 1)} pts [{signed(100 * entry['low'])}, "
        f"{signed(100 * entry['high'])}] p={entry['p_value']:.2g}"
    )


def signed(x: float, digits: int = 0) -> str:
    """`x` with its sign, never "-0" (rounding first, then adding 0.0, turns -0.0 into 0.0)."""
    return f"{round(x, digits) + 0.0:+.{digits}f}"


def summary_rows(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the summary: ASR per attack, over-refusal and capability, one column per
    model and a paired difference of each other model against the reference."""
    metrics, models = doc["metrics"], list(doc["models"])
    reference = metrics.get("reference_model", models[0] if models else "")
    others = [m for m in models if m != reference]
    header = ["metric", *models, *(f"{m} - {reference}" for m in others)]
    rows = []
    for attack, per_model in metrics.get("asr", {}).items():
        diffs = metrics.get("asr_difference", {}).get(attack, {})
        rows.append(
            [f"ASR {attack}", *(rate_cell(per_model.get(m)) for m in models), *(_diff(diffs.get(m)) for m in others)]
        )
    refusal = metrics.get("over_refusal", {})
    if refusal:
        diffs = metrics.get("over_refusal_difference", {})
        rows.append(
            [
                "over-refusal (safe prompts refused)",
                *(rate_cell(refusal.get(m, {}).get("refusal")) for m in models),
                *(_diff(_flipped(diffs.get(m))) for m in others),
            ]
        )
        sources = sorted({s for m in models for s in refusal.get(m, {}).get("refusal_by_source", {})})
        by_source = metrics.get("over_refusal_difference_by_source", {})
        for source in sources if len(sources) > 1 else []:
            rows.append(
                [
                    f"  over-refusal: {source}",
                    *(rate_cell(refusal.get(m, {}).get("refusal_by_source", {}).get(source)) for m in models),
                    *(_diff(_flipped(by_source.get(m, {}).get(source))) for m in others),
                ]
            )
    capability = metrics.get("capability", {})
    if capability:
        change = metrics.get("capability_change", {})

        def loss(m: str) -> str:
            e = capability.get(m)
            return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]" if e and e.get("value") is not None else "-"

        def rel(m: str) -> str:
            e = change.get(m)
            return (
                f"{100 * e['value']:+.1f}% [{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]"
                if e and e.get("value") is not None
                else "-"
            )

        rows.append(["benign loss (capability)", *(loss(m) for m in models), *(rel(m) for m in others)])
    kl, agreement = metrics.get("kl_divergence", {}), metrics.get("greedy_agreement", {})
    if kl:
        rows.append(
            [
                f"KL({reference} || model) per token, benign",
                *("reference" if m == reference else _kl_cell(kl.get(m)) for m in models),
                *("-" for _ in others),
            ]
        )
    if agreement:
        tokens = next((e.get("tokens") for e in agreement.values() if e.get("tokens")), None)
        rows.append(
            [
                f"greedy agreement, first {tokens or 'N'} tokens",
                *("reference" if m == reference else _agreement_cell(agreement.get(m)) for m in models),
                *("-" for _ in others),
            ]
        )
    return header, rows


def _flipped(entry: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A paired difference of compliance as one of refusal (over-refusal moves the opposite way)."""
    if not entry or entry.get("difference") is None or entry.get("low") is None:
        return None
    return {**entry, "difference": -entry["difference"], "low": -entry["high"], "high": -entry["low"]}


def _kl_cell(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("value") is None or not math.isfinite(entry["value"]):
        return "-"
    return f"{entry['value']:.4f} [{entry['low']:.4f}, {entry['high']:.4f}] nats ({entry['n_tokens']} tokens)"


def _agreement_cell(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("value") is None or not math.isfinite(entry["value"]):
        return "-"
    return f"{rate_cell(entry)} ({entry['k']}/{entry['n']})"


def source_rows(
    doc: Mapping[str, Any], attacks: Sequence[str] = ("direct", "prefill")
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-source table: held-out ASR per source under `attacks` (models side by
    side, "base -> defended"), the prompts each source gave to training, and the judge-free trigger rate."""
    metrics, models = doc["metrics"], list(doc["models"])
    by_source = metrics.get("asr_by_source", {})
    attacks = [a for a in attacks if a in by_source]
    sources = sorted({s for a in attacks for per_model in by_source[a].values() for s in per_model})
    trained = (doc.get("sources") or {}).get("train", {})
    triggers = doc.get("trigger_rate") or {}
    trigger_model = next(iter(triggers), None)
    header = ["source", "trained on", "held out", *(f"ASR {a} ({' -> '.join(models)})" for a in attacks)]
    if trigger_model:
        header.append(f"fired ({trigger_model})")
    rows = []
    for source in sources:
        n = max((by_source[a].get(m, {}).get(source, {}).get("n") or 0) for a in attacks for m in models)
        cells = [" -> ".join(_shortrate_cell(by_source[a].get(m, {}).get(source)) for m in models) for a in attacks]
        row = [source, str(trained.get(source, "-")), str(n), *cells]
        if trigger_model:
            row.append(_shortrate_cell(triggers[trigger_model].get(source), key="rate"))
        rows.append(row)
    for group, entry in (triggers.get(trigger_model) or {}).items():
        if group not in sources:  # benign answers: false fires
            rows.append(
                [group, "-", str(entry.get("n", "-")), *("-" for _ in attacks), _shortrate_cell(entry, key="rate")]
            )
    return header, rows


def _shortrate_cell(entry: Mapping[str, Any] | None, key: str = "value") -> str:
    if not entry or entry.get(key) is None or not math.isfinite(entry[key]):
        return "-"
    return f"{100 * entry[key]:.0f}%"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header: a table for a terminal."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def summary_table(result: EvalResult | Mapping[str, Any]) -> str:
    """A plain-text table for a terminal: ASR base vs circuit-broken per attack, over-refusal,
    capability change (rates with 95% bootstrap intervals; differences paired, McNemar p)."""
    if isinstance(result, EvalResult):
        if not result.metrics:
            result.recompute()
        doc: Mapping[str, Any] = {"metrics": result.metrics, "models": result.models}
    else:
        doc = result
    doc = json_safe(doc)
    table = text_table(*summary_rows(doc))
    header, rows = source_rows(doc)
    if len(rows) > 1 or doc.get("trigger_rate"):
        table += "\n\nheld-out ASR per source\n" + text_table(header, rows)
    return table
