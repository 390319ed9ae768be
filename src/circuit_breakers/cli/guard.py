"""`probe` and `serve`: train a harmfulness probe, and serve a model behind it (OpenAI-compatible)."""

from __future__ import annotations

import argparse
import json
import os

from .console import console
from .data import add_device_arguments

API_KEY_ENV = "CIRCUIT_BREAKERS_API_KEY"


def probe_command(argv: list[str]) -> int:
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
    add_device_arguments(fit, dtype="float32")
    args = parser.parse_args(argv)
    from ..data.records import read_records
    from ..guard.probes import train_probe_for_model
    from ..models import placement

    placement(args.device, args.dtype)  # a device that is not there: stop before reading anything

    harmful = [r for path in args.harmful.split(",") for r in read_records(path)]
    benign = [r for path in args.benign.split(",") for r in read_records(path)]
    out, report = train_probe_for_model(
        args.model,
        harmful,
        benign,
        args.out,
        args.layer,
        args.kind,
        args.target_fpr,
        args.epochs,
        args.lr,
        args.batch_size,
        args.max_length,
        args.seed,
        args.window,
        device=args.device,
        dtype=args.dtype,
    )
    console.print_json(json.dumps(report))
    console.print(f"[bold green]probe[/] {out}")
    return 0


def serve_command(argv: list[str]) -> int:
    """serve --model M [--adapter A] [--probe DIR]: OpenAI-compatible chat completions with a probe guard"""
    parser = argparse.ArgumentParser(prog="circuit-breakers serve")
    parser.add_argument("--model", default="embedded", help="base or merged model (hub id, folder, embedded)")
    parser.add_argument("--adapter", help="a LoRA adapter folder to apply on top of --model")
    parser.add_argument("--probe", default="auto", help="probe folder; auto: MODEL/probe if it exists; none: no guard")
    parser.add_argument("--name", help="model name the API reports (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    add_device_arguments(parser)
    parser.add_argument("--max_queue", type=int, default=8, help="requests waiting or running; more get HTTP 429")
    parser.add_argument("--max_time", type=float, default=60.0, help="seconds one generation may take")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--refusal", default=None, help="text that replaces a halted answer")
    parser.add_argument(
        "--max_body_bytes", type=int, default=1_048_576, help="larger request bodies get HTTP 413 (default 1 MiB)"
    )
    parser.add_argument(
        "--max_prompt_tokens", type=int, default=4096, help="longer prompts get HTTP 400 before they reach the model"
    )
    parser.add_argument(
        "--api_key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' (HTTP 401 without it); default: ${API_KEY_ENV}, else none",
    )
    args = parser.parse_args(argv)
    for name in ("max_queue", "max_new_tokens", "max_body_bytes", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.max_time > 0:  # also NaN
        raise ValueError(f"--max_time must be a positive number of seconds, got {args.max_time}")
    from ..guard.probes import Probe, find_probe
    from ..guard.server import DEFAULT_REFUSAL, GuardedGenerator, load_served_model, run_server

    model, tokenizer = load_served_model(args.model, args.adapter, args.dtype, args.device)
    probe_dir = find_probe(args.model, args.probe)
    probe = Probe.load(probe_dir) if probe_dir is not None else None
    console.print(f"[bold]guard[/] {probe_dir if probe else 'none'}")
    generator = GuardedGenerator(
        model,
        tokenizer,
        probe,
        args.refusal or DEFAULT_REFUSAL,
        args.max_time,
        args.max_new_tokens,
        args.max_prompt_tokens,
    )
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[bold yellow]warning[/] {args.host} is reachable by others and no --api_key is set")
    run_server(
        generator,
        args.name or args.model,
        args.host,
        args.port,
        args.max_queue,
        args.max_body_bytes,
        args.api_key,
    )
    return 0
