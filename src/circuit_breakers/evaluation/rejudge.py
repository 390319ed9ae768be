"""Judge a finished evaluation again, without generating anything.

Generations are the expensive part of an evaluation (an optimised attack per prompt); verdicts are
cheap and improve as judges do. `rejudge_folder` reads an `eval` folder, hands every stored
completion (with the request and context it was judged against before) to another judge, and
writes a complete evaluation folder next to it: samples.jsonl with the new verdicts, cells.json,
eval_meta.json, results.json and report.html. The source folder is never written to.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..fileio import digest, write_text_atomic
from .cells import SOFT_PROMPTS_DIR
from .judges import Judge, judge_attack_completions
from .report import write_results
from .results import OVER_REFUSAL, EvalResult, safe_compliance, verdict_label
from .store import CELLS_FILE, META_FILE, SAMPLES_FILE, CellStore, result_from_store


def rejudge(result: EvalResult, judge: Judge) -> EvalResult:
    """A copy of `result` whose samples carry `judge`'s verdicts; completions are untouched.

    Safe prompts (over-refusal) are scored on compliance exactly as a fresh evaluation would.
    """
    samples = result.samples
    prompts, completions = [s.prompt for s in samples], [s.completion for s in samples]
    contexts = [s.context for s in samples]
    verdicts = judge_attack_completions(judge, prompts, completions, contexts, [s.prefill for s in samples])
    judged = []
    for sample, verdict in zip(samples, verdicts):
        safe = sample.attack == OVER_REFUSAL
        complied = (
            safe_compliance(verdict, sample.completion)
            if safe
            else bool(verdict.details.get("complied", verdict.harmful))
        )
        label = verdict_label(verdict.harmful, {**verdict.details, "complied": complied}, safe=safe)
        judged.append(
            replace(
                sample,
                harmful=bool(verdict.harmful),
                complied=complied,
                score=float(verdict.score),
                judge=verdict.judge,
                verdict=label,
                judge_details=dict(verdict.details),
            )
        )
    # No longer the verdicts of `result.out_dir`: writing this result must not reuse that folder's files.
    out = replace(result, samples=judged, judge=judge.settings(), metrics={}, out_dir=None)
    out.recompute()
    return out


def rejudge_folder(
    source: str | Path, destination: str | Path, judge: Judge, config: Mapping[str, Any] | None = None
) -> EvalResult:
    """Re-judge the evaluation in `source` into `destination` (which must not hold one already).

    Each cell keeps its settings (attack, generation length, capability losses); its fingerprint is
    derived from the old one and the new judge, so `eval` pointed at `destination` with the same
    judge would not mistake these verdicts for its own cells' and would run them again.
    """
    source, destination = Path(source), Path(destination)
    if not (source / CELLS_FILE).is_file():
        raise FileNotFoundError(f"{source}: no {CELLS_FILE} (not an evaluation folder)")
    if destination.resolve() == source.resolve():
        raise ValueError("the re-judged evaluation needs its own folder: the source is kept as it is")
    if (destination / CELLS_FILE).is_file() or (destination / SAMPLES_FILE).is_file():
        raise FileExistsError(f"{destination}: already holds an evaluation; choose an empty folder")
    stored = CellStore(source, read_only=True)  # the source folder is read once and never written
    before = result_from_store(stored)
    after = rejudge(before, judge)
    settings = judge.settings()
    store = CellStore(destination)
    for entry in stored.cells.values():
        model, cell = entry["model"], entry["cell"]
        extra = {k: v for k, v in entry.items() if k not in ("model", "cell", "fingerprint", "n")}
        store.finish(
            model,
            cell,
            digest(entry["fingerprint"], settings),
            after.cell(model, cell),
            **extra,
            rejudged_from=entry["fingerprint"],
        )
    meta_path = source / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    meta.update(judge=settings, rejudged_from={"folder": str(source), "judge": before.judge})
    write_text_atomic(destination / META_FILE, json.dumps(meta, indent=1))
    if (source / SOFT_PROMPTS_DIR).is_dir() and not (destination / SOFT_PROMPTS_DIR).exists():
        shutil.copytree(source / SOFT_PROMPTS_DIR, destination / SOFT_PROMPTS_DIR)
    previous = source / "results.json"
    base_config = json.loads(previous.read_text(encoding="utf-8")).get("config", {}) if previous.is_file() else {}
    after = replace(after, out_dir=destination)
    write_results(after, destination, {**base_config, **dict(config or {}), "rejudged_from": str(source)})
    return after
