"""LoRA adapters: choose where LoRA goes, make one for training, load a trainable one, load and combine named
ones, merge one (or a combination) into the full base model, and describe it in a model card.

One layer above `models` (which loads and saves plain models), so that merged export no longer reaches
up into the experiments that first needed adapter combinations.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from .config import LORA_KINDS, ModelConfig, check_lora_targets
from .models import (
    ModelError,
    check_output_folder,
    find_decoder_layers,
    find_layer_path,
    load_model,
    load_tokenizer,
    resolve_dtype,
    save_model,
    unwrap_model,
)
from .representations import hidden_states

logger = logging.getLogger("circuit_breakers")

COMBINED = "combined"
"""Adapter name of the sum of several adapters (`combine_adapters`)."""

MIXER_WORDS = ("attn", "attention", "mixer", "mamba", "temporal")
"""A block's sub-module whose name holds one of these is its sequence mixer (kind `attention`): attention, or
the state-space / recurrent mixer that takes its place (Mamba's `mixer`, Jamba's `mamba`, RWKV's `attention`)."""

BYPASSED = "bypassed by the forward"
RESERVED = "names peft maps to fused experts"
KERNEL_READ = "read directly by Mamba kernels (peft refuses them)"
EXPERTS_OFF = "fused experts (add experts to lora_targets)"

MAMBA_KERNEL_MODULES = (("mamba", "mamba2", "falcon_mamba", "falcon_h1", "nemotron_h"), ("out_proj",))
"""Model types whose fused training kernel reads these projections' weights directly: peft refuses LoRA on them
(as its `_check_lora_target_modules_mamba` does), and a CPU dry pass, which calls them, cannot tell."""


@dataclass
class LoraTargets:
    """Where LoRA goes: full names (from the model's root) of linear layers and of fused expert parameters
    (3-D weights that peft wraps as parameters), and the candidates left out, by reason."""

    modules: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    left_out: dict[str, list[str]] = field(default_factory=dict)


def lora_kind(name_in_block: str) -> str:
    """`attention` for a projection inside the block's sequence mixer (see MIXER_WORDS), else `mlp`."""
    parents = name_in_block.lower().split(".")[:-1]
    return "attention" if any(word in part for part in parents for word in MIXER_WORDS) else "mlp"


def block_candidates(model: torch.nn.Module, blocks: Sequence[int]) -> dict[str, str]:
    """{full name: kind} of everything LoRA can go on in decoder `blocks`: linear layers (kind attention or mlp)
    and fused expert weights (3-D parameters, kind experts). Only the blocks of the language model that
    `find_decoder_layers` finds: a vision tower, the embeddings and the LM head are never candidates."""
    from transformers.pytorch_utils import Conv1D

    path = find_layer_path(model)
    layers = find_decoder_layers(model)
    found: dict[str, str] = {}
    for i in blocks:
        for name, module in layers[i].named_modules():
            prefix = f"{path}.{i}.{name}" if name else f"{path}.{i}"
            if isinstance(module, (torch.nn.Linear, Conv1D)):
                found[prefix] = lora_kind(name)
                continue
            if "expert" in f"{name}.{type(module).__name__}".lower():  # not a conv kernel, not RWKV's time_mix
                for param_name, param in module.named_parameters(recurse=False):
                    if param.dim() == 3:
                        found[f"{prefix}.{param_name}"] = "experts"
    return found


def block_linear_names(model: PreTrainedModel) -> list[str]:
    """Short names of the linear projections inside decoder blocks (the LM head is never included)."""
    names = block_candidates(model, range(len(find_decoder_layers(model))))
    return sorted({name.rsplit(".", 1)[-1] for name, kind in names.items() if kind != "experts"})


def bypassed_modules(model: torch.nn.Module, names: Sequence[str], blocks: Sequence[int]) -> set[str]:
    """The linear layers among `names` whose own forward never runs although the module holding them does, in
    one training-mode pass of a few tokens through `blocks` (no gradient; random state restored).

    Such a layer's weight is read directly (Jamba's `dt_proj.weight @ x`): LoRA on it would never act on the
    adapted model, never get a gradient, and yet be merged into the weight, so the merged model would differ
    from the adapted one (by the random lora_B of `lora_init: random`). A dry pass finds them before LoRA
    exists, so they get none. A layer whose holder did not run either (an MoE expert no token was routed to)
    is kept: when it runs, it runs its forward, so its LoRA merges exactly. Chosen over zeroing, before export,
    the lora_B of layers that got no gradient: that also zeroes unrouted experts, and keeps bypassed layers in
    the adapter and in the summary of what got LoRA. The pass runs where the model is loaded (the CPU); what
    only a GPU kernel reads directly is named in MAMBA_KERNEL_MODULES."""
    if any(param.numel() == 0 for param in model.parameters()):  # DeepSpeed ZeRO-3 partitioned them at load
        logger.warning("weights are partitioned: layers the forward bypasses cannot be found and keep their LoRA")
        return set()
    modules = dict(model.named_modules())
    called: set[str] = set()
    watched = set(names) | {name.rpartition(".")[0] for name in names}
    hooks = [
        modules[name].register_forward_pre_hook(lambda *_, name=name: called.add(name))
        for name in watched
        if name in modules
    ]
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(1, 9, device=device) % vocab).unsqueeze(0)
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            model.train()
            hidden_states(model, ids, torch.ones_like(ids), [max(blocks) + 1])
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return {name for name in names if name not in called and name.rpartition(".")[0] in called}


