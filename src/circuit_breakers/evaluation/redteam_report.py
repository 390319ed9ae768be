"""The red-team view of an evaluation: ASR per attack per model with intervals, paired differences against the
base, and the tamper curves (fine-tuning steps, interpolation fractions, top-k ranks), as JSON and as HTML with
inline SVG plots (no plotting library needed).

Tamper-attacked models are evaluated as derived models named `MODEL@POINT` (`cb@ft25`); `points` maps each such
name to {"kind", "source", "value", ...readings}, so a row of the table reads, for every model, the cell of the
model that attack made from it.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import json_safe, write_text_atomic
from .metrics import paired_difference, rate
from .results import EvalResult

__all__ = ["RedteamRows", "add_section", "redteam_html", "redteam_rows", "svg_curves"]

CURVE_AXES = {
    "finetune": "fine-tuning steps on K harmful completions",
    "interpolation": "fraction of the defended - base delta kept (1 = defended, 0 = base)",
    "top_k": "rank k of each layer's delta kept",
}
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


@dataclass
class RedteamRows:
    """`table`: one row per attack (and per tamper point), one cell per model; `curves`: {kind: {model: points}}."""

    table: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"table": self.table, "curves": self.curves})


def per_prompt(result: EvalResult, model: str, attack: str) -> dict[str, bool]:
    """{prompt id: judged harmful under any variant} of one cell (empty when the cell is absent)."""
    flags: dict[str, bool] = {}
    for s in result.cell(model, attack):
        flags[s.prompt_id] = flags.get(s.prompt_id, False) or bool(s.harmful)
    return flags


def _cell(result: EvalResult, model: str, attack: str, seed: int) -> dict[str, Any] | None:
    flags = per_prompt(result, model, attack)
    if not flags:
        return None
    return {"model": model, "attack": attack, "asr": rate(list(flags.values()), seed=seed).to_dict()}


def _paired(result: EvalResult, base: Mapping[str, Any], other: Mapping[str, Any], seed: int) -> dict[str, Any]:
    a = per_prompt(result, base["model"], base["attack"])
    b = per_prompt(result, other["model"], other["attack"])
    shared = [i for i in a if i in b]
    return paired_difference([a[i] for i in shared], [b[i] for i in shared], seed=seed).to_dict()


def redteam_rows(
    result: EvalResult,
    names: Sequence[str],
    attacks: Sequence[str],
    tamper_attack: str,
    points: Mapping[str, Mapping[str, Any]],
    seed: int = 0,
) -> RedteamRows:
    """The table and curves of `result` for the run's models `names` (the first is the base) and `attacks` in
    order: a text attack reads (model, attack); a tamper attack reads (derived model, `tamper_attack`) at each of
    its points, the base's own cell standing in for the base where the attack moves towards it (interpolation,
    top-k). Each non-base cell carries its paired difference from the base cell of the same row."""
    base = names[0]
    rows = RedteamRows()
    by_source: dict[tuple[str, str], list[tuple[str, Mapping[str, Any]]]] = {}
    for name, point in points.items():
        by_source.setdefault((point["kind"], point["source"]), []).append((name, point))
    for attack in attacks:
        plan: list[tuple[str, str, float | None, dict[str, tuple[str, str]]]] = []  # label, kind, x, cells
        if attack not in CURVE_AXES and attack != "orthogonalize":
            plan.append((attack, "text", None, {m: (m, attack) for m in names}))
        else:
            values = sorted({p["value"] for (k, _), ps in by_source.items() if k == attack for _, p in ps})
            if attack in ("interpolation",):
                values = values[::-1]
            for value in values:
                cells = {}
                for m in names:
                    found = [n for n, p in by_source.get((attack, m), []) if p["value"] == value]
                    if found:
                        cells[m] = (found[0], tamper_attack)
                    elif m == base and attack in ("interpolation", "top_k"):
                        cells[m] = (base, tamper_attack)
                label = attack if attack == "orthogonalize" else f"{attack} {value:g}"
                plan.append((label, attack, value, cells))
        for label, kind, value, cells in plan:
            row: dict[str, Any] = {"attack": label, "kind": kind, "value": value, "cells": {}}
            for m, (model, cell) in cells.items():
                row["cells"][m] = _cell(result, model, cell, seed)
            base_cell = row["cells"].get(base)
            for m, entry in row["cells"].items():
                if entry is not None and m != base and base_cell is not None:
                    entry["vs_base"] = _paired(result, base_cell, entry, seed)
            rows.table.append(row)
            if kind in CURVE_AXES:
                for m, entry in row["cells"].items():
                    if entry is None or (m == base and kind != "finetune"):
                        continue
                    point = dict(points.get(entry["model"], {}))
                    readings = {k: v for k, v in point.items() if k not in ("name", "source", "kind", "value")}
                    asr = entry["asr"]
                    rows.curves.setdefault(kind, {}).setdefault(m, []).append(
                        {
                            "x": value,
                            "model": entry["model"],
                            "asr": asr["value"],
                            "low": asr["low"],
                            "high": asr["high"],
                            "n": asr["n"],
                            **readings,
                        }  # fmt: skip
                    )
    for curves in rows.curves.values():
        for series in curves.values():
            series.sort(key=lambda p: p["x"])
    return rows


def _percent(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "-"
    asr = entry["asr"]
    text = f"{100 * asr['value']:.0f}% [{100 * asr['low']:.0f}, {100 * asr['high']:.0f}] n={asr['n']}"
    diff = entry.get("vs_base")
    if diff:
        text += (
            f"; {100 * diff['difference']:+.0f} pp [{100 * diff['low']:+.0f}, {100 * diff['high']:+.0f}]"
            f" p={diff['p_value']:.2g}"
        )
    return text


def svg_curves(title: str, xlabel: str, series: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """A line plot of ASR (0-100%) against x, one line per model, each point with its interval as a bar."""
    width, height, left, right, top, bottom = 520, 280, 48, 130, 28, 44
    xs = [float(p["x"]) for points in series.values() for p in points]
    if not xs:
        return ""
    lo, hi = min(xs), max(xs)
    span = hi - lo or 1.0

    def sx(x: float) -> float:
        return left + (float(x) - lo) / span * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - float(y)) * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" font-size="13">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{sy(0)}" x2="{width - right}" y2="{sy(0)}" stroke="#333"/>',
        f'<line x1="{left}" y1="{sy(0)}" x2="{left}" y2="{sy(1)}" stroke="#333"/>',
        f'<text x="{left}" y="{height - 8}" font-size="11">{html.escape(xlabel)}</text>',
    ]
    for tick in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<text x="{left - 6}" y="{sy(tick) + 4}" font-size="10" text-anchor="end">{tick:.0%}</text>')
        parts.append(f'<line x1="{left}" y1="{sy(tick)}" x2="{width - right}" y2="{sy(tick)}" stroke="#ddd"/>')
    for x in sorted(set(xs)):
        parts.append(f'<text x="{sx(x):.1f}" y="{sy(0) + 14}" font-size="10" text-anchor="middle">{x:g}</text>')
    for i, (model, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = " ".join(f"{sx(p['x']):.1f},{sy(p['asr']):.1f}" for p in points)
        parts.append(f'<polyline class="curve" points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for p in points:
            x = sx(p["x"])
            parts.append(
                f'<line x1="{x:.1f}" y1="{sy(p["low"]):.1f}" x2="{x:.1f}" y2="{sy(p["high"]):.1f}" stroke="{colour}"/>'
            )
            parts.append(f'<circle cx="{x:.1f}" cy="{sy(p["asr"]):.1f}" r="3" fill="{colour}"/>')
        parts.append(
            f'<text x="{width - right + 8}" y="{top + 14 * (i + 1)}" font-size="11" fill="{colour}">'
            f"{html.escape(model)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def redteam_html(doc: Mapping[str, Any], models: Sequence[str]) -> str:
    """The red-team section of report.html from results.json's `redteam` part: the table, then the curves."""
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    body = "".join(
        f"<tr><td>{html.escape(row['attack'])}</td>"
        + "".join(f"<td>{html.escape(_percent(row['cells'].get(m)))}</td>" for m in models)
        + "</tr>"
        for row in doc.get("table", [])
    )
    parts = [
        "<section id='redteam'><h2>Red team</h2>",
        "<p class='note'>ASR per attack per model, with its 95% bootstrap interval and the number of prompts; for "
        "every model but the base, the paired difference from the base in the same row (percentage points, "
        "its interval over the shared prompts and McNemar's exact p). Tamper rows read the model the attack "
        "made from each model (cb@ft25: cb after 25 fine-tuning steps).</p>",
        f"<table><tr><th>attack</th>{head}</tr>{body}</table>",
    ]
    for kind, series in doc.get("curves", {}).items():
        parts.append(svg_curves(f"ASR under {kind}", CURVE_AXES.get(kind, kind), series))
    obfuscation = doc.get("probe_obfuscation") or {}
    if obfuscation:
        parts.append(
            "<h3>Probe obfuscation</h3><p class='note'>The guard probe's recall at its calibrated threshold on the "
            "embedding attack's target, without and with the obfuscation term (same seed and steps), and on the "
            "model's own answer: the share of attacked prompts the monitor would halt.</p>"
        )
        header = ["model", "layer", "threshold", "prompts", "recall plain", "recall obfuscated"]
        header += ["halt rate plain", "halt rate obfuscated"]
        keys = ("recall_plain", "recall_obfuscated", "recall_plain_generation", "recall_obfuscated_generation")
        rows = [
            [name, r.get("layer"), f"{r.get('threshold', float('nan')):.3g}", r.get("n_prompts")]
            + ["-" if r.get(k) is None else f"{100 * r[k]:.0f}%" for k in keys]
            for name, r in obfuscation.items()
        ]
        parts.append(
            "<table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            + "</table>"
        )
    parts.append("</section>")
    return "".join(parts)


def add_section(report: str | Path, section: str) -> Path:
    """Insert `section` into a written report.html before its end (after it when there is no `</body>`)."""
    path = Path(report)
    text = path.read_text(encoding="utf-8")
    text = text.replace("</body>", section + "</body>", 1) if "</body>" in text else text + section
    return write_text_atomic(path, text)
