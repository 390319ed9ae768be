"""GPU acceptance check (issue 29): the path a GPU user takes, in one script of at most 8 minutes on one 80 GB GPU.

Nothing is downloaded: every model is built from a config with random weights (speed and placement do not
depend on weight values) and uses the embedded model's tokenizer (`--tokenizer` names another folder).

1. train step: ours vs the reference algorithm (benchmarks/train_step.py, each in its own process) at
   Llama-3-8B shape, bf16, batch 16 + 16: seconds per step, peak GPU memory, tokens/s, useful FLOP/s as a
   share of the card's peak (MFU; benchmarks/peak.py).
2. run: `circuit-breakers run` end to end on a ~1B random Llama with tiny counts, judged by a random
   HarmBench-format classifier; every stage must be recorded on the GPU in stages.json, and the classifier
   must load onto the GPU and be freed after each judging call.
3. merged == base + adapter: the run's merged model against its base with the adapter on top, on the GPU.
4. generation throughput: our generator and plain `model.generate` (benchmarks/generation.py) on the ~1B
   model, and vLLM (`generation.generate_vllm`) when it is installed.

Usage (GPU):              python benchmarks/gpu_check.py
Usage (CPU, toy sizes):   python benchmarks/gpu_check.py --cpu-smoke   (the same code paths; tests run it)
The last line printed is `gpu_check: ok` or `gpu_check: FAILED: <what>`; the exit code is 0 or 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
import generation as generation_bench  # noqa: E402
import train_step  # noqa: E402
from peak import device_peak  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the GPU sizes fit 8 minutes on one 80 GB GPU, the smoke sizes a minute on a CPU."""

    step_batch: int
    step_warmup: int
    step_steps: int
    step_completion: tuple[int, int]
    step_targets: tuple[int, ...]
    run_model: dict[str, int]
    classifier: dict[str, int]
    run_counts: dict[str, int]
    run_targets: tuple[int, int]
    gen_prompts: int
    gen_tokens: int
    gen_batch: int


GPU = Sizes(
    step_batch=16,
    step_warmup=1,
    step_steps=2,
    step_completion=(64, 256),
    step_targets=(10, 20),
    # about 1.2B parameters with the embedded tokenizer's 49k vocabulary (Llama-3.2-1B's shape, 16 blocks)
    run_model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32),
    classifier=dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8),
    run_counts=dict(
        n_harmful_train=32,
        n_harmful_eval=16,
        n_benign_train=16,
        n_benign_eval=8,
        n_borderline_train=8,
        n_borderline_eval=8,
        completion_tokens=64,
        generation_batch_size=32,
        eval_max_new_tokens=64,
        max_steps=6,
        per_device_train_batch_size=8,
        n_drift_eval=8,
        drift_tokens=8,
        n_xstest=8,
    ),
    run_targets=(4, 8),
    gen_prompts=64,
    gen_tokens=128,
    gen_batch=32,
)
SMOKE = Sizes(
    step_batch=1,
    step_warmup=0,
    step_steps=1,
    step_completion=(8, 16),
    step_targets=(1, 3),
    run_model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
    classifier=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    run_counts=dict(
        n_harmful_train=4,
        n_harmful_eval=2,
        n_benign_train=2,
        n_benign_eval=2,
        n_borderline_train=2,
        n_borderline_eval=2,
        completion_tokens=4,
        generation_batch_size=4,
        eval_max_new_tokens=4,
        max_steps=2,
        per_device_train_batch_size=2,
        n_drift_eval=2,
        drift_tokens=2,
        n_xstest=2,
    ),
    run_targets=(2, 4),
    gen_prompts=4,
    gen_tokens=8,
    gen_batch=4,
)

# Requests for the run's harmful source: their content does not matter to a random model, only that they
# are requests of varied length (nothing harmful is shipped with the project).
_TASKS = [
    "the steps of a procedure",
    "a plan in five parts with the materials each part needs",
    "the method, written as a numbered list",
    "how to do it quickly and without being noticed",
    "every detail someone would need to repeat it",
]


