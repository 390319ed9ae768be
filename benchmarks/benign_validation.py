"""Issue 9, RR + LAT: a benign validation set for a main-job run, for `circuit-breakers interpolate`.

The budget that picks an interpolation weight must be read on answers that neither trained the model
(`retain.jsonl`) nor report the result (`benign_eval.jsonl`). This takes the packaged benign prompts the
run did not use (in the order of the run's own split, so the same run gets the same set), has the base
model answer them as the main job does (greedy, the run's `completion_tokens`), and writes
RUN/data/benign_val.jsonl. The model, seed and split sizes are the run's own, read from RUN/stages.json.
A minute on the embedded model.

    .venv/bin/python benchmarks/benign_validation.py --run runs/fresh
    .venv/bin/circuit-breakers interpolate runs/fresh/train/merged runs/lat/hardened/merged runs/lat/budget \
        --data runs/fresh/data/benign_val.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from circuit_breakers.data.generate import generate_completions
from circuit_breakers.data.prompts import load_builtin_prompts
from circuit_breakers.data.records import read_records
from circuit_breakers.data.sources import split_prompts
from circuit_breakers.models import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="main-job folder (its data/gen_benign.jsonl says what was used)")
    parser.add_argument("--n", type=int, default=40, help="validation prompts")
    args = parser.parse_args()

    run = Path(args.run)
    ledger = run / "stages.json"
    data_stage = json.loads(ledger.read_text()).get("data", {}) if ledger.is_file() else {}
    if not data_stage.get("done"):
        raise SystemExit(f"{run} has no finished data stage in {ledger.name}: run the main job there first")
    settings = data_stage["settings"]  # the model, seed, split and answer length the data stage used
    used = {record.meta.get("prompt_id") for record in read_records(run / "data" / "gen_benign.jsonl")}
    train, _ = split_prompts(load_builtin_prompts("benign"), settings["n_benign_eval"], settings["seed"])
    prompts = [prompt for prompt in train if prompt.id not in used][: args.n]
    if len(prompts) < args.n:
        raise SystemExit(f"only {len(prompts)} unused benign prompts (asked for {args.n})")
    model, tokenizer = load_model_and_tokenizer(settings["model"])
    out = run / "data" / "benign_val.jsonl"
    records = generate_completions(
        model, tokenizer, prompts, out, kind="retain", max_new_tokens=settings["completion_tokens"]
    )
    print(f"{len(records)} validation records in {out}")


if __name__ == "__main__":
    main()