def peft_reserved_modules(model: PreTrainedModel, names: Sequence[str]) -> set[str]:
    """The linear layers among `names` that peft would not put LoRA on: for MoE models whose experts transformers
    5 fused (DeepSeek-V3, GLM-4-MoE, Qwen3-MoE, ...), peft reads the names that experts had before
    (`gate_proj`, `up_proj`, `down_proj`) as the fused experts, on every load of the adapter too, so a dense MLP
    or shared expert with such a name cannot hold module LoRA. Found by running peft's own conversion."""
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # a peft without the transformers 5 conversion renames nothing
        return set()
    trial = LoraConfig(target_modules=list(names), task_type="CAUSAL_LM")
    convert_peft_config_for_transformers(trial, model=model, conversions=get_model_conversion_mapping(model))
    return set(names) - set(trial.target_modules or ())


def kernel_read_modules(model: PreTrainedModel, names: Sequence[str]) -> set[str]:
    """The linear layers among `names` that a Mamba-type model's fused kernel reads directly (MAMBA_KERNEL_MODULES)."""
    model_types, short_names = MAMBA_KERNEL_MODULES
    if getattr(unwrap_model(model).config, "model_type", None) not in model_types:
        return set()
    return {name for name in names if name.rsplit(".", 1)[-1] in short_names}


def choose_lora_targets(model: PreTrainedModel, model_cfg: ModelConfig, blocks: Sequence[int]) -> LoraTargets:
    """The modules and fused expert weights of `blocks` that `lora_targets` selects, less those LoRA cannot
    work on (see `bypassed_modules`, `peft_reserved_modules`); ModelError for a name the blocks do not have,
    for a selection that leaves nothing, and for experts with dropout (peft's parameter LoRA has none)."""
    if not blocks:
        raise ModelError("no decoder blocks to put LoRA on (layers_to_transform is empty)")
    items = check_lora_targets(model_cfg.lora_targets)
    kinds = set(LORA_KINDS) if "all" in items else {"attention", "mlp"} if "all-linear" in items else set()
    kinds |= {item for item in items if item in LORA_KINDS}
    names = [item for item in items if item not in (*LORA_KINDS, "all", "all-linear")]
    candidates = block_candidates(model, blocks)
    span = f"block {blocks[0]}" if len(blocks) == 1 else f"blocks {min(blocks)}..{max(blocks)}"
    where = f"{span} of {type(unwrap_model(model)).__name__}"
    short = {name: name.rsplit(".", 1)[-1] for name in candidates}
    missing = [name for name in names if name not in short.values()]
    if missing:
        available = {kind: sorted({short[n] for n, k in candidates.items() if k == kind}) for kind in LORA_KINDS}
        listed = "; ".join(f"{kind}: {', '.join(found)}" for kind, found in available.items() if found)
        raise ModelError(f"lora_targets names {', '.join(missing)}, which {where} does not have; it has {listed}")
    chosen = [n for n, kind in candidates.items() if kind in kinds or short[n] in names]
    targets = LoraTargets(
        modules=[n for n in chosen if candidates[n] != "experts"],
        parameters=[n for n in chosen if candidates[n] == "experts"],
    )
    if targets.parameters and model_cfg.lora_dropout:
        raise ModelError(
            f"lora_targets {model_cfg.lora_targets!r} puts LoRA on {len(targets.parameters)} fused expert "
            f"weight(s), which peft adapts as parameters, without dropout: set lora_dropout: 0 (now "
            f"{model_cfg.lora_dropout})"
        )
    checks = {
        BYPASSED: lambda: bypassed_modules(model, targets.modules, blocks),
        RESERVED: lambda: peft_reserved_modules(model, targets.modules),
        KERNEL_READ: lambda: kernel_read_modules(model, targets.modules),
        EXPERTS_OFF: lambda: {n for n, kind in candidates.items() if kind == "experts" and n not in chosen},
    }
    for reason, check in checks.items():
        left = check() if targets.modules or reason == EXPERTS_OFF else set()
        if left:
            targets.left_out[reason] = sorted(left)
            targets.modules = [n for n in targets.modules if n not in left]
            what = ", ".join(sorted({short[n] for n in left}))
            logger.warning("no LoRA on %d module(s) (%s): %s", len(left), what, reason)
    if not targets.modules and not targets.parameters:
        raise ModelError(
            f"lora_targets {model_cfg.lora_targets!r} selects nothing LoRA can work on in {where}; "
            "try lora_targets: attention,mlp"
        )
    return targets


