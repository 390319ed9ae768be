"""The mask report: what the losses will actually see, shown before training and saved beside the run.

Masks that are shifted by a token, cover the prompt by accident, or lose the completion to truncation
fail silently in training; this report makes them visible. It counts examples, tokens and dropped rows
per set, measures how much of each completion survived truncation, and renders one example per set
with its loss tokens highlighted. `inspect` does the same for any records file (`data inspect`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..fileio import write_text_atomic
from .records import KINDS, DataError, read_records
from .render import MASK_MODES, Example, RenderResult, render_all

__all__ = ["example_segments", "highlighted_example", "inspect", "mask_report", "print_mask_report", "save_mask_report"]

MASK_STYLE = "bold black on yellow"
OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ mark loss tokens in the plain-text form of an example


def example_segments(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_tokens: int = 160, context_tokens: int = 48
) -> list[tuple[str, bool]]:
    """(text, in the loss mask) runs of one example; long ones are cut to a window that shows the
    end of the prompt and the start of the completion, with "…" where tokens were left out."""
    n = len(example)
    lo, hi = 0, n
    if n > max_tokens:
        lo = max(0, min(example.completion_start - context_tokens, n - max_tokens))
        hi = min(n, lo + max_tokens)
    segments: list[tuple[str, bool]] = [("…", False)] if lo > 0 else []
    i = lo
    while i < hi:
        j = i
        while j < hi and example.loss_mask[j] == example.loss_mask[i]:
            j += 1
        piece = tokenizer.decode(example.input_ids[i:j], skip_special_tokens=False)
        segments.append((piece, bool(example.loss_mask[i])))
        i = j
    if hi < n:
        segments.append(("…", False))
    return segments


def _set_report(
    tokenizer: PreTrainedTokenizerBase, result: RenderResult, mask_mode: str | None, example_tokens: int
) -> dict[str, Any]:
    examples = result.examples
    lengths = [len(e) for e in examples]
    loss = sum(sum(e.loss_mask) for e in examples)
    tokens = sum(lengths)
    kept = sum(e.completion_end - e.completion_start for e in examples)
    full = sum(e.full_completion_length or (e.completion_end - e.completion_start) for e in examples)
    dropped = dict(sorted(result.dropped.items()))
    report: dict[str, Any] = {
        "mask_mode": mask_mode,
        "records": len(examples) + sum(dropped.values()),
        "examples": len(examples),
        "dropped": dropped,
        "truncated": result.truncated,
        "tokens": tokens,
        "loss_tokens": loss,
        "mask_fraction": round(loss / tokens, 4) if tokens else 0.0,
        "completion_tokens": kept,
        "completion_coverage": round(kept / full, 4) if full else 0.0,
        "mean_length": round(tokens / len(examples), 1) if examples else 0.0,
        "max_length": max(lengths, default=0),
    }
    calls = [e for e in examples if e.tool_call_start is not None]
    failures = list(getattr(result, "tool_call_failures", []))
    if calls or failures:
        # Issue 6: the share of tool-call examples whose call's first token is in the loss mask (must
        # be 100%); rows that failed the check were dropped and are listed, never masked over wholesale.
        covered = sum(bool(e.loss_mask[e.tool_call_start]) for e in calls)
        report["tool_calls"] = {
            "examples": len(calls) + len(failures),
            "start_token_covered": round(covered / (len(calls) + len(failures)), 4),
            "failures": failures,
        }
    if examples:
        segments = example_segments(tokenizer, examples[0], max_tokens=example_tokens)
        report["example"] = {
            "segments": [[text, masked] for text, masked in segments],
            "marked": "".join(f"{OPEN}{text}{CLOSE}" if masked else text for text, masked in segments),
        }
    return report


def _warnings(name: str, report: Mapping[str, Any]) -> list[str]:
    out = []
    if report["examples"] == 0:
        out.append(f"{name}: no usable examples ({report['records']} rows, all dropped)")
    elif report["loss_tokens"] == 0:
        out.append(f"{name}: the loss mask covers no token")
    if report["records"] and sum(report["dropped"].values()) > report["records"] / 2:
        out.append(f"{name}: more than half of the rows were dropped {report['dropped']}")
    if "tool_calls" in report and report["tool_calls"]["start_token_covered"] < 1:
        calls = report["tool_calls"]
        out.append(
            f"{name}: the tool-call start token is masked in only {calls['start_token_covered']:.0%} "
            f"of tool-call examples; failures: {calls['failures'][:5]}"
        )
    if report["examples"] and report["completion_coverage"] < 0.5:
        coverage = report["completion_coverage"]
        out.append(f"{name}: truncation kept only {coverage:.0%} of completion tokens; raise max_length")
    return out


def mask_report(
    tokenizer: PreTrainedTokenizerBase,
    results: Mapping[str, RenderResult],
    mask_modes: Mapping[str, str] | str | None = None,
    max_length: int | None = None,
    example_tokens: int = 160,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The mask report as a JSON-ready dict: one entry per set (examples, tokens, loss tokens, mask
    fraction, completion coverage after truncation, dropped rows by reason, truncated count, one
    example with loss tokens marked ⟦like this⟧) and warnings for sets the losses would misuse."""
    sets: dict[str, Any] = {}
    warnings: list[str] = []
    for name, result in results.items():
        mode = mask_modes.get(name) if isinstance(mask_modes, Mapping) else mask_modes
        sets[name] = _set_report(tokenizer, result, mode, example_tokens)
        warnings += _warnings(name, sets[name])
    report: dict[str, Any] = {"max_length": max_length, "sets": sets, "warnings": warnings}
    if extra:
        report |= dict(extra)
    return report


