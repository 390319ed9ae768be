"""How often a judge agrees with the human labels of the XSTest GPT-4 completions."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...data.loaders import XSTEST_LABELS, load_xstest_completions
from .base import Judge

__all__ = ["judge_agreement", "xstest_split"]

FULL_COMPLIANCE, FULL_REFUSAL = XSTEST_LABELS[0], XSTEST_LABELS[1]
"""The two labels that count: partial refusals are ambiguous by definition."""
AUDIT_KEYS = (
    "refusal_phrase",
    "perplexity",
    "window_perplexity",
    "relevance",
    "repetition",
    "compression",
    "new_bytes",
)
"""Verdict details copied into each disagreement, so it can be audited."""


def xstest_split(row_id: str) -> str:
    """`dev` for odd-numbered rows (used to design and tune the offline judge), `test` for even ones.

    The parity of an id such as `v2-17` is that of its last digit, whatever digits come before.
    """
    digits = re.findall(r"\d", row_id)
    return "dev" if digits and int(digits[-1]) % 2 == 1 else "test"


def agreement_stats(pairs: Sequence[tuple[bool, bool]]) -> dict[str, Any]:
    """Accuracy and confusion counts of (human says compliance, judge says compliance) pairs."""
    tp = sum(h and p for h, p in pairs)
    tn = sum(not h and not p for h, p in pairs)
    fp = sum(not h and p for h, p in pairs)
    fn = sum(h and not p for h, p in pairs)
    n = len(pairs)
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else math.nan,
        "confusion": {
            "human_compliance_judge_compliance": tp,
            "human_compliance_judge_refusal": fn,
            "human_refusal_judge_compliance": fp,
            "human_refusal_judge_refusal": tn,
        },
    }


def judge_agreement(judge: Judge, xstest_completions_csv: str | Path, split: str | None = None) -> dict[str, Any]:
    """Agreement of `judge` with the human labels of the XSTest GPT-4 completions.

    Only rows labelled full compliance or full refusal count (partial refusals are ambiguous by
    definition). The compared decision is compliance (`details["complied"]`, else `harmful`): on
    XSTest, compliance means the model answered, and most prompts are safe, so "harmful" is not what
    the human labels say. For the offline judge the `harmful` decision (compliance that is also
    relevant) is reported too. `split` = dev / test restricts to one half (see `xstest_split`).
    """
    rows = load_xstest_completions(xstest_completions_csv, final_labels={FULL_COMPLIANCE, FULL_REFUSAL})
    if split is not None:
        rows = [r for r in rows if xstest_split(r.meta["id"]) == split]
    verdicts = judge.judge([r.prompt for r in rows], [r.completion for r in rows])
    human = [r.meta["final_label"] == FULL_COMPLIANCE for r in rows]
    complied = [bool(v.details.get("complied", v.harmful)) for v in verdicts]
    result = {
        "judge": judge.settings(),
        "split": split or "all",
        "labels": sorted([FULL_COMPLIANCE, FULL_REFUSAL]),
        "counts": {"full_compliance": sum(human), "full_refusal": len(human) - sum(human)},
        **agreement_stats(list(zip(human, complied))),
    }
    result["harmful_decision_accuracy"] = agreement_stats([(h, v.harmful) for h, v in zip(human, verdicts)])["accuracy"]
    by_split: dict[str, list[tuple[bool, bool]]] = {}
    for row, h, c in zip(rows, human, complied):
        by_split.setdefault(xstest_split(row.meta["id"]), []).append((h, c))
    result["accuracy_by_split"] = {k: agreement_stats(v)["accuracy"] for k, v in sorted(by_split.items())}
    result["disagreements"] = [
        {
            "id": r.meta["id"],
            "human": r.meta["final_label"],
            "completion_start": r.completion[:120],
            **{k: v.details[k] for k in AUDIT_KEYS if k in v.details},
        }
        for r, h, c, v in zip(rows, human, complied, verdicts)
        if h != c
    ]
    return result
