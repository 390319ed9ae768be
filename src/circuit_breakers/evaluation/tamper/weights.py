"""Weight-space attacks: what anyone holding the defended model's weights and its public base can do.

A merged circuit breaker is the base plus a LoRA delta. Three edits test how much of the defence that delta
carries and how easily it is undone, each giving an ordinary model (no runtime hooks) that can be evaluated,
saved and loaded:

- interpolation: base + f (defended - base) for f from 1 to 0, the line back to the base;
- top-k: each 2-D weight's delta cut to its k largest singular directions (torch.linalg.svd); a delta
  that keeps its effect at small k is a low-rank edit one can find and subtract;
- orthogonalisation: the refusal direction r (measured as `attacks/refusal_direction.py` measures it)
  removed from every weight that writes into the residual stream, W <- W - r r^T W (Arditi et al. 2024,
  arXiv 2406.11717): the runtime ablation made permanent.

The interpolation's pure functions live here (evaluation, layer 4) so that `experiments/interpolate.py`
(the capability-bounded interpolation, layer 5) imports them downwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ...data.slots import encode
from ...models import find_decoder_layers, output_size, residual_writers, unwrap_model
from ...representations import hidden_states
from ..attacks.base import AttackError
from ..attacks.refusal_direction import HARMLESS_INSTRUCTIONS, RefusalDirectionAttack, refusal_direction

DEFAULT_FRACTIONS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
DEFAULT_RANKS: tuple[int, ...] = (1, 2, 4, 8, 16)


class InterpolationError(ValueError):
    """Models that cannot be interpolated (different parameters or shapes), or no weight within the budget."""


@dataclass
class WeightPoint:
    """One weight-space model: the attack, its setting (a fraction or a rank) and how much of the delta is left."""

    attack: str
    value: float
    energy_kept: float
    """Fraction of the delta's squared Frobenius norm kept (over the 2-D matrices for top-k; f^2 for interpolation)."""
    n_matrices: int = 0
    """Matrices whose delta was cut (top-k) or moved (interpolation)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_compatible(start: Mapping[str, Tensor], end: Mapping[str, Tensor]) -> None:
    """Refuse two state dicts that are not the same architecture (names and shapes), naming the first difference."""
    missing, extra = sorted(set(start) - set(end)), sorted(set(end) - set(start))
    if missing or extra:
        raise InterpolationError(
            f"the models differ in parameters: only in start {missing[:3]}, only in end {extra[:3]}"
        )
    for name, tensor in start.items():
        if tensor.shape != end[name].shape:
            raise InterpolationError(f"{name}: shape {tuple(tensor.shape)} in start, {tuple(end[name].shape)} in end")


def interpolated_tensor(a: Tensor, b: Tensor, weight: float) -> Tensor:
    """(1 - w) a + w b in float32, cast to a's dtype: exactly a at w = 0 and exactly b at w = 1. Tensors that are
    not floating point (integer buffers) are taken from a."""
    if not a.is_floating_point():
        return a.clone()
    return ((1.0 - weight) * a.float() + weight * b.float()).to(a.dtype)


def interpolate_weights(
    base: Mapping[str, Tensor], defended: Mapping[str, Tensor], fraction: float
) -> dict[str, Tensor]:
    """base + fraction (defended - base), tensor by tensor (see `interpolated_tensor`)."""
    check_compatible(base, defended)
    return {name: interpolated_tensor(base[name], defended[name], fraction) for name in base}


@torch.no_grad()
def set_interpolated(model: nn.Module, start: Mapping[str, Tensor], end: Mapping[str, Tensor], weight: float) -> None:
    """Write `start + weight * (end - start)` into `model`'s parameters and buffers, in place (one tensor at a
    time, so no third full copy is built); tied weights are written twice with the same value."""
    for name, tensor in model.state_dict().items():
        tensor.copy_(interpolated_tensor(start[name].to(tensor.device), end[name].to(tensor.device), weight))


@torch.no_grad()
def set_weights(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy `state` into `model`'s parameters and buffers in place (each cast to the model's dtype and device)."""
    for name, tensor in model.state_dict().items():
        tensor.copy_(state[name].to(tensor.device, tensor.dtype))