def save_mask_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write the report as JSON (beside the run's other outputs), atomically."""
    return write_text_atomic(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def highlighted_example(segments: Sequence[Sequence[Any]]) -> Any:
    """A rich Text of an example's (text, masked) runs: loss tokens highlighted, the rest dimmed."""
    from rich.text import Text

    text = Text()
    for segment, masked in segments:
        text.append(str(segment), style=MASK_STYLE if masked else "dim")
    return text


def print_mask_report(report: Mapping[str, Any], console: Any = None) -> None:
    """Print the report with rich: a table of the sets, then each example with loss tokens highlighted."""
    from rich import box
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    title = "Mask report" + (f" (max_length {report['max_length']})" if report.get("max_length") else "")
    # One column per set (there are few), one row per figure: fits a narrow terminal.
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("")
    for name in report["sets"]:
        table.add_column(name, justify="right", overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("mask mode", lambda s: str(s["mask_mode"] or "-")),
        ("examples / rows", lambda s: f"{s['examples']} / {s['records']}"),
        ("dropped", lambda s: ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"),
        ("truncated", lambda s: str(s["truncated"])),
        ("tokens", lambda s: str(s["tokens"])),
        ("loss tokens", lambda s: f"{s['loss_tokens']} ({s['mask_fraction']:.1%})"),
        ("completion kept", lambda s: f"{s['completion_coverage']:.1%}"),
        ("length mean / max", lambda s: f"{s['mean_length']:.0f} / {s['max_length']}"),
    ]
    if any("tool_calls" in s for s in report["sets"].values()):
        rows.append(
            (
                "tool-call start masked",
                lambda s: (
                    f"{s['tool_calls']['start_token_covered']:.0%} of {s['tool_calls']['examples']}"
                    if "tool_calls" in s
                    else "-"
                ),
            )
        )
    for label, cell in rows:
        table.add_row(label, *(cell(s) for s in report["sets"].values()))
    console.print(table)
    for name, s in report["sets"].items():
        if "example" not in s:
            continue
        heading = f"{name}: first example (highlighted = loss tokens)"
        console.print(Panel(highlighted_example(s["example"]["segments"]), title=heading, title_align="left"))
    for warning in report.get("warnings", []):
        console.print(Text(f"warning: {warning}", style="bold red"))


def inspect(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | str,
    mask_mode: str | Mapping[str, str] = "completion",
    max_length: int = 512,
    prompt_tokens: int = 8,
    console: Any = None,
    show: bool = True,
) -> dict[str, Any]:
    """Render a records file as training would and report its masks; one set per record kind.

    `tokenizer` may be a loaded tokenizer or a model name (`embedded`, hub id, folder). `mask_mode` is
    one mode for every kind or a mapping kind -> mode, as a recipe gives it. Unreadable rows are
    counted, not fatal, so a damaged file can still be inspected.
    """
    if isinstance(tokenizer, str):
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    unreadable: Counter = Counter()
    records = read_records(path, dropped=unreadable)
    modes = {
        kind: (mask_mode.get(kind, "completion") if isinstance(mask_mode, Mapping) else mask_mode) for kind in KINDS
    }
    for mode in modes.values():
        if mode not in MASK_MODES:
            raise DataError(f"unknown mask mode {mode!r}; choose one of {MASK_MODES}")
    results: dict[str, RenderResult] = {}
    for kind in KINDS:
        subset: Sequence = [r for r in records if r.kind == kind]
        if subset:
            results[kind] = render_all(tokenizer, subset, modes[kind], max_length, prompt_tokens)
    report = mask_report(
        tokenizer,
        results,
        {k: modes[k] for k in results},
        max_length,
        extra={
            "file": str(path),
            "rows": len(records) + sum(unreadable.values()),
            "unreadable_rows": sum(unreadable.values()),
        },
    )
    if unreadable:
        report["warnings"].append(f"{path}: {sum(unreadable.values())} unreadable row(s) skipped")
    if show:
        print_mask_report(report, console)
    return report
