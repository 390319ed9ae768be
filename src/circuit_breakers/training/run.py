"""Training as explicit stages: set up the model, build the data, train, save adapter and merged model."""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapters import (
    add_lora,
    choose_lora_targets,
    export_merged,
    load_trainable_adapter,
    lora_summary,
    write_model_card,
)
from ..config import CircuitBreakerConfig, ConfigError, DataConfig, ModelConfig
from ..data.batching import PairedCollator, PairedDataset
from ..data.records import DataError, Record, iter_jsonl, read_records
from ..data.render import DropRow, RenderResult, render, render_all
from ..data.report import mask_report, print_mask_report, save_mask_report
from ..fileio import STAGING_PREFIX, replace_dir, umask_permissions, write_jsonl_atomic, write_text_atomic
from ..locks import folder_lock
from ..models import (
    ModelError,
    default_target_layers,
    find_decoder_layers,
    load_model_and_tokenizer,
    num_layers,
    resolve_device,
    resolve_dtype,
    set_layer_path,
    truncate_layers,
    validate_layers,
)
from .base import CheckpointError, last_checkpoint
from .callbacks import TrainingDiverged
from .trainer import CircuitBreakerTrainer, resolve_retain_layers

logger = logging.getLogger("circuit_breakers")


@dataclass
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    summary: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)


def layer_plan(
    n_layers: int, cb_cfg: CircuitBreakerConfig, model_cfg: ModelConfig
) -> tuple[list[int], list[int], list[int]]:
    """(target layers, retain layers, LoRA blocks), validated against the model's depth.

    LoRA goes on blocks 0..max(target)-1: exactly the blocks that produce hidden_states[max(target)].
    """
    target = validate_layers(cb_cfg.target_layers or default_target_layers(n_layers), n_layers)
    retain = validate_layers(resolve_retain_layers(cb_cfg.retain_layers, target), n_layers, "retain_layers")
    if cb_cfg.lat_epsilon > 0 and not cb_cfg.lat_layer < max(target):  # the recipe check cannot see default targets
        raise ConfigError(
            f"lat_layer {cb_cfg.lat_layer} must lie below the deepest target layer {max(target)} (target layers "
            f"{target} of this {n_layers}-layer model); lower lat_layer or set target_layers"
        )
    if cb_cfg.truncate_layers and max(retain) > max(target):
        raise ModelError(
            f"retain_layers {[i for i in retain if i > max(target)]} lie above the deepest target layer "
            f"({max(target)}), which training cuts the model at: set truncate_layers: false to keep them"
        )
    blocks = model_cfg.layers_to_transform
    if blocks is None:
        blocks = list(range(max(target)))
    bad = [b for b in blocks if not 0 <= b < n_layers]
    if bad:
        raise ValueError(f"layers_to_transform {bad} out of range 0..{n_layers - 1}")
    return target, retain, sorted(set(blocks))