def interpolation_points(
    model: nn.Module,
    base: Mapping[str, Tensor],
    defended: Mapping[str, Tensor],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Iterator[tuple[WeightPoint, nn.Module]]:
    """For each fraction f, `model` holding base + f (defended - base), to evaluate before the next is
    written. `model` is any model of the architecture (the defended one loaded); it is left holding the
    defended weights when the iteration ends or is closed."""
    check_compatible(base, defended)
    moved = sum(1 for n in base if base[n].dim() == 2 and not torch.equal(base[n], defended[n]))
    try:
        for fraction in fractions:
            set_interpolated(model, base, defended, float(fraction))
            yield WeightPoint("interpolation", float(fraction), float(fraction) ** 2, moved), model
    finally:
        set_interpolated(model, base, defended, 1.0)


@dataclass
class DeltaFactors:
    """The top singular directions of one matrix's delta: delta ~ (u * s) @ vh, with the delta's energy."""

    u: Tensor
    s: Tensor
    vh: Tensor
    energy: float


def delta_factors(
    base: Mapping[str, Tensor], defended: Mapping[str, Tensor], max_rank: int | None = None
) -> dict[str, DeltaFactors]:
    """SVD (float32) of every changed 2-D floating-point delta, keeping at most `max_rank` directions: computed
    once and cut to each k by `topk_weights`."""
    check_compatible(base, defended)
    out = {}
    for name, a in base.items():
        if a.dim() != 2 or not a.is_floating_point() or torch.equal(a, defended[name]):
            continue
        delta = defended[name].float() - a.float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        keep = len(s) if max_rank is None else min(max_rank, len(s))
        out[name] = DeltaFactors(u[:, :keep].clone(), s[:keep].clone(), vh[:keep].clone(), float((s * s).sum()))
    return out


def topk_weights(
    base: Mapping[str, Tensor],
    defended: Mapping[str, Tensor],
    k: int,
    factors: Mapping[str, DeltaFactors] | None = None,
) -> dict[str, Tensor]:
    """base + the top-k singular directions of each 2-D delta; other changed tensors (norms, biases) keep their
    whole delta, unchanged ones are the base's. `factors` from `delta_factors` (with a rank of at least k)."""
    if k < 1:
        raise AttackError(f"top-k rank must be at least 1, not {k}")
    factors = factors if factors is not None else delta_factors(base, defended, k)
    out = {}
    for name, a in base.items():
        if name in factors:
            f = factors[name]
            delta = (f.u[:, :k] * f.s[:k]) @ f.vh[:k]
            out[name] = (a.float() + delta).to(a.dtype)
        else:
            out[name] = defended[name].clone()
    return out


def topk_points(
    model: nn.Module,
    base: Mapping[str, Tensor],
    defended: Mapping[str, Tensor],
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> Iterator[tuple[WeightPoint, nn.Module]]:
    """For each k, `model` holding `topk_weights(base, defended, k)` (one SVD per matrix for all k); left
    holding the defended weights afterwards. `energy_kept` is the share of the 2-D deltas' energy kept."""
    if not ranks or min(ranks) < 1:
        raise AttackError(f"top-k ranks must be at least 1, got {list(ranks)}")
    factors = delta_factors(base, defended, max(ranks))
    total = sum(f.energy for f in factors.values())
    try:
        for k in ranks:
            set_weights(model, topk_weights(base, defended, k, factors))
            kept = sum(float((f.s[:k] ** 2).sum()) for f in factors.values())
            yield WeightPoint("top_k", int(k), kept / total if total else 1.0, len(factors)), model
    finally:
        set_weights(model, defended)


# --------------------------------------------------------------------------------------------------
# Orthogonalisation


@dataclass
class Orthogonalization:
    """What the weight edit did: the direction's layer and norm, the weights edited and the component along the
    direction left in the residual stream (0 when the edit is exact; see `residual_component`)."""

    layer: int | None
    direction_norm: float
    edited: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    """Residual writers whose output is not the hidden size (never edited)."""
    max_residual_component: float | None = None
    untied_head: bool = False
    """The LM head shared the input embedding's tensor and was given its own copy (`untie_output_embeddings`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def untie_output_embeddings(model: nn.Module) -> bool:
    """Give the LM head its own copy of the input embedding's weight where the two share one tensor (GPT-2,
    SmolLM2, Gemma), and set `config.tie_word_embeddings = False` so that neither `tie_weights()` nor a save and
    `from_pretrained` shares them again (transformers saves a shared tensor once and ties on load when the
    config says so). True when the head was untied."""
    base = unwrap_model(model)
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embedding.weight.data_ptr():
        return False
    weight = embedding.weight
    head.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    base.config.tie_word_embeddings = False
    base.all_tied_weights_keys = base.get_expanded_tied_weights_keys(all_submodels=True)  # set at init
    return True


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, direction: Tensor) -> Orthogonalization:
    """Remove `direction` from every residual writer's output, in place: embeddings and Conv1D (rows in the
    stream) W <- W - (W u) u^T, linear layers W <- W - u (u^T W), biases b <- b - (b . u) u, u = r / |r|;
    computed in float32 and cast back. The model then writes nothing along u into the residual stream.

    A tied LM head is untied first (`untie_output_embeddings`): the runtime ablation this makes permanent
    edits what is written into the stream, never the unembedding, so the head keeps its weights."""
    from transformers.pytorch_utils import Conv1D

    unit = direction.detach().float()
    norm = float(unit.norm())
    if not norm > 0:
        raise AttackError("the direction to orthogonalise against is zero")
    unit = unit / norm
    result = Orthogonalization(layer=None, direction_norm=norm, untied_head=untie_output_embeddings(model))
    for name, module in residual_writers(model).items():
        if output_size(module) != unit.numel():
            result.left_out.append(name)
            continue
        weight = module.weight
        u = unit.to(weight.device)
        w = weight.float()
        if isinstance(module, (nn.Embedding, Conv1D)):
            w = w - torch.outer(w @ u, u)
        else:
            w = w - torch.outer(u, u @ w)
        weight.copy_(w.to(weight.dtype))
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor):
            b = bias.float()
            bias.copy_((b - (b @ u) * u).to(bias.dtype))
        result.edited.append(name)
    return result


@torch.no_grad()
def residual_component(model: nn.Module, input_ids: Tensor, direction: Tensor) -> float:
    """The largest |h . u| over every position of the residual stream (the embeddings and each block's output,
    before the final norm) for `input_ids`: how much of the direction is left."""
    blocks = len(find_decoder_layers(model))
    device = model.get_input_embeddings().weight.device
    ids = input_ids.to(device)
    states = hidden_states(model, ids, torch.ones_like(ids), list(range(blocks + 1)))
    unit = direction.float().to(device)
    unit = unit / unit.norm()
    return max(float((h.float() @ unit).abs().max()) for h in states.values())


def refusal_orthogonalize(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    harmful: Sequence[str],
    harmless: Sequence[str] | None = None,
    layer: int | None = None,
    n_instructions: int = 64,
) -> Orthogonalization:
    """Measure the refusal direction on `model` (mean harmful - mean harmless last-prompt-token state at `layer`,
    default half the depth, as the refusal-direction attack does) and orthogonalise `model`'s weights against
    it, in place. `max_residual_component` is read on the first harmful instruction's chat prompt."""
    if isinstance(model, PeftModel):
        raise AttackError("orthogonalise a merged model, not one with adapters (merge it first: export_merged)")
    resolved = RefusalDirectionAttack(layer=layer).resolved_layer(model)
    harmless = list(harmless) if harmless is not None else list(HARMLESS_INSTRUCTIONS)
    direction = refusal_direction(model, tokenizer, list(harmful)[:n_instructions], harmless[:n_instructions], resolved)
    result = orthogonalize_weights(model, direction)
    result.layer = resolved
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": list(harmful)[0]}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([encode(tokenizer, prompt)], dtype=torch.long)
    result.max_residual_component = residual_component(model, ids, direction)
    return result
