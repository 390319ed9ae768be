"""Issue 9, RR + LAT: pool `lat_hardening.py` folders that attacked different slices of the held-out prompts.

One prompt is 5 points of a 20-prompt ASR, so a second slice (`lat_hardening.py --offset 20`) is how a
reading gets firmer without redoing the first. Per model, over every folder it appears in: embedding-attack
ASR (a prompt broken if any variant is), the reading beyond the target (each folder's, weighted by its
prompts), and each model against `--reference` on the prompts both were attacked on: the paired difference
with its bootstrap interval and McNemar's exact p (evaluation/metrics.py).

    .venv/bin/python benchmarks/lat_pool.py --reference vanilla runs/lat/emb runs/lat/emb2-vanilla \
        runs/lat/emb-K-seed2 runs/lat/emb2-hardened-K-seed2
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from circuit_breakers.evaluation.metrics import best_of_n, paired_difference


def attacked(folders: Sequence[Path]) -> dict[str, dict[str, bool]]:
    """model -> prompt id -> broken by the embedding attack (any variant: `best_of_n`), over all folders."""
    samples: dict[str, list[tuple[str, bool]]] = {}
    for folder in folders:
        for line in (folder / "samples.jsonl").read_text().splitlines():
            sample = json.loads(line)
            if sample["attack"] == "embedding":
                samples.setdefault(sample["model"], []).append((sample["prompt_id"], bool(sample["harmful"])))
    broken = {}
    for model, rows in samples.items():
        prompts = [p for p, _ in rows]
        broken[model] = dict(zip(dict.fromkeys(prompts), best_of_n([h for _, h in rows], prompts)))
    return broken


def beyond_target(folders: Sequence[Path]) -> dict[str, float]:
    """model -> the beyond-the-target ASR of its folders, weighted by each folder's number of prompts.

    Folders without lat_hardening's summary.json (for example `eval rejudge` output) add nothing here.
    """
    sums: dict[str, list[float]] = {}
    for folder in folders:
        if not (folder / "summary.json").is_file():
            continue
        summary = json.loads((folder / "summary.json").read_text())
        for model, value in summary["asr_embedding_beyond_target"].items():
            total = sums.setdefault(model, [0.0, 0.0])
            total[0] += value * summary["n_prompts"]
            total[1] += summary["n_prompts"]
    return {model: s / n for model, (s, n) in sums.items()}


def pool(folders: Sequence[Path], reference: str) -> dict[str, Any]:
    """Pooled readings per model and paired comparisons with `reference` (see the module docstring)."""
    broken, strict = attacked(folders), beyond_target(folders)
    if reference not in broken:
        raise SystemExit(f"reference model {reference!r} is in none of the folders (models: {sorted(broken)})")
    out: dict[str, Any] = {}
    for model, flags in broken.items():
        entry: dict[str, Any] = {
            "prompts": len(flags),
            "asr_embedding": sum(flags.values()) / len(flags),
            "asr_embedding_beyond_target": strict.get(model),
        }
        if model != reference:
            shared = [p for p in flags if p in broken[reference]]
            diff = paired_difference([broken[reference][p] for p in shared], [flags[p] for p in shared])
            entry["vs_reference"] = {
                "prompts": len(shared),
                "difference": diff.difference,
                "low": diff.low,
                "high": diff.high,
                "reference_only": diff.base_only,
                "model_only": diff.other_only,
                "mcnemar_p": diff.p_value,
            }
        out[model] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="lat_hardening.py --out folders")
    parser.add_argument("--reference", required=True, help="model name the others are compared with")
    args = parser.parse_args()
    print(json.dumps(pool(args.folders, args.reference), indent=2))


if __name__ == "__main__":
    main()
