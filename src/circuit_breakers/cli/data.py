"""`data`: inspect a records file as training renders it, or generate a model's own completions."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .console import console

logger = logging.getLogger("circuit_breakers")


def add_device_arguments(parser: argparse.ArgumentParser, dtype: str = "auto") -> None:
    """--device and --dtype, as every command that loads a model outside a recipe takes them."""
    from ..config import DEVICE_HELP, DTYPE_HELP

    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default=dtype, help=DTYPE_HELP if dtype == "auto" else f"{DTYPE_HELP}; here {dtype}")


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """--generation_backend, as `data generate` and `eval` take it (the recipe key `generation_backend`)."""
    from ..config import GENERATION_BACKENDS, RunConfig

    help_text = RunConfig.__dataclass_fields__["generation_backend"].metadata["help"]
    parser.add_argument("--generation_backend", default="auto", choices=GENERATION_BACKENDS, help=help_text)


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
    gen.add_argument(
        "--keep_refusals",
        action="store_true",
        help="--kind circuit_breaker: keep completions that refuse (by default dropped, as the main job's data "
        "stage drops them: rerouting a refusal teaches the model to break it); every completion stays in OUT.raw.jsonl",
    )
    add_device_arguments(gen)
    add_backend_argument(gen)
    args = parser.parse_args(argv)
    if args.action == "inspect":
        from ..data.report import inspect

        inspect(args.path, args.model, args.mask_mode, args.max_length)
        return 0
    from ..data import generate as g
    from ..data.loaders import load_prompt_file
    from ..data.records import write_records
    from ..generation.vllm import load_generator, resolve_backend
    from ..models import placement

    where = placement(args.device, args.dtype)  # a device that is not there: stop before reading anything
    backend = resolve_backend(args.generation_backend, where["device"])  # so does vllm asked for without vLLM installed
    prompts = load_prompt_file(args.prompts)
    model, tokenizer = load_generator(args.model, backend, args.dtype, args.device)
    prefill = g.target_prefill if args.prefill == "target" else args.prefill
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        prefill=prefill,
        system_prompt=args.system_prompt,
    )
    if args.refusal_retain:
        records = g.generate_refusal_retain(model, tokenizer, prompts, args.out, **kwargs)
    elif args.kind == "circuit_breaker" and not args.keep_refusals:
        out = Path(args.out)
        raw = out.with_name(out.stem + ".raw" + (out.suffix or ".jsonl"))  # every generation, for resuming
        generated = g.generate_completions(model, tokenizer, prompts, raw, kind=args.kind, **kwargs)
        records, refusing = g.split_refusals(generated)
        write_records(records, out)
        logger.info(
            "dropped %d of %d completions that refuse (all in %s; --keep_refusals keeps them)",
            len(refusing),
            len(generated),
            raw,
        )
    else:
        records = g.generate_completions(model, tokenizer, prompts, args.out, kind=args.kind, **kwargs)
    console.print(f"[bold green]{len(records)} records[/] in {args.out}")
    return 0