def without_hub_lookup(model: PeftModel) -> PeftModel:
    """Make `model.save_pretrained` (every checkpoint and the export) skip peft's check for resized
    embeddings, which asks the Hub whether `base_model_name_or_path` (`embedded`, a hub id) has a
    config.json at every save. LoRA here never targets or resizes the embeddings, so they are never saved."""
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    return model


def add_lora(
    model: PreTrainedModel, model_cfg: ModelConfig, blocks: Sequence[int], targets: LoraTargets | None = None
) -> PeftModel:
    """Wrap `model` with LoRA on what `lora_targets` selects in decoder `blocks` (`choose_lora_targets`, unless
    `targets` are given); optional random lora_B.

    peft gets full module names, not short names with `layers_to_transform`: those also match any other
    numbered list of layers (a multimodal model's vision tower), whose LoRA would get no gradient and yet
    be merged."""
    blocks = list(blocks)
    targets = targets if targets is not None else choose_lora_targets(model, model_cfg, blocks)
    config = LoraConfig(
        r=model_cfg.lora_r,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=list(targets.modules),
        target_parameters=list(targets.parameters) or None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    # peft shortens a long list of names to the shortest suffixes that tell them apart in the model it sees, a
    # truncated one here: loaded onto the full model, those would also match the blocks above. Keep the names.
    peft_model.peft_config["default"].target_modules = set(targets.modules)
    peft_model.peft_config["default"].base_model_name_or_path = model_cfg.model_name_or_path
    if model_cfg.lora_init == "random":
        # Symmetry breaking (issue 10): with lora_B = 0 the adapted states equal the frozen ones, where
        # the cosine's gradient is zero; a small random lora_B starts the model slightly off that point.
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, model_cfg.lora_init_scale)
    return without_hub_lookup(peft_model)


def lora_summary(model: PeftModel, left_out: Mapping[str, Sequence[str]] | None = None) -> dict[str, object]:
    """What got LoRA, for the run summary and the model card: counts per kind (attention, mlp, experts) and per
    short name, the full names, and what was left out and why."""
    tuner = model.base_model
    names = sorted(set(tuner.targeted_module_names) | set(getattr(tuner, "targeted_parameter_names", [])))
    path = find_layer_path(model)
    pattern = re.compile(rf"{re.escape(path)}\.\d+\.(.*)$")
    kinds: Counter[str] = Counter()
    for name in names:
        match = pattern.match(name)
        inner = match.group(1) if match else name
        kinds["experts" if name in getattr(tuner, "targeted_parameter_names", []) else lora_kind(inner)] += 1
    return {
        "per kind": {kind: kinds[kind] for kind in LORA_KINDS},
        "per name": dict(sorted(Counter(name.rsplit(".", 1)[-1] for name in names).items())),
        "modules": names,
        "left out": {reason: list(left) for reason, left in (left_out or {}).items()},
    }


def load_trainable_adapter(model: PreTrainedModel, path: str, kept_blocks: int) -> tuple[PeftModel, list[int]]:
    """An existing adapter, trainable, on the (possibly truncated) model: continual training starts from
    its weights. Its LoRA blocks must all exist in the kept blocks, or part of it would be silently lost."""
    config = PeftConfig.from_pretrained(path)
    layers = config.layers_to_transform
    lists = (config.target_modules, getattr(config, "target_parameters", None))
    named = [name for names in lists if names and not isinstance(names, str) for name in names]
    pattern = re.compile(rf"{re.escape(find_layer_path(model))}\.(\d+)\.")
    indices = {int(m.group(1)) for m in map(pattern.match, named) if m}
    if isinstance(layers, (list, int)):
        blocks = sorted(layers) if isinstance(layers, list) else [layers]
    elif indices:  # full module names (adapters made since issue 30)
        blocks = sorted(indices)
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