def setup_model(
    model_cfg: ModelConfig, cb_cfg: CircuitBreakerConfig
) -> tuple[PeftModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load, plan layers, truncate above the deepest target, add LoRA. Returns model, tokenizer, plan."""
    set_seed(cb_cfg.seed)
    model, tokenizer = load_model_and_tokenizer(  # on the CPU; the Trainer moves it to its device
        model_cfg.model_name_or_path, resolve_dtype(model_cfg.dtype, cb_cfg.device), model_cfg.trust_remote_code
    )
    if model_cfg.layers_path:
        set_layer_path(model, model_cfg.layers_path)
    n = num_layers(model)
    target, retain, blocks = layer_plan(n, cb_cfg, model_cfg)
    if cb_cfg.truncate_layers:
        truncate_layers(model, max(target))
    model.config.use_cache = False
    if cb_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    left_out: dict[str, list[str]] = {}
    if model_cfg.init_adapter:
        peft_model, blocks = load_trainable_adapter(model, model_cfg.init_adapter, len(find_decoder_layers(model)))
    else:
        targets = choose_lora_targets(model, model_cfg, blocks)
        peft_model, left_out = add_lora(model, model_cfg, blocks, targets), targets.left_out
    plan = {
        "num_layers": n,
        "target_layers": target,
        "retain_layers": retain,
        "lora_blocks": blocks,
        "trained_layers": max(target) if cb_cfg.truncate_layers else n,
        "lora": lora_summary(peft_model, left_out),  # which modules got LoRA, which not and why
    }
    return peft_model, tokenizer, plan


def load_sets(data_cfg: DataConfig) -> tuple[list[Record], list[Record]]:
    """The circuit-breaker and retain records named in the recipe."""
    if not data_cfg.cb_data or not data_cfg.retain_data:
        raise DataError("training needs cb_data and retain_data (JSONL files of chat `messages`)")
    return read_records(data_cfg.cb_data, "circuit_breaker"), read_records(data_cfg.retain_data)


# --- bad rows: stop at the first one, naming where it is (bad_rows=error) ---------------------------
_DROP_REASONS = {
    "empty_completion": "empty completion (the assistant turn has no text)",
    "completion_not_found": "the chat template does not render the completion as written",
    "tool_calls_not_rendered": "the chat template does not write this row's tool calls",
    "too_long": "max_length is too small to hold a prompt and a completion",
    "tool_call_mask": "the tool call would not be inside the loss mask",
    "special_token": "a message holds the text of the tokenizer's special tokens, which would act as control "
    "tokens and could forge a turn",
}


def read_labelled(path: str | Path, kind: Any = None) -> list[tuple[str, Record]]:
    """Records of a JSONL file, each with its `file:line` label; a bad line raises DataError naming it."""
    out = []
    for number, row in iter_jsonl(path):
        try:
            out.append((f"{path}:{number}", Record.from_dict(row, kind)))
        except (DataError, TypeError, ValueError) as err:
            raise DataError(f"{path}:{number}: {err}") from err
    return out


def render_checked(
    tokenizer: PreTrainedTokenizerBase, labelled: Sequence[tuple[str, Record]], mask_mode: str, data_cfg: DataConfig
) -> RenderResult:
    """Render every record. bad_rows=skip: as `render_all` (bad rows dropped and counted, long ones cut).
    bad_rows=error: the first row that would be dropped, or whose completion would be cut, raises
    DataError with its label, so nothing is silently lost from training."""
    records = [record for _, record in labelled]
    if data_cfg.bad_rows == "skip":
        return render_all(tokenizer, records, mask_mode, data_cfg.max_length, data_cfg.mask_prompt_tokens)
    render_all(tokenizer, [], mask_mode, data_cfg.max_length)  # validates mode and tokenizer
    result = RenderResult(dropped=Counter())
    hint = "fix the row, or set bad_rows: skip to drop such rows"
    for label, record in labelled:
        try:
            example = render(tokenizer, record, mask_mode, data_cfg.max_length, data_cfg.mask_prompt_tokens)
        except DropRow as drop:
            detail = str(drop).partition(": ")[2]  # DropRow(reason, detail) reads "reason: detail"
            what = _DROP_REASONS.get(drop.reason, drop.reason) + (f" ({detail})" if detail else "")
            raise DataError(f"{label}: {what}; {hint}") from drop
        except (DataError, ValueError, TypeError, KeyError, AttributeError, TemplateError) as err:
            raise DataError(f"{label}: the chat template cannot render this row ({err}); {hint}") from err
        kept = example.completion_end - example.completion_start
        if example.full_completion_length and kept < example.full_completion_length:
            raise DataError(
                f"{label}: completion is {example.full_completion_length} tokens, longer than max_length "
                f"{data_cfg.max_length} leaves for it ({kept}); raise max_length, or set bad_rows: skip to truncate it"
            )
        result.truncated += example.truncated
        result.examples.append(example)
    return result


# --- the output directory: one run per folder -----------------------------------------------------
RUN_FILE = "training_run.json"
"""Written at the start of a run: the settings and data that define it, so a different run is not
mixed into (or resumed from) this folder."""
_RUN_ARTIFACTS = ("adapter", "merged", "summary.json", "train_log.jsonl", "mask_report.json", RUN_FILE)
_TRAJECTORY_KEYS = (
    "learning_rate",
    "max_steps",
    "num_train_epochs",
    "seed",
    "data_seed",
    "optim",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "bf16",
    "fp16",
    "train_sampling_strategy",
)
_OPERATIONAL_KEYS = (
    "overwrite_output_dir",
    "merge",
    "stall_check_steps",
    "stall_margin",
    "output_dir",
    "max_chunk_tokens",
)  # chunks change memory, not the gradient: a run may resume with others


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _digest(records: Sequence[Record]) -> str:
    """Short hash of the records' content. Not `fileio.digest`: that hashes other bytes, and every run folder
    written so far records this one in training_run.json (a new value would make each look like another run)."""
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(record.to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def run_identity(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    cb_cfg: CircuitBreakerConfig,
    cb_records: Sequence[Record],
    retain_records: Sequence[Record],
) -> dict[str, Any]:
    """Everything that changes the trained weights: model and LoRA settings, data settings and the
    data's content, the optimiser and schedule, the global batch. Paths, logging and saving do not."""
    own = {f.name for f in fields(CircuitBreakerConfig)} - {f.name for f in fields(TrainingArguments)}
    train_keys = sorted((own - set(_OPERATIONAL_KEYS)) | set(_TRAJECTORY_KEYS))
    identity = {
        "model": {k: v for k, v in asdict(model_cfg).items() if k != "device"},  # where it ran, not what
        "data": {k: v for k, v in asdict(data_cfg).items() if k not in ("cb_data", "retain_data")},
        "data content": {"circuit_breaker": _digest(cb_records), "retain": _digest(retain_records)},
        "train": {k: _plain(getattr(cb_cfg, k, None)) for k in train_keys},
        "global batch": cb_cfg.per_device_train_batch_size * cb_cfg.gradient_accumulation_steps * cb_cfg.world_size,
    }
    return json.loads(json.dumps(identity, default=str))


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def _field_defaults() -> dict[str, dict[str, Any]]:
    """The default of every field, per identity section (to recognise a setting added after a run)."""

    def defaults(cls: type) -> dict[str, Any]:
        return {f.name: _plain(f.default) for f in fields(cls) if f.default is not dataclasses.MISSING}

    return {"model": defaults(ModelConfig), "data": defaults(DataConfig), "train": defaults(CircuitBreakerConfig)}


def with_new_defaults(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` plus the settings it lacks that `new` holds at their default: a knob added by a later version,
    left at the default that reproduces the old behaviour, is not a different run."""
    merged = json.loads(json.dumps(old))
    for section, known in _field_defaults().items():
        if not isinstance(merged.get(section), dict) or not isinstance(new.get(section), dict):
            continue
        for key, value in new[section].items():
            if key not in merged[section] and key in known and json.loads(json.dumps(known[key], default=str)) == value:
                merged[section][key] = value
    return merged


def check_output_dir(out: Path, identity: dict[str, Any], overwrite: bool) -> bool:
    """Raise ConfigError if `out` holds a different run and `overwrite` is off. Returns whether the
    folder's earlier run must be cleared (a different run, with overwrite on). Reads only."""
    if not out.is_dir():
        return False
    has_run = any(p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") for p in out.iterdir()) or (out / "adapter").is_dir()
    if not has_run:  # nothing trained here yet (an empty folder, or a run stopped by bad input)
        return False
    recorded = out / RUN_FILE
    if recorded.is_file():
        try:
            old = json.loads(recorded.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            old = with_new_defaults(old, identity)
        if old == identity:
            return False
        diffs = _differences(old, identity) if isinstance(old, dict) else ["unreadable " + RUN_FILE]
        what = f"a different run ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''})"
    else:
        what = f"a run without {RUN_FILE} (made elsewhere or by an older version)"
    if overwrite:
        return True
    raise ConfigError(
        f"{out} already holds {what}; choose another --output_dir, or pass --overwrite_output_dir true to replace it"
    )


def claim_output_dir(out: Path, identity: dict[str, Any], clear: bool) -> None:
    """Main process only: delete the earlier run's files if asked (only files this package writes), and
    record this run's identity."""
    out.mkdir(parents=True, exist_ok=True)
    if clear:
        for path in out.iterdir():
            if path.name.startswith((f"{PREFIX_CHECKPOINT_DIR}-", STAGING_PREFIX)) or path.name in _RUN_ARTIFACTS:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.warning("overwrite_output_dir: replaced the earlier run in %s", out)
    write_text_atomic(out / RUN_FILE, json.dumps(identity, indent=2))


def export_adapter(
    trainer: CircuitBreakerTrainer, model: PeftModel, adapter_dir: Path, card: dict[str, Any], base_model: str
) -> None:
    """Gather the (possibly sharded) LoRA weights on every process, write them on the main one.

    The state dict comes from accelerate, which all-gathers FSDP shards and consolidates ZeRO-3
    partitions; a process-local `state_dict()` there would hold shards or empty placeholders.
    The folder is written under a temporary name and renamed when complete.
    """
    target = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model_wrapped
    state_dict = trainer.accelerator.get_state_dict(target)
    if not trainer.is_world_process_zero():
        return
    staging = adapter_dir.with_name(f"{STAGING_PREFIX}{adapter_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True, save_embedding_layers=False)
        write_model_card(staging, base_model, card)
        _check_adapter(staging, trainer.checkpoint_note())
        umask_permissions(staging)
        replace_dir(staging, adapter_dir)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(err, OSError):
            raise
        last = last_checkpoint(adapter_dir.parent)
        reason = f"disk full ({err.filename or adapter_dir})" if err.errno == errno.ENOSPC else str(err)
        raise CheckpointError(
            f"could not write {adapter_dir}: {reason}; the last checkpoint {last or '(none)'} is intact. "
            "Free space, then rerun with --resume_from_checkpoint last to export it"
        ) from err


def _check_adapter(adapter_dir: Path, checkpoint_note: str = "") -> None:
    """An exported adapter must hold real tensors: empty ones mean sharded weights were not gathered,
    non-finite ones that training diverged (TrainingDiverged: such an adapter is never exported)."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    if not tensors:
        raise CheckpointError(
            "exported adapter holds no LoRA weights: no name in the trained model's state dict matched the adapter's"
        )
    empty = [k for k, t in tensors.items() if t.numel() == 0]
    if empty:
        raise CheckpointError(f"exported adapter has empty tensors ({empty[:3]}): sharded weights were not gathered")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingDiverged(
            f"the trained adapter holds non-finite values (NaN or inf) in {len(bad)} of {len(tensors)} tensors "
            f"(e.g. {bad[0]}): training diverged, nothing was exported; {checkpoint_note or 'see the checkpoints'}. "
            "Lower learning_rate or alpha, or use float32."
        )
    if all(t.abs().sum() == 0 for k, t in tensors.items() if "lora_B" in k):
        logger.warning("every lora_B in the exported adapter is zero: the adapter changes nothing")


def place_training(model_cfg: ModelConfig, cb_cfg: CircuitBreakerConfig) -> CircuitBreakerConfig:
    """The training arguments that train where `model_cfg.device` says; the Trainer (through accelerate) places
    the model. A device that is not there is refused (ModelError); `cpu` on a machine with an accelerator sets
    `use_cpu`; under `accelerate launch` / torchrun each process's own device wins and the setting is only
    checked; `cuda:N` with several GPUs visible is refused, as the Trainer would use them all."""
    device = resolve_device(model_cfg.device)
    if "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return cb_cfg
    if device.type == "cpu":
        accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
        return dataclasses.replace(cb_cfg, use_cpu=True) if accelerator and not cb_cfg.use_cpu else cb_cfg
    if model_cfg.device.strip().lower().startswith("cuda:") and torch.cuda.device_count() > 1:
        raise ConfigError(
            f"device {model_cfg.device}: training in one process uses every visible GPU; choose the GPU with "
            f"CUDA_VISIBLE_DEVICES={device.index} and device cuda, or use accelerate launch (--accelerate-config)"
        )
    return cb_cfg


def train(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    cb_cfg: CircuitBreakerConfig,
    cb_records: Sequence[Record] | None = None,
    retain_records: Sequence[Record] | None = None,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train circuit breakers and write `adapter/` (peft) and `merged/` (full model) under output_dir.

    Under several processes (accelerate launch) every process runs this; only the main one writes
    files. Raises TrainingInterrupted after SIGTERM/SIGINT (a checkpoint of that step is written),
    CheckpointError when a checkpoint or export cannot be written (the previous checkpoint is intact).
    """
    cb_cfg = place_training(model_cfg, cb_cfg)
    if cb_records is None or retain_records is None:
        if not data_cfg.cb_data or not data_cfg.retain_data:
            load_sets(data_cfg)  # raises the usual message
        cb_labelled = read_labelled(data_cfg.cb_data, "circuit_breaker")
        retain_labelled = read_labelled(data_cfg.retain_data)
        if Path(data_cfg.cb_data).resolve() == Path(data_cfg.retain_data).resolve():
            raise DataError(
                f"cb_data and retain_data are the same file ({data_cfg.cb_data}): the rerouting and retain "
                "losses would pull the same rows in opposite directions; give two different files"
            )
    else:
        cb_labelled = [(f"circuit-breaker record {i + 1}", r) for i, r in enumerate(cb_records)]
        retain_labelled = [(f"retain record {i + 1}", r) for i, r in enumerate(retain_records)]
    # one run per folder at a time, export included: a second one is refused here, before it loads anything
    with folder_lock(cb_cfg.output_dir, "output_dir") if cb_cfg.process_index == 0 else nullcontext():
        return _train_locked(model_cfg, data_cfg, cb_cfg, cb_labelled, retain_labelled, callbacks)


def _train_locked(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    cb_cfg: CircuitBreakerConfig,
    cb_labelled: list[tuple[str, Record]],
    retain_labelled: list[tuple[str, Record]],
    callbacks: list[Any] | None,
) -> TrainResult:
    out = Path(cb_cfg.output_dir)
    main = cb_cfg.process_index == 0
    identity = run_identity(model_cfg, data_cfg, cb_cfg, [r for _, r in cb_labelled], [r for _, r in retain_labelled])
    clear = check_output_dir(out, identity, cb_cfg.overwrite_output_dir)  # every process: all raise alike

    model, tokenizer, plan = setup_model(model_cfg, cb_cfg)
    rendered = {
        "circuit_breaker": render_checked(tokenizer, cb_labelled, data_cfg.cb_mask_mode, data_cfg),
        "retain": render_checked(tokenizer, retain_labelled, data_cfg.retain_mask_mode, data_cfg),
    }
    dataset = PairedDataset(rendered["circuit_breaker"].examples, rendered["retain"].examples, data_cfg.retain_per_cb)
    with cb_cfg.main_process_first(local=False, desc="claim the output directory"):  # input is valid: claim it
        if main:
            claim_output_dir(out, identity, clear)
    if main:
        masks = mask_report(
            tokenizer,
            rendered,
            {"circuit_breaker": data_cfg.cb_mask_mode, "retain": data_cfg.retain_mask_mode},
            data_cfg.max_length,
        )
        save_mask_report(masks, out / "mask_report.json")
        print_mask_report(masks)

    trainer = CircuitBreakerTrainer(
        model=model,
        args=cb_cfg,
        train_dataset=dataset,
        data_collator=PairedCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        target_layers=plan["target_layers"],
        retain_layers=plan["retain_layers"],
        callbacks=callbacks,
    )
    resume = cb_cfg.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)

    adapter_dir = out / "adapter"
    card = {
        "base model": model_cfg.model_name_or_path,
        "target layers (hidden_states index)": plan["target_layers"],
        "retain layers": plan["retain_layers"],
        "LoRA blocks": f"{plan['lora_blocks'][0]}..{plan['lora_blocks'][-1]}",
        "LoRA r / alpha / dropout": f"{model_cfg.lora_r} / {model_cfg.lora_alpha} / {model_cfg.lora_dropout}",
        "LoRA modules": ", ".join(f"{n} {kind}" for kind, n in plan["lora"]["per kind"].items())
        + " ("
        + ", ".join(f"{name} x{n}" for name, n in plan["lora"]["per name"].items())
        + ")",
        **{
            f"no LoRA: {why}": f"{len(names)} ({', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))})"
            for why, names in plan["lora"]["left out"].items()
        },
        "alpha": cb_cfg.alpha,
        "schedule": cb_cfg.schedule,
        "steps": trainer.state.global_step,
        "learning rate": cb_cfg.learning_rate,
        "data": f"{data_cfg.cb_data or 'in-memory'} ({len(rendered['circuit_breaker'].examples)} rerouting), "
        f"{data_cfg.retain_data or 'in-memory'} ({len(rendered['retain'].examples)} retain)",
    }
    export_adapter(trainer, model, adapter_dir, card, model_cfg.model_name_or_path)  # every process: gathers
    summary = {
        **plan,
        **trainer.rerouting_summary(),
        "steps": trainer.state.global_step,
        "examples": {name: len(r.examples) for name, r in rendered.items()},
        "distributed": trainer.engine(),
    }
    merged_dir = None
    try:
        if trainer.is_world_process_zero():
            try:
                if cb_cfg.merge:
                    merged_dir = export_merged(
                        adapter_dir,
                        model_cfg.model_name_or_path,
                        out / "merged",
                        model_cfg.dtype,
                        model_cfg.trust_remote_code,
                        overwrite=True,  # this run's own merged model; the folder's run was checked above
                    )
                write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))
                write_jsonl_atomic(out / "train_log.jsonl", trainer.state.log_history)
            except OSError as err:
                reason = f"disk full ({err.filename})" if err.errno == errno.ENOSPC else str(err)
                raise CheckpointError(
                    f"could not finish writing {out}: {reason}; the adapter {adapter_dir} is complete"
                ) from err
    finally:
        # The other workers wait for the main one's writes (also when they fail) before they leave: a
        # worker that tore down its process group while the main one was still merging was sometimes
        # aborted by gloo (SIGABRT), failing a finished run.
        trainer.accelerator.wait_for_everyone()
    return TrainResult(out, adapter_dir, merged_dir, summary, list(trainer.state.log_history))
