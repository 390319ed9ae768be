"""Training as explicit stages: set up the model, build the data, train, save adapter and merged model."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from .config import CircuitBreakerConfig, DataConfig, ModelConfig
from .data.batching import PairedCollator, PairedDataset
from .data.records import DataError, Record, read_records
from .data.report import mask_report, print_mask_report, save_mask_report
from .data.render import RenderResult, render_all
from .models import (
    default_target_layers,
    export_merged,
    find_decoder_layers,
    load_model_and_tokenizer,
    num_layers,
    truncate_layers,
    validate_layers,
    write_model_card,
)
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


def layer_plan(n_layers: int, cb_cfg: CircuitBreakerConfig, model_cfg: ModelConfig) -> tuple[list[int], list[int], list[int]]:
    """(target layers, retain layers, LoRA blocks), validated against the model's depth.

    LoRA goes on blocks 0..max(target)-1: exactly the blocks that produce hidden_states[max(target)].
    """
    target = validate_layers(cb_cfg.target_layers or default_target_layers(n_layers), n_layers)
    retain = validate_layers(resolve_retain_layers(cb_cfg.retain_layers, target), n_layers, "retain_layers")
    blocks = model_cfg.layers_to_transform
    if blocks is None:
        blocks = list(range(max(target)))
    bad = [b for b in blocks if not 0 <= b < n_layers]
    if bad:
        raise ValueError(f"layers_to_transform {bad} out of range 0..{n_layers - 1}")
    return target, retain, sorted(set(blocks))


def block_linear_names(model: PreTrainedModel) -> list[str]:
    """Names of the linear projections inside decoder blocks (peft's `all-linear` cannot be combined
    with `layers_to_transform`, so we resolve it ourselves; the LM head is never included)."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for block in find_decoder_layers(model):
        for name, module in block.named_modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)):
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def add_lora(model: PreTrainedModel, model_cfg: ModelConfig, blocks: Sequence[int]) -> PeftModel:
    """Wrap `model` with LoRA on attention and MLP projections of `blocks`; optional random lora_B."""
    modules = model_cfg.lora_target_modules
    config = LoraConfig(
        r=model_cfg.lora_r,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=block_linear_names(model) if modules == "all-linear" else [m.strip() for m in modules.split(",")],
        layers_to_transform=list(blocks),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = model_cfg.model_name_or_path
    if model_cfg.lora_init == "random":
        # Symmetry breaking (issue 10): with lora_B = 0 the adapted states equal the frozen ones, where
        # the cosine's gradient is zero; a small random lora_B starts the model slightly off that point.
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, model_cfg.lora_init_scale)
    return peft_model


def setup_model(
    model_cfg: ModelConfig, cb_cfg: CircuitBreakerConfig
) -> tuple[PeftModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load, plan layers, truncate above the deepest target, add LoRA. Returns model, tokenizer, plan."""
    set_seed(cb_cfg.seed)
    model, tokenizer = load_model_and_tokenizer(model_cfg.model_name_or_path, model_cfg.dtype, model_cfg.trust_remote_code)
    n = num_layers(model)
    target, retain, blocks = layer_plan(n, cb_cfg, model_cfg)
    if cb_cfg.truncate_layers:
        truncate_layers(model, max(target))
    model.config.use_cache = False
    if cb_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = add_lora(model, model_cfg, blocks)
    plan = {"num_layers": n, "target_layers": target, "retain_layers": retain, "lora_blocks": blocks,
            "trained_layers": max(target) if cb_cfg.truncate_layers else n}
    return peft_model, tokenizer, plan


def render_sets(
    tokenizer: PreTrainedTokenizerBase,
    data_cfg: DataConfig,
    cb_records: Sequence[Record],
    retain_records: Sequence[Record],
) -> tuple[PairedDataset, dict[str, RenderResult]]:
    """Render both sets with their mask modes and pair them."""
    cb = render_all(tokenizer, cb_records, data_cfg.cb_mask_mode, data_cfg.max_length, data_cfg.mask_prompt_tokens)
    retain = render_all(tokenizer, retain_records, data_cfg.retain_mask_mode, data_cfg.max_length, data_cfg.mask_prompt_tokens)
    return PairedDataset(cb.examples, retain.examples, data_cfg.retain_per_cb), {"circuit_breaker": cb, "retain": retain}


def load_sets(data_cfg: DataConfig) -> tuple[list[Record], list[Record]]:
    """The circuit-breaker and retain records named in the recipe."""
    if not data_cfg.cb_data or not data_cfg.retain_data:
        raise DataError("training needs cb_data and retain_data (JSONL files of chat `messages`)")
    return read_records(data_cfg.cb_data, "circuit_breaker"), read_records(data_cfg.retain_data)


def train(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    cb_cfg: CircuitBreakerConfig,
    cb_records: Sequence[Record] | None = None,
    retain_records: Sequence[Record] | None = None,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train circuit breakers and write `adapter/` (peft) and `merged/` (full model) under output_dir."""
    if cb_records is None or retain_records is None:
        cb_records, retain_records = load_sets(data_cfg)
    out = Path(cb_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, plan = setup_model(model_cfg, cb_cfg)
    dataset, rendered = render_sets(tokenizer, data_cfg, cb_records, retain_records)
    masks = mask_report(tokenizer, rendered, {"circuit_breaker": data_cfg.cb_mask_mode,
                                              "retain": data_cfg.retain_mask_mode}, data_cfg.max_length)
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
    if trainer.is_world_process_zero():
        model.save_pretrained(adapter_dir, safe_serialization=True)
        card = {
            "base model": model_cfg.model_name_or_path,
            "target layers (hidden_states index)": plan["target_layers"],
            "retain layers": plan["retain_layers"],
            "LoRA blocks": f"{plan['lora_blocks'][0]}..{plan['lora_blocks'][-1]}",
            "LoRA r / alpha / dropout": f"{model_cfg.lora_r} / {model_cfg.lora_alpha} / {model_cfg.lora_dropout}",
            "alpha": cb_cfg.alpha,
            "schedule": cb_cfg.schedule,
            "steps": trainer.state.global_step,
            "learning rate": cb_cfg.learning_rate,
            "data": f"{data_cfg.cb_data or 'in-memory'} ({len(rendered['circuit_breaker'].examples)} rerouting), "
                    f"{data_cfg.retain_data or 'in-memory'} ({len(rendered['retain'].examples)} retain)",
        }
        write_model_card(adapter_dir, model_cfg.model_name_or_path, card)
    summary = {**plan, **trainer.rerouting_summary(), "steps": trainer.state.global_step,
               "examples": {name: len(r.examples) for name, r in rendered.items()}}
    merged_dir = None
    if cb_cfg.merge and trainer.is_world_process_zero():
        merged_dir = export_merged(adapter_dir, model_cfg.model_name_or_path, out / "merged", model_cfg.dtype,
                                   model_cfg.trust_remote_code)
    if trainer.is_world_process_zero():
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        with (out / "train_log.jsonl").open("w") as handle:
            for row in trainer.state.log_history:
                handle.write(json.dumps(row) + "\n")
    return TrainResult(out, adapter_dir, merged_dir, summary, list(trainer.state.log_history))
