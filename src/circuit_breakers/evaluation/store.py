"""The evaluation folder on disk: finished cells (cells.json) and their judged samples (samples.jsonl).

A cell is one (model, attack) pair, or (model, "over_refusal") / (model, "capability"). Every
finished cell is appended to samples.jsonl and recorded, with a fingerprint of its settings, in
cells.json, so an interrupted evaluation resumes from its finished cells and a changed setting
recomputes only the cells it touches. `load_result` rebuilds an `EvalResult` from the folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..fileio import json_safe, write_jsonl_atomic, write_text_atomic
from .results import (
    CAPABILITY,
    DRIFT_CELLS,
    DRIFT_GREEDY,
    DRIFT_KL,
    LM_EVAL,
    OVER_REFUSAL,
    QUALITY,
    SCORE_CELLS,
    EvalResult,
    Sample,
)

__all__ = ["CELLS_FILE", "META_FILE", "SAMPLES_FILE", "SCHEMA", "CellStore", "load_result", "result_from_store"]

SAMPLES_FILE = "samples.jsonl"
CELLS_FILE = "cells.json"
META_FILE = "eval_meta.json"
SCHEMA = 1
"""Version of cells.json; a folder written under another version starts afresh."""


class CellStore:
    """samples.jsonl + cells.json in `out_dir`: which cells are finished, under which settings.

    A cell's rows are appended (and flushed to disk) before the cell is marked finished, so rows of
    a cell interrupted half-way are never trusted: `open` drops them, as well as rows of cells whose
    settings changed.
    """

    def __init__(self, out_dir: Path | None, read_only: bool = False) -> None:
        self.out_dir = out_dir
        self.cells: dict[str, dict[str, Any]] = {}
        self.samples: list[Sample] = []
        if out_dir is None:
            return
        if not read_only:
            out_dir.mkdir(parents=True, exist_ok=True)
        cells_path, samples_path = out_dir / CELLS_FILE, out_dir / SAMPLES_FILE
        if cells_path.is_file():
            state = json.loads(cells_path.read_text(encoding="utf-8"))
            self.cells = state.get("cells", {}) if state.get("schema") == SCHEMA else {}
        rows: list[Sample] = []
        if samples_path.is_file():
            with samples_path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by an interruption
                        continue
                    key = self.key(row.get("model", ""), row.get("attack", ""))
                    if key in self.cells and row.get("cell") == self.cells[key]["fingerprint"]:
                        rows.append(Sample.from_dict(row))
        self.samples = rows
        if not read_only:
            self._rewrite()

    @staticmethod
    def key(model: str, cell: str) -> str:
        """The key of a cell in cells.json."""
        return f"{model}\t{cell}"

    def done(self, model: str, cell: str, print_: str) -> bool:
        """Whether the cell is finished under the settings whose fingerprint is `print_`."""
        entry = self.cells.get(self.key(model, cell))
        return entry is not None and entry["fingerprint"] == print_

    def entry(self, model: str, cell: str) -> dict[str, Any]:
        """What cells.json records about a finished cell."""
        return self.cells[self.key(model, cell)]

    def finish(self, model: str, cell: str, print_: str, samples: Sequence[Sample], **extra: Any) -> None:
        """Append the cell's samples, then mark it finished (in this order, for crash safety)."""
        key = self.key(model, cell)
        self.samples = [s for s in self.samples if not (s.model == model and s.attack == cell)] + list(samples)
        self.cells[key] = {"model": model, "cell": cell, "fingerprint": print_, "n": len(samples), **json_safe(extra)}
        if self.out_dir is None:
            return
        with (self.out_dir / SAMPLES_FILE).open("a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps({**sample.to_dict(), "cell": print_}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.write_cells()

    def write_cells(self) -> None:
        """Write cells.json (atomically) from the cells held in memory."""
        assert self.out_dir is not None
        write_text_atomic(self.out_dir / CELLS_FILE, json.dumps({"schema": SCHEMA, "cells": self.cells}, indent=1))

    def _rewrite(self) -> None:
        """samples.jsonl holding exactly the trusted rows (drops partial and stale cells)."""
        assert self.out_dir is not None
        rows = (
            {**sample.to_dict(), "cell": self.cells[self.key(sample.model, sample.attack)]["fingerprint"]}
            for sample in self.samples
        )
        write_jsonl_atomic(self.out_dir / SAMPLES_FILE, rows)


def load_result(out_dir: str | Path, models: Iterable[str] | None = None, read_only: bool = False) -> EvalResult:
    """An `EvalResult` rebuilt from `samples.jsonl` and `cells.json` (to re-render a report).

    By default the folder's samples.jsonl is rewritten without rows of unfinished or stale cells, as
    `evaluate_models` would; `read_only` leaves every file as it is.
    """
    return result_from_store(CellStore(Path(out_dir), read_only=read_only), models)


def result_from_store(store: CellStore, models: Iterable[str] | None = None) -> EvalResult:
    """An `EvalResult` from an opened evaluation folder (its cells, samples and eval_meta.json)."""
    if store.out_dir is None:
        raise ValueError("an in-memory CellStore has no evaluation folder to rebuild a result from")
    out_dir = store.out_dir
    names = list(models) if models is not None else list(dict.fromkeys(e["model"] for e in store.cells.values()))
    meta_path = Path(out_dir) / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    attacks = meta.get("attacks") or {
        e["cell"]: e.get("attack_settings", {})
        for e in store.cells.values()
        if e["cell"] not in (OVER_REFUSAL, CAPABILITY, *DRIFT_CELLS, *SCORE_CELLS)
    }
    result = EvalResult(
        models={n: meta.get("models", {}).get(n, n) for n in names},
        attacks=attacks,
        judge=meta.get("judge", {}),
        samples=[s for s in store.samples if s.model in names],
        capability={
            e["model"]: e["losses"] for e in store.cells.values() if e["cell"] == CAPABILITY and e["model"] in names
        },
        settings=meta.get("settings", {}),
        greedy={
            e["model"]: e["answers"] for e in store.cells.values() if e["cell"] == DRIFT_GREEDY and e["model"] in names
        },
        drift_kl={e["model"]: e["kl"] for e in store.cells.values() if e["cell"] == DRIFT_KL and e["model"] in names},
        lm_eval={
            e["model"]: e["lm_eval"] for e in store.cells.values() if e["cell"] == LM_EVAL and e["model"] in names
        },
        quality={
            e["model"]: e["verdicts"] for e in store.cells.values() if e["cell"] == QUALITY and e["model"] in names
        },
        out_dir=Path(out_dir),
        timings={f"{e['model']}/{e['cell']}": e.get("seconds", math.nan) for e in store.cells.values()},
    )
    result.recompute()
    return result
