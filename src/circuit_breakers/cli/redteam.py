"""`redteam`: the red-team suite against base and defended models in one command (experiments/redteam.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .console import console


def _numbers(value: str | None, kind: type, flag: str) -> list | None:
    if value is None:
        return None
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        example = "0,10,25" if kind is int else "1,0.5,0"
        raise ValueError(f"--{flag} {value!r}: expected comma-separated {kind.__name__}s such as {example}") from None


def redteam_command(argv: list[str]) -> int:
    """redteam --model base=PATH --model cb=PATH [--model rr_lat=PATH] --suite cpu|default|paper --out DIR"""
    parser = argparse.ArgumentParser(
        prog="circuit-breakers redteam",
        description="Run the red-team suite (text attacks, refusal-direction orthogonalisation, interpolation to "
        "the base, top-k delta, fine-tuning) on identical held-out prompts, judged by one judge; write "
        "results.json, samples.jsonl and report.html (table with intervals and paired differences, curves). "
        "Finished cells in --out are reused.",
    )
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH (or PATH); the first is the base")
    parser.add_argument("--suite", default="cpu", help="cpu, default or paper (experiments/redteam.py SUITES)")
    parser.add_argument("--attacks", help="comma-separated attacks in place of the suite's (text and tamper names)")
    parser.add_argument(
        "--judge", default="offline", help="NAME[:MODEL]: offline, refusal, harmbench, llamaguard, openai"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", help="held-out harmful prompts: a prompt file (CSV / JSON / JSONL / TXT)")
    source.add_argument("--benchmark", action="append", help="NAME[:PATH], as for eval; repeat. Default: harmbench")
    parser.add_argument("--limit", type=int, help="prompts in all (a seeded subset; default: the suite's)")
    parser.add_argument("--data_dir", help="data folder laid out like ../shared/data (or $CIRCUIT_BREAKERS_DATA)")
    parser.add_argument(
        "--run", help="main-job run folder: its data/circuit_breaker.jsonl feeds the fine-tuning attack"
    )
    parser.add_argument("--finetune_data", help="records JSONL of harmful completions for the fine-tuning attack")
    parser.add_argument("--benign", help="records JSONL of benign answers: the fine-tuning attack's capability cost")
    parser.add_argument(
        "--probe",
        action="append",
        help="NAME=PROBE_DIR or auto (MODEL_DIR/probe): probe obfuscation against that model's guard probe; repeat",
    )
    parser.add_argument("--finetune_steps", help="comma-separated checkpoint steps (default: the suite's)")
    parser.add_argument("--fractions", help="comma-separated interpolation fractions (default: the suite's)")
    parser.add_argument("--ranks", help="comma-separated top-k ranks (default: the suite's)")
    parser.add_argument("--max_new_tokens", type=int, help="default: the suite's")
    parser.add_argument("--out", required=True, help="output folder (finished cells are reused when re-run)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="float32 is advised for the fine-tuning attack on CPU")
    parser.add_argument("--device", help="e.g. cuda:0 (default: where the model loads)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    from ..config import check_output_folder
    from ..experiments.redteam import check_model_source, resolve_suite

    overrides = {
        "finetune_steps": _numbers(args.finetune_steps, int, "finetune_steps"),
        "interpolation": _numbers(args.fractions, float, "fractions"),
        "top_k": _numbers(args.ranks, int, "ranks"),
        "max_new_tokens": args.max_new_tokens,
        "n_prompts": args.limit,
    }
    attacks = args.attacks.split(",") if args.attacks is not None else None
    suite = resolve_suite(args.suite, attacks, **{k: v for k, v in overrides.items() if v is not None})
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    from ..evaluation.suite import judge_spec, model_specs

    models = model_specs(args.model)
    for name, spec in models.items():
        check_model_source(name, spec)
    judge, judge_options = judge_spec(args.judge)
    check_output_folder(args.out, "--out")
    probes = {}
    if args.probe:
        from ..guard.redteam import probe_folders

        probes = probe_folders(args.probe, models)
    if args.run and args.finetune_data:
        raise ValueError("give --run RUN_DIR or --finetune_data FILE, not both")
    records_path = Path(args.run) / "data" / "circuit_breaker.jsonl" if args.run else args.finetune_data
    if args.run and not Path(records_path).is_file():
        raise FileNotFoundError(f"--run {args.run}: no data/circuit_breaker.jsonl (not a main-job run folder)")

    from ..data.benchmarks import subsample
    from ..data.loaders import load_prompt_file
    from ..data.records import read_records
    from ..evaluation.redteam_report import add_section, redteam_html
    from ..evaluation.report import write_results
    from ..evaluation.suite import load_suite
    from ..evaluation.tables import text_table
    from ..experiments.redteam import run_redteam

    if args.prompts:
        prompts = subsample(load_prompt_file(args.prompts), suite.n_prompts, args.seed)
        sources = {"prompts": args.prompts}
    else:
        loaded = load_suite(args.benchmark or ["harmbench"], None, args.seed, args.data_dir)
        prompts, sources = subsample(loaded.harmful, suite.n_prompts, args.seed), loaded.sources
    records = read_records(records_path) if records_path else None
    benign = read_records(args.benign) if args.benign else None
    red = run_redteam(
        models,
        prompts,
        suite,
        args.out,
        judge=judge,
        judge_options=judge_options,
        finetune_records=records,
        benign=benign,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
    )
    extra = red.to_dict()
    if probes:
        from ..guard.redteam import run_probe_obfuscation

        dtype = "float32" if args.dtype == "auto" else args.dtype
        extra["probe_obfuscation"] = run_probe_obfuscation(
            models, probes, prompts, suite, args.out, dtype, args.device, args.seed
        )
    config = {"command": ["redteam", *argv], "arguments": vars(args), "benchmark_sources": sources}
    out = Path(args.out)
    doc = write_results(red.result, out, config, extra={"redteam": extra})
    add_section(out / "report.html", redteam_html(doc["redteam"], list(models)))
    rows = [[row["attack"], *(_short(row["cells"].get(m)) for m in models)] for row in doc["redteam"]["table"]]
    print(text_table(["attack", *models], rows))
    for error in red.result.errors:
        console.print(f"[red]failed[/] {error['model']} / {error['cell']}: {error['error']}")
    console.print(f"[bold green]report[/] {out / 'report.html'}")
    return 1 if red.result.errors else 0


def _short(entry: dict | None) -> str:
    if entry is None:
        return "-"
    asr = entry["asr"]
    text = f"{100 * asr['value']:.0f}% [{100 * asr['low']:.0f}-{100 * asr['high']:.0f}]"
    if entry.get("vs_base"):
        text += f" {100 * entry['vs_base']['difference']:+.0f}pp"
    return text
