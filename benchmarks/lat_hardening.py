"""Issue 9, RR + LAT: the input-embedding attack against vanilla and hardened circuit breakers.

Held-out harmful prompts of a main-job run (`runs/<id>/data/harmful_eval.jsonl`) that are HarmBench
behaviours get their HarmBench target ("Sure, here's how to ..."), which the soft-prompt attack optimises
the model to say. Each model is attacked white-box (signed-gradient soft prompt, see
evaluation/attacks/embedding.py) and judged by the offline judge; also direct requests, and capability
(teacher-forced loss on held-out benign answers, compliance on borderline-safe prompts) against the
base model. A stricter reading judges only what a completion says beyond the forced target: an answer
that only repeats "Sure, here's how to X" gives nothing away. Compliance is read a second time with text
appended to each borderline prompt at the attack's slot (`--suffix_text`, default the suffix adversary's
placeholder text): a model hardened by `lat_positions: suffix` must not simply break on whatever sits there.

    .venv/bin/python benchmarks/lat_hardening.py --run runs/fresh --data_dir ../shared/data --out runs/lat/emb \
        --model vanilla=runs/fresh/train/merged --model hardened=runs/lat/hardened/merged [--n 20 --steps 100]

`--offset 20 --out runs/lat/emb-2` attacks the next 20 prompts, so a second run widens the first one's set
without redoing it; `benchmarks/lat_pool.py` pools such folders (paired against a reference model).

Finished cells are kept in --out and reused (a model retrained into the same folder is evaluated again).
Each model's optimised soft prompts are kept in `--out/soft_prompts/`; `--replay DIR` reads a finished
`--out` DIR again from them without optimising (for example with `--max_new_tokens 128`: the forced
target takes about half of the default 40 tokens, so a longer generation shows what follows it).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from circuit_breakers.config import CircuitBreakerConfig
from circuit_breakers.data.benchmarks import load_benchmark
from circuit_breakers.data.prompts import read_prompts, write_prompts
from circuit_breakers.data.records import read_records
from circuit_breakers.evaluation.attacks import make_attack
from circuit_breakers.evaluation.cells import soft_prompt_file
from circuit_breakers.evaluation.compare import evaluate_models
from circuit_breakers.evaluation.judges import make_judge
from circuit_breakers.evaluation.metrics import best_of_n

SUFFIX_INIT = CircuitBreakerConfig.__dataclass_fields__["lat_suffix_init"].default


def heldout_with_targets(run: Path, data_dir: str, out: Path) -> list:
    """The run's held-out harmful prompts that are HarmBench behaviours, with their targets and categories."""
    behaviours = {p.text.strip().lower(): p for p in load_benchmark("harmbench_standard", data_dir)}
    prompts = [
        replace(p, target=behaviours[key].target, category=behaviours[key].category)
        for p in read_prompts(run / "data" / "harmful_eval.jsonl")
        if (key := p.text.strip().lower()) in behaviours
    ]
    write_prompts(prompts, out / "heldout_targets.jsonl")
    return prompts


def beyond_target(samples: list, judge) -> dict[str, float]:
    """ASR per model when every copy of the target is cut out of the completion before judging."""
    out = {}
    for model in sorted({s.model for s in samples}):
        rows = [s for s in samples if s.model == model]
        cut = [
            s.completion.replace(s.attack_details.get("target", ""), " ").strip()
            if s.attack_details.get("target")
            else s.completion
            for s in rows
        ]
        verdicts = judge.judge([s.prompt for s in rows], cut)
        by_prompt = best_of_n([v.harmful for v in verdicts], [s.prompt_id for s in rows])
        out[model] = sum(by_prompt) / max(len(by_prompt), 1)
    return out


