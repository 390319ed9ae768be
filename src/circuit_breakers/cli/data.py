"""`data`: inspect a records file as training renders it, or generate a model's own completions."""

from __future__ import annotations

import argparse

from .console import console


def data_command(argv: list[str]) -> int:
    """data inspect FILE | data generate --model M --prompts FILE --out OUT: masks and self-generated data"""
    parser = argparse.ArgumentParser(prog="circuit-breakers data")
    sub = parser.add_subparsers(dest="action", required=True)
    inspect_p = sub.add_parser("inspect", help="render a records file as training would and show its masks")
    inspect_p.add_argument("path")
    inspect_p.add_argument(
        "--model", default="embedded", help="model whose tokenizer and chat template render the data"
    )
    inspect_p.add_argument(
        "--mask_mode", default="completion", choices=["completion", "full", "completion_plus_last_prompt_tokens"]
    )
    inspect_p.add_argument("--max_length", type=int, default=512)
    gen = sub.add_parser("generate", help="the model's own completions for a prompt file (resumable JSONL)")
    gen.add_argument("--model", default="embedded")
    gen.add_argument(
        "--prompts", required=True, help="prompt file (json/jsonl/csv/txt) or builtin:benign / builtin:borderline"
    )
    gen.add_argument("--out", required=True)
    gen.add_argument("--kind", default="circuit_breaker", choices=["circuit_breaker", "retain", "refusal_retain"])
    gen.add_argument("--max_new_tokens", type=int, default=256)
    gen.add_argument("--batch_size", type=int, default=8)
    gen.add_argument("--prefill", help="assistant prefix: `target` (each prompt's HarmBench target) or literal text")
    gen.add_argument("--system_prompt")
    gen.add_argument(
        "--refusal_retain", action="store_true", help="keep only the model's refusals (raw output beside OUT)"
    )
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
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        prefill=prefill,
        system_prompt=args.system_prompt,
    )
    if args.refusal_retain:
        records = g.generate_refusal_retain(model, tokenizer, prompts, args.out, **kwargs)
    else:
        records = g.generate_completions(model, tokenizer, prompts, args.out, kind=args.kind, **kwargs)
    console.print(f"[bold green]{len(records)} records[/] in {args.out}")
    return 0
