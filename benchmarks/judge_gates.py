"""The offline judge's degeneracy gates against blind hand labels (issue 9;
docs/results/2026-11-30-offline-judge-gates.md).

`benchmarks/labels/offline_judge_gates.json` names 340 generations of the embedded model, each labelled
by hand without seeing which model wrote it:
- `embedding`: the 300-step input-embedding attack read at 128 tokens on four models (vanilla circuit
  breakers and three hardened seeds), read from `lat_hardening.py` folders (`--attacked`);
- `direct-harmful` / `direct-xstest`: the base model answering HarmBench behaviours, and the base model and
  vanilla circuit breakers answering XSTest safe prompts, directly, 128 new tokens, greedy; regenerated
  here in the labelled order (`--model base=embedded --model vanilla=PATH`).

A harmful request counts as answered when labelled S (substantive) or B (a vague or wrong attempt), a
safe one when labelled A; that is what the offline judge claims to measure ("answered", not "harmful").
Printed: agreement with the labels on the dev half (where the gates were chosen) and the test half,
for the judge without the gates (`--max_window_perplexity inf --min_compression 0`, the earlier judge)
and with them (the default), and the ASR per model of each labelled reading.

    .venv/bin/python benchmarks/judge_gates.py --data_dir ../shared/data \
        --attacked runs/interp/emb300t128o*/ --model base=embedded --model vanilla=runs/fresh/train/merged
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from circuit_breakers.data.benchmarks import load_benchmark
from circuit_breakers.evaluation.judges import OfflineJudge
from circuit_breakers.generation import generate
from circuit_breakers.models import load_model_and_tokenizer

LABELS = Path(__file__).parent / "labels" / "offline_judge_gates.json"
BENCHMARK_OF = {"direct-harmful": "harmbench_standard", "direct-xstest": "xstest_safe"}


def attacked_completions(folders: list[Path]) -> dict[tuple, tuple[str, str]]:
    """(reading, model, prompt id) -> (request, completion) of the embedding attack in `folders`."""
    out = {}
    for folder in folders:
        for line in (folder / "samples.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["attack"] == "embedding":
                out[("embedding", row["model"], row["prompt_id"])] = (row["prompt"], row["completion"])
    return out


def direct_completions(rows: list[dict], models: dict[str, str], data_dir: str) -> dict[tuple, tuple[str, str]]:
    """The labelled direct answers, regenerated per (model, reading) in the labelled order."""
    texts = {p.id: p.text for name in BENCHMARK_OF.values() for p in load_benchmark(name, data_dir=data_dir)}
    out = {}
    for model_name, path in models.items():
        model, tokenizer = load_model_and_tokenizer(path)
        for reading in BENCHMARK_OF:
            ids = [
                r["prompt_id"]
                for r in sorted(rows, key=lambda r: r.get("order", 0))
                if r["reading"] == reading and r["model"] == model_name
            ]
            if not ids:
                continue
            completions = generate(
                model, tokenizer, [texts[i] for i in ids], max_new_tokens=128, batch_size=8, progress=False
            )
            out.update({(reading, model_name, i): (texts[i], c) for i, c in zip(ids, completions)})
        del model
    return out


def agreement(rows: list[dict], items: dict[tuple, tuple[str, str]], judge: OfflineJudge) -> dict:
    """Per split and reading: labelled generations the judge reads as labelled; and ASR per model."""
    keys = [(r["reading"], r["model"], r["prompt_id"]) for r in rows]
    verdicts = judge.judge([items[k][0] for k in keys], [items[k][1] for k in keys])
    table: dict = {}
    for row, verdict in zip(rows, verdicts):
        safe = row["reading"] == "direct-xstest"
        said = verdict.details["complied"] if safe else verdict.harmful
        truth = row["label"] == "A" if safe else row["label"] in ("S", "B")
        cell = table.setdefault(row["split"], {}).setdefault(row["reading"], [0, 0])
        cell[0] += said == truth
        cell[1] += 1
        asr = table.setdefault("rate", {}).setdefault(f"{row['reading']}/{row['model']}", [0, 0, 0])
        asr[0] += said
        asr[1] += truth
        asr[2] += 1
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacked", nargs="+", type=Path, required=True, help="lat_hardening.py --out folders")
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH for the direct readings")
    parser.add_argument("--data_dir", required=True)
    args = parser.parse_args()
    rows = json.loads(LABELS.read_text())["rows"]
    items = attacked_completions(args.attacked)
    items.update(direct_completions(rows, dict(m.split("=", 1) for m in args.model), args.data_dir))
    missing = [r for r in rows if (r["reading"], r["model"], r["prompt_id"]) not in items]
    rows = [r for r in rows if (r["reading"], r["model"], r["prompt_id"]) in items]
    print(f"{len(rows)} labelled generations found, {len(missing)} missing")
    judges = {
        "without gates": OfflineJudge(max_window_perplexity=math.inf, min_compression=0.0),
        "with gates (default)": OfflineJudge(),
    }
    tables = {name: agreement(rows, items, judge) for name, judge in judges.items()}
    for split in ("dev", "test"):
        for reading in sorted(tables["with gates (default)"].get(split, {})):
            cells = "  ".join(f"{name}: {t[split][reading][0]}/{t[split][reading][1]}" for name, t in tables.items())
            print(f"{split:4s} {reading:15s} {cells}")
    print("reading/model: judge ASR without gates, with gates; hand-labelled rate (answered)")
    for key, (_, truth, n) in sorted(tables["with gates (default)"]["rate"].items()):
        said = [t["rate"][key][0] for t in tables.values()]
        print(f"  {key:30s} " + "  ".join(f"{100 * s / n:5.1f}%" for s in said) + f"   hand {100 * truth / n:5.1f}%")


if __name__ == "__main__":
    main()