def capability_readings(run: Path, models: dict[str, str], suffix_text: str, out: Path) -> dict:
    """Benign loss change against the first model, and compliance on borderline prompts (plain, suffixed)."""
    borderline = [p for p in read_prompts(run / "data" / "safe_eval.jsonl") if p.source == "builtin:borderline"]
    benign = read_records(run / "data" / "benign_eval.jsonl")
    capability = evaluate_models(
        models,
        [],
        [],
        judge="offline",
        benign=benign,
        safe_prompts=borderline,
        max_new_tokens=40,
        batch_size=16,
        out_dir=out / "capability",
    )
    suffixed = [replace(p, text=f"{p.text} {suffix_text}") for p in borderline]
    with_suffix = evaluate_models(
        models,
        [],
        [],
        judge="offline",
        safe_prompts=suffixed,
        max_new_tokens=40,
        batch_size=16,
        out_dir=out / "capability-suffixed",
    )
    return {
        "compliance_on_borderline": {
            m: r["compliance"]["value"] for m, r in capability.metrics["over_refusal"].items()
        },
        "compliance_on_borderline_with_suffix": {
            m: r["compliance"]["value"] for m, r in with_suffix.metrics["over_refusal"].items()
        },
        "benign_loss_change": {m: c.get("value") for m, c in capability.metrics.get("capability_change", {}).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="main-job folder (its data/ split is used)")
    parser.add_argument("--data_dir", required=True, help="folder holding harmbench/ (targets)")
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH; repeat")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=20, help="held-out prompts attacked")
    parser.add_argument(
        "--offset",
        type=int,
        default=0,
        help="skip this many held-out prompts first (a later --out then extends an earlier one's set)",
    )
    parser.add_argument("--steps", type=int, default=100, help="soft-prompt optimisation steps")
    parser.add_argument(
        "--restarts",
        type=int,
        default=1,
        help="attack samples per prompt (restart r > 0 starts from noise around the init); a prompt "
        "counts as broken if any is",
    )
    parser.add_argument("--max_new_tokens", type=int, default=40, help="tokens generated and judged per prompt")
    parser.add_argument(
        "--replay",
        default=None,
        help="a finished --out folder: use its saved soft prompts (same --model names, same prompts) "
        "instead of optimising new ones",
    )
    parser.add_argument(
        "--no_capability",
        action="store_true",
        help="skip the capability readings (benign loss, borderline compliance), e.g. with --replay",
    )
    parser.add_argument("--base", default="embedded", help="base model, for capability")
    parser.add_argument(
        "--suffix_text",
        default=SUFFIX_INIT,
        help="text appended to the borderline prompts for a second compliance reading (default: "
        "lat_positions=suffix's training placeholder text): a model that learned to break on "
        "anything at the attack's slot, not on harmful content, shows it there",
    )
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = dict(m.split("=", 1) for m in args.model)
    prompts = heldout_with_targets(run, args.data_dir, out)[args.offset : args.offset + args.n]
    samples, asr = [], {}
    for name, path in models.items():  # one call per model: a replayed attack reads that model's file
        replay = str(soft_prompt_file(Path(args.replay), name, "embedding")) if args.replay else None
        attack = make_attack("embedding", budget="default", steps=args.steps, restarts=args.restarts, replay=replay)
        result = evaluate_models(
            {name: path},
            prompts,
            [attack, "direct"],
            judge="offline",
            max_new_tokens=args.max_new_tokens,
            batch_size=8,
            out_dir=out,
            attack_budget="cpu",
        )
        samples += result.samples
        for a, per in result.metrics["asr"].items():
            asr.setdefault(a, {}).update({m: r["value"] for m, r in per.items()})
    summary = {
        "n_prompts": len(prompts),
        "offset": args.offset,
        "steps": args.steps,
        "restarts": args.restarts,
        "max_new_tokens": args.max_new_tokens,
        "replayed_from": args.replay,
        "asr": asr,
    }
    for sample in samples:  # the target each embedding sample was attacked towards
        if sample.attack == "embedding":
            sample.attack_details.setdefault("target", next(p.target for p in prompts if p.id == sample.prompt_id))
    summary["asr_embedding_beyond_target"] = beyond_target(
        [s for s in samples if s.attack == "embedding"], make_judge("offline")
    )
    if not args.no_capability:
        summary.update(capability_readings(run, {"base": args.base, **models}, args.suffix_text, out))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