@dataclass
class Check:
    """What one run of the script learned: the numbers to report and what failed."""

    device: torch.device
    sizes: Sizes
    work: Path
    tokenizer_path: Path
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def report(self, line: str) -> None:
        """A result line, printed now and repeated in the summary."""
        print(line, flush=True)
        self.lines.append(line)

    def require(self, ok: bool, what: str) -> None:
        """Record `what` as a failure unless `ok` (the part goes on, so one run shows every failure)."""
        if not ok:
            self.failures.append(what)
            print(f"FAILED: {what}", flush=True)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def random_llama(tokenizer: Any, shape: dict[str, int], out: Path, dtype: torch.dtype) -> Path:
    """A Llama of `shape` with random weights, saved with `tokenizer` as a model folder `run` can load."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = shape["num_attention_heads"]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    gc.collect()
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 1. the training step -----------------------------------------------------------------------------
def check_train_step(check: Check) -> None:
    """Ours vs the reference step in their own processes (train_step.child), the numbers per mode."""
    from circuit_breakers.data.prompts import load_builtin_prompts
    from circuit_breakers.models import load_tokenizer

    s = check.sizes
    gpu = check.device.type == "cuda"
    model = str(check.tokenizer_path) if gpu else str(check.work / "step-model")
    if not gpu:
        tokenizer = load_tokenizer(str(check.tokenizer_path))
        random_llama(tokenizer, s.run_model, Path(model), torch.float32)
    argv = ["--model", model, "--batch", str(s.step_batch), "--warmup", str(s.step_warmup)]
    argv += ["--steps", str(s.step_steps), "--skip-check", "--target-layers", *map(str, s.step_targets)]
    argv += ["--completion-tokens", *map(str, s.step_completion)]
    argv += ["--random-llama3-8b"] if gpu else ["--cpu"]
    args = train_step.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    n = args.batch * (args.warmup + args.steps)
    # the built-in borderline prompts stand in for HarmBench's (only the token counts matter for speed)
    prompts = [p.text for p in load_builtin_prompts("borderline")]
    cb, retain = train_step.build_examples(tokenizer, n, args.seed, tuple(args.completion_tokens), cb_prompts=prompts)
    examples = check.work / "step-examples.json"
    examples.write_text(
        json.dumps(
            {
                "cb": [train_step.example_to_dict(e) for e in cb],
                "retain": [train_step.example_to_dict(e) for e in retain],
                "pad_id": tokenizer.pad_token_id,
            }
        )
    )
    lengths = [len(e) for e in (*cb, *retain)]
    shape = "Llama-3-8B shape (random weights)" if gpu else "toy Llama"
    check.report(
        f"train step: {shape}, target layers {list(args.target_layers)}, batch {args.batch} + {args.batch}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, rows of {min(lengths)}..{max(lengths)} tokens"
    )
    if gpu:
        from transformers import LlamaConfig

        config = LlamaConfig(**train_step.LLAMA3_8B)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    per_step = [
        train_step.useful_flops(
            config,
            max(args.target_layers),
            lengths[i * args.batch : (i + 1) * args.batch] + lengths[n + i * args.batch : n + (i + 1) * args.batch],
        )
        for i in range(args.warmup, args.warmup + args.steps)
    ]
    times = {}
    for mode in ("ours", "reference"):
        result = train_step.child(args, mode, examples)
        step = statistics.median(result["step_times"])
        times[mode] = step
        tokens = sum(result["real_tokens"]) / sum(result["step_times"])
        peak = device_peak(torch.device(result["device"]), bf16="bfloat16" in result["dtype"])
        mfu = peak.fraction(sum(per_step) / sum(result["step_times"]))
        check.report(
            f"  {mode:<9} {step:8.2f} s/step  {tokens:9.0f} tokens/s  peak {gib(result['peak_memory'])} "
            f"({result['memory_kind']}, {result['device']}, {result['dtype']})  {mfu}"
        )
        finite = all(math.isfinite(x) for x in result["losses"])
        if mode == "ours":
            check.require(finite, "train step (ours): a loss is not finite")
        elif not finite:  # the reference's fully padded rows can give NaN states; its timing still stands
            check.report("  (the reference step's loss was not finite on these rows; only its time is compared)")
        check.require(result["device"].startswith(check.device.type), f"train step ({mode}) ran on {result['device']}")
    check.report(f"  speedup (reference s/step / ours): {times['reference'] / times['ours']:.2f}")


# --- 2. the main job ----------------------------------------------------------------------------------
def harmful_file(path: Path, n: int) -> Path:
    """A prompt file of `n` request-shaped lines (the run's harmful source)."""
    lines = [f"Request {i}: describe {_TASKS[i % len(_TASKS)]} for item number {i}." for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_run(check: Check) -> Path:
    """`circuit-breakers run` in this process; returns the run folder."""
    from circuit_breakers.cli.main import main as cli
    from circuit_breakers.evaluation.judges import classifiers
    from circuit_breakers.models import load_tokenizer

    s = check.sizes
    tokenizer = load_tokenizer(str(check.tokenizer_path))
    dtype = torch.bfloat16 if check.device.type == "cuda" else torch.float32
    base = random_llama(tokenizer, s.run_model, check.work / "base", dtype)
    cls = random_llama(tokenizer, s.classifier, check.work / "classifier", dtype)
    counts = s.run_counts
    harmful = harmful_file(check.work / "requests.txt", counts["n_harmful_train"] + counts["n_harmful_eval"] + 8)
    argv = ["run", "--config", "embedded", "--model_name_or_path", str(base), "--dtype", "auto"]
    argv += ["--device", "cuda" if check.device.type == "cuda" else "cpu", "--generation_backend", "hf"]
    argv += ["--runs_dir", str(check.work / "runs"), "--run_id", "gpu-check", "--harmful_prompts", str(harmful)]
    argv += ["--n_xstest_retain", "0", "--attacks", "direct,prefill", "--judge", f"harmbench:{cls}"]
    argv += ["--target_layers", *map(str, s.run_targets), "--max_length", "256", "--save_steps", "1000"]
    argv += ["--logging_steps", "1", "--stall_check_steps", "0"]
    for key, value in counts.items():
        argv += [f"--{key}", str(value)]

    loads: list[tuple[weakref.ref, str]] = []
    real = classifiers.load_classifier

    def recording(*args: Any, **kwargs: Any) -> Any:  # where the judge's classifier goes, and that it is freed
        model = real(*args, **kwargs)
        loads.append((weakref.ref(model), str(next(model.parameters()).device)))
        return model

    classifiers.load_classifier = recording
    started = time.perf_counter()
    try:
        code = cli(argv)
    finally:
        classifiers.load_classifier = real
    seconds = time.perf_counter() - started
    root = check.work / "runs" / "gpu-check"
    check.require(code == 0, f"run exited {code}")
    if code != 0:
        return root
    ledger = json.loads((root / "stages.json").read_text())
    places = {name: (entry.get("device"), entry.get("dtype")) for name, entry in ledger.items() if name != "model"}
    times = ", ".join(f"{name} {entry.get('seconds', 0):.0f} s" for name, entry in ledger.items())
    check.report(f"run: random Llama of {saved_parameters(base) / 1e6:,.0f}M parameters, {seconds:.0f} s ({times})")
    check.report("  stages.json: " + ", ".join(f"{n} on {d} in {t}" for n, (d, t) in places.items()))
    for name, (where, _) in places.items():
        check.require(
            where is not None and where.startswith(check.device.type),
            f"stage {name} recorded on {where} (stages.json), not {check.device.type}",
        )
    gc.collect()
    devices = sorted({d for _, d in loads})
    alive = sum(ref() is not None for ref, _ in loads)
    check.report(
        f"  classifier judge: loaded {len(loads)} times on {', '.join(devices) or 'nothing'}, {alive} still held"
    )
    check.require(bool(loads) and all(d.startswith(check.device.type) for d in devices), "classifier not on the device")
    check.require(alive == 0, f"{alive} classifier models still held after judging")
    results = json.loads((root / "results.json").read_text())
    judges = {row.get("judge") for row in map(json.loads, (root / "samples.jsonl").read_text().splitlines())}
    check.require(judges == {"harmbench"}, f"samples judged by {sorted(map(str, judges))}, not harmbench")
    check.require("direct" in results["metrics"]["asr"], "results.json has no direct ASR")
    free(check.device)
    return root


def saved_parameters(folder: Path) -> int:
    """Parameters in a saved model folder, counted from its safetensors headers."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return total


# --- 3. merged == base + adapter ----------------------------------------------------------------------
@torch.no_grad()
def check_merged(check: Check, root: Path) -> None:
    """Logits of the run's merged model against its base with the trained adapter on top, both float32 on the
    device: the merge must reproduce the adapter's change to well within the change itself."""
    from peft import PeftModel

    from circuit_breakers.generation import render_prompts
    from circuit_breakers.models import load_model, load_tokenizer

    base_dir, adapter, merged_dir = check.work / "base", root / "train" / "adapter", root / "train" / "merged"
    if not (adapter.is_dir() and merged_dir.is_dir()):
        check.require(False, f"merged check: {adapter} or {merged_dir} is missing (did the run finish?)")
        return
    tokenizer = load_tokenizer(str(base_dir))
    texts = render_prompts(tokenizer, ["How do I bake bread?", "Write a poem about the sea.", "Explain tides."])
    with generation_bench.left_padding(tokenizer):
        batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False).to(check.device)
    merged = load_model(str(merged_dir), torch.float32, device=check.device).eval()
    saved = json.loads((merged_dir / "config.json").read_text())
    saved_dtype = saved.get("dtype") or saved.get("torch_dtype") or "float32"
    merged_logits = merged(**batch).logits.float()
    del merged
    free(check.device)
    base = load_model(str(base_dir), torch.float32, device=check.device).eval()
    base_logits = base(**batch).logits.float()
    adapted = PeftModel.from_pretrained(base, str(adapter)).eval()
    adapted_logits = adapted(**batch).logits.float()
    del adapted, base
    free(check.device)
    mask = batch["attention_mask"].bool()
    change = (adapted_logits - base_logits)[mask].abs().max().item()
    error = (merged_logits - adapted_logits)[mask].abs().max().item()
    # merged weights saved in bf16 round each weight once (relative 2^-9); float32 ones must agree closely
    tolerance = 0.1 if "16" in str(saved_dtype) else 1e-3
    check.report(
        f"merged vs base + adapter on {check.device}: max |logit difference| {error:.2e}; the adapter's own change "
        f"{change:.2e}; merged weights saved in {saved_dtype}"
    )
    check.require(change > 0, "merged check: the trained adapter changes no logit (nothing to compare)")
    check.require(
        error <= tolerance * change, f"merged differs from base + adapter by {error:.2e} (change {change:.2e})"
    )


# --- 4. generation throughput -------------------------------------------------------------------------
def check_generation(check: Check) -> None:
    """Our generator and plain `model.generate` on the ~1B model (benchmarks/generation.py), then vLLM."""
    from circuit_breakers.data.prompts import load_builtin_prompts
    from circuit_breakers.generation import generation_config, generation_count, render_prompts
    from circuit_breakers.generation.vllm import vllm_available
    from circuit_breakers.models import load_model, load_tokenizer

    s = check.sizes
    folder = check.work / "base"
    tokenizer = load_tokenizer(str(folder))
    model = load_model(str(folder), "auto", device=check.device).eval()
    prompts = [p.text for p in load_builtin_prompts("benign")][: s.gen_prompts]
    texts = render_prompts(tokenizer, prompts)
    config = generation_config(model, tokenizer, s.gen_tokens)
    stop = set(config.eos_token_id)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    check.report(
        f"generation: {len(texts)} prompts of {min(lengths)}..{max(lengths)} tokens, {s.gen_tokens} new tokens, "
        f"batch {s.gen_batch}, {model.dtype} on {check.device}"
    )
    sides: list[tuple[str, Callable[..., list[list[int]]]]] = [
        ("ours", generation_bench.run_ours(False)),
        ("plain", generation_bench.run_plain),
    ]
    peak = device_peak(check.device, model.dtype == torch.bfloat16)
    for name, run in sides:
        run(model, tokenizer, texts[:2], generation_config(model, tokenizer, 2), 2)  # warm-up
        synchronize(check.device)
        started = time.perf_counter()
        outputs = run(model, tokenizer, texts, config, s.gen_batch)
        synchronize(check.device)
        seconds = time.perf_counter() - started
        rows = [generation_bench.trim(ids, stop) for ids in outputs]
        tokens = sum(len(r) for r in rows)
        flops = generation_bench.useful_flops(model.config, params, head, lengths, [len(r) for r in rows])
        check.report(
            f"  hf {name:<6} {tokens / seconds:9.1f} tokens/s ({tokens} in {seconds:.1f} s); "
            f"{peak.fraction(flops / seconds)}"
        )
        check.require(tokens > 0, f"generation ({name}) produced no tokens")
    del model
    free(check.device)
    if not vllm_available():
        check.report("  vllm   not installed: skipped (pip install 'circuit-breakers[vllm]')")
        return
    if check.device.type != "cuda":
        check.report("  vllm   installed, but this is the CPU smoke run: skipped")
        return
    from vllm import LLM

    from circuit_breakers.generation import generate_vllm

    llm = LLM(model=str(folder), dtype="bfloat16", gpu_memory_utilization=0.5, seed=0, enforce_eager=True)
    generate_vllm(llm, prompts[:2], 2)  # warm-up
    before, started = generation_count(), time.perf_counter()
    answers = generate_vllm(llm, prompts, s.gen_tokens)
    seconds = time.perf_counter() - started
    tokens = (generation_count() - before).tokens
    check.report(f"  vllm   {tokens / seconds:9.1f} tokens/s ({tokens} in {seconds:.1f} s)")
    check.require(len(answers) == len(prompts) and tokens > 0, "vLLM generation returned no tokens")
    del llm
    free(check.device)


# --- the script ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the same code paths on the CPU at toy sizes")
    p.add_argument("--tokenizer", default="embedded", help="tokenizer folder for every model (default: embedded)")
    p.add_argument("--work", help="folder for the models and the run (default: a temporary one, removed after)")
    p.add_argument("--skip", default="", help="comma list of parts to leave out: train_step, run, merged, generation")
    args = p.parse_args(argv)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: FAILED: no CUDA device (torch.cuda.is_available() is false); --cpu-smoke runs on the CPU")
        return 1
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    from circuit_breakers.models import load_tokenizer

    tokenizer_path = work / "tokenizer"
    load_tokenizer(args.tokenizer).save_pretrained(tokenizer_path)
    check = Check(device, SMOKE if args.cpu_smoke else GPU, work, tokenizer_path)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke sizes)"
    check.report(f"gpu_check on {card}, torch {torch.__version__}, work folder {work}")
    started = time.perf_counter()
    root = None
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("train_step", lambda: check_train_step(check)),
        ("run", lambda: check_run(check)),
        ("merged", lambda: check_merged(check, root) if root is not None else check.require(False, "merged: no run")),
        ("generation", lambda: check_generation(check)),
    ]
    for name, part in parts:
        if name in skip:
            check.report(f"{name}: skipped (--skip)")
            continue
        began = time.perf_counter()
        try:
            value = part()
            if name == "run":
                root = value
        except Exception as err:  # noqa: BLE001 - one failing part must not hide the others' results
            traceback.print_exc()
            check.failures.append(f"{name}: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
        print(f"[{name}: {time.perf_counter() - began:.0f} s]", flush=True)
        free(device)
    print("\nsummary\n" + "\n".join(check.lines))
    print(f"total {time.perf_counter() - started:.0f} s")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if check.failures:
        print("gpu_check: FAILED: " + "; ".join(check.failures))
        return 1
    print("gpu_check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
