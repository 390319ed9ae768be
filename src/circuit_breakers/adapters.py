"""LoRA adapters: make one for training, load a trainable one, load and combine named ones, merge one (or
a combination) into the full base model, and describe it in a model card.

One layer above `models` (which loads and saves plain models), so that merged export no longer reaches
up into the experiments that first needed adapter combinations.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from .config import ModelConfig
from .models import (
    check_output_folder,
    find_decoder_layers,
    load_model,
    load_tokenizer,
    resolve_dtype,
    save_model,
)

COMBINED = "combined"
"""Adapter name of the sum of several adapters (`combine_adapters`)."""


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


def without_hub_lookup(model: PeftModel) -> PeftModel:
    """Make `model.save_pretrained` (every checkpoint and the export) skip peft's check for resized
    embeddings, which asks the Hub whether `base_model_name_or_path` (`embedded`, a hub id) has a
    config.json at every save. LoRA here never targets or resizes the embeddings, so they are never saved."""
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    return model


def add_lora(model: PreTrainedModel, model_cfg: ModelConfig, blocks: Sequence[int]) -> PeftModel:
    """Wrap `model` with LoRA on attention and MLP projections of `blocks`; optional random lora_B."""
    modules = model_cfg.lora_target_modules
    targets = block_linear_names(model) if modules == "all-linear" else [m.strip() for m in modules.split(",")]
    config = LoraConfig(
        r=model_cfg.lora_r,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=targets,
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
    return without_hub_lookup(peft_model)


def load_trainable_adapter(model: PreTrainedModel, path: str, kept_blocks: int) -> tuple[PeftModel, list[int]]:
    """An existing adapter, trainable, on the (possibly truncated) model: continual training starts from
    its weights. Its LoRA blocks must all exist in the kept blocks, or part of it would be silently lost."""
    config = PeftConfig.from_pretrained(path)
    layers = config.layers_to_transform
    if isinstance(layers, (list, int)):
        blocks = sorted(layers) if isinstance(layers, list) else [layers]
    else:
        blocks = list(range(kept_blocks))
    if blocks and max(blocks) >= kept_blocks:
        raise ValueError(
            f"init_adapter {path} has LoRA on block {max(blocks)}, but training keeps blocks "
            f"0..{kept_blocks - 1} (the deepest target layer): choose target layers at least as deep as "
            "the adapter's run"
        )
    return without_hub_lookup(PeftModel.from_pretrained(model, path, is_trainable=True)), blocks


def load_adapters(base: PreTrainedModel, adapters: Mapping[str, str | Path]) -> PeftModel:
    """One model holding every adapter under its name (peft); the first is active. Adapters trained on a
    truncated model load onto the full one: they touch only blocks it has unchanged."""
    if not adapters:
        raise ValueError("no adapters to load")
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.set_adapter(names[0])
    return model


def combine_adapters(
    model: PeftModel, names: Sequence[str], weights: Sequence[float] | None = None, name: str = COMBINED
) -> str:
    """Add adapter `name` = sum_i weight_i x adapter_i (LoRA deltas concatenated by rank: exact, no SVD)
    and make it the active one. Weights default to 1: every category's circuit breaker at full strength."""
    weights = list(weights) if weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError("one weight per adapter")
    if name in model.peft_config:
        model.delete_adapter(name)
    model.add_weighted_adapter(list(names), weights, name, combination_type="cat")
    model.set_adapter(name)
    return name


def write_model_card(out_dir: str | Path, base_model: str, info: dict[str, object]) -> None:
    """A README.md saying what the adapter or merged model is and how it was trained."""
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: peft",
        "tags: [circuit-breakers, representation-rerouting, lora]",
        "---",
        "",
        "# Circuit-breaker adapter",
        "",
        "Trained with `circuit-breakers` (representation rerouting, Zou et al. 2024, arXiv 2406.04313) "
        f"on `{base_model}`.",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in info.items()],
        "",
    ]
    Path(out_dir, "README.md").write_text("\n".join(lines), encoding="utf-8")


def export_merged(
    adapter_dir: str | Path | Sequence[str | Path],
    base_model: str,
    out_dir: str | Path,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Merge a (possibly truncated-layer) training adapter into the full base model and save it.

    The adapter only touches blocks below the deepest target layer, which exist unchanged in the full
    model, so loading it onto the full model and merging gives every original layer. The merge happens
    in float32 and the result is cast to `dtype` afterwards, so rounding happens once. Several adapter
    folders: their sum is merged (category adapters combined, see `combine_adapters`). An `out_dir` holding
    anything is refused before any work unless `overwrite`; non-finite merged weights are never written.
    """
    check_output_folder(out_dir, overwrite)
    base = load_model(base_model, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if isinstance(adapter_dir, (str, Path)):
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    else:
        dirs = [Path(d) for d in adapter_dir]
        model = load_adapters(base, {f"adapter{i}": d for i, d in enumerate(dirs)})
        combine_adapters(model, [f"adapter{i}" for i in range(len(dirs))])
        merged = model.merge_and_unload()
    merged = merged.to(resolve_dtype(dtype))
    card = Path(adapter_dir, "README.md") if isinstance(adapter_dir, (str, Path)) else None
    extra = {"README.md": card.read_text()} if card is not None and card.is_file() else {}
    return save_model(merged, load_tokenizer(base_model, trust_remote_code), out_dir, extra, overwrite)
