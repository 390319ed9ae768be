"""Issue 9, RR + LAT: where a circuit breaker's capability cost comes from, in a minute per model.

For each model, against the base model on the same benign answers (default: a main-job run's held-out
`benign_eval.jsonl` and its training `retain.jsonl`): the teacher-forced loss change (the main job's
capability reading) and the mean cosine between the two models' hidden states over the answer tokens at
a few layers. Adapters end at the deepest target layer (20 on the embedded model), so the layers above
it are the base model's and that layer's drift is all the output sees; the retain loss's `all` layers
average it with 19 shallower ones. A model whose loss change is far outside the main job's 5% needs no
25-minute attack benchmark (`lat_hardening.py`).

    .venv/bin/python benchmarks/benign_drift.py --run runs/fresh \
        --model vanilla=runs/fresh/train/merged --model hardened=runs/lat/hardened/merged
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from circuit_breakers.data.batching import pad_examples
from circuit_breakers.data.records import read_records
from circuit_breakers.data.render import render_all
from circuit_breakers.evaluation.capability import teacher_forced_loss
from circuit_breakers.models import load_model, load_model_and_tokenizer
from circuit_breakers.representations import hidden_states

LAYERS = (5, 10, 15, 20)


@torch.no_grad()
def layer_cosines(
    model: nn.Module, base: nn.Module, examples: Sequence, pad: int, layers: Sequence[int] = LAYERS, batch_size: int = 8
) -> dict[int, float]:
    """{layer: mean cosine over the answer tokens} between `model` and `base` on the same input."""
    sums = dict.fromkeys(layers, 0.0)
    count = 0.0
    for start in range(0, len(examples), batch_size):
        ids, attention, mask = pad_examples(examples[start : start + batch_size], pad)
        mine, theirs = hidden_states(model, ids, attention, layers), hidden_states(base, ids, attention, layers)
        weights = mask.float()
        for layer in layers:
            cos = torch.nn.functional.cosine_similarity(mine[layer].float(), theirs[layer].float(), dim=-1)
            sums[layer] += float((cos * weights).sum())
        count += float(weights.sum())
    return {layer: total / max(count, 1.0) for layer, total in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="main-job folder (its data/ split is used)")
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH of a merged model (repeatable)")
    parser.add_argument("--sets", default="benign_eval,retain", help="record files under RUN/data (comma list)")
    parser.add_argument("--base", default="embedded", help="the base model the run trained from")
    parser.add_argument("--n", type=int, default=40, help="records per set")
    parser.add_argument("--layers", default=",".join(map(str, LAYERS)), help="hidden-state indices (comma list)")
    args = parser.parse_args()

    base, tokenizer = load_model_and_tokenizer(args.base)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    layers = [int(x) for x in args.layers.split(",")]
    sets = {name: read_records(Path(args.run) / "data" / f"{name}.jsonl")[: args.n] for name in args.sets.split(",")}
    rendered = {name: render_all(tokenizer, records, mask_mode="completion").examples for name, records in sets.items()}
    base_loss = {name: teacher_forced_loss(base, tokenizer, records).mean_loss for name, records in sets.items()}
    results: dict[str, dict] = {}
    for spec in args.model:
        name, path = spec.split("=", 1)
        model = load_model(path)
        for set_name, records in sets.items():
            loss = teacher_forced_loss(model, tokenizer, records).mean_loss
            row = {
                "loss_change": loss / base_loss[set_name] - 1,
                "cosine": layer_cosines(model, base, rendered[set_name], pad, layers),
            }
            results.setdefault(name, {})[set_name] = row
            cosines = "  ".join(f"L{layer} {value:.4f}" for layer, value in row["cosine"].items())
            print(f"{name:>12} {set_name:>12}  loss {row['loss_change']:+.1%}  {cosines}", flush=True)
        del model
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
