"""Rerouting and retain losses and their coefficient schedules: pure functions on tensors.

Shapes: hidden states are `[L, B, T, H]` (layers, batch, tokens, hidden), masks are `[B, T]` with 1 on
the tokens that count. Padding is 0 in every mask, so it never counts; a batch whose mask is all zero
gives a loss of exactly 0, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Schedule = Literal["dual", "cosine", "single"]
Representation = Literal["raw", "centered", "no_outliers"]
RetainDistance = Literal["l2", "relative", "relative_squared"]


Count = Tensor | float | None
"""The number of (layer, token) pairs a mean divides by; None: those of the given mask. A step that
runs its rows in chunks passes the whole batch's count, so the chunks' losses add up to the batch's."""


def _masked_mean(values: Tensor, mask: Tensor, count: Count = None) -> Tensor:
    """Mean of `values` [L, B, T] over the (layer, token) pairs where `mask` [B, T] is 1."""
    weights = mask.to(values.dtype).unsqueeze(0).expand_as(values)
    total = (values * weights).sum()
    if count is None:
        return total / weights.sum().clamp_min(1.0)
    return total / (count.clamp_min(1.0) if isinstance(count, Tensor) else max(float(count), 1.0))


def rerouting_loss(
    adapted: Tensor, frozen: Tensor, mask: Tensor, count: Count = None, layer_weights: Tensor | None = None
) -> Tensor:
    """L_cb = mean over masked tokens and layers of ReLU(cos(adapted, frozen)) (paper, eq. 1).

    Zero once the adapted representation is orthogonal to (or opposite) the frozen one. With
    `layer_weights` [L] (summing to 1, e.g. a softmax), L_cb = sum_l w_l * (token mean at layer l);
    uniform weights 1/L give the plain mean.
    """
    cos = F.cosine_similarity(adapted.float(), frozen.float(), dim=-1).relu()
    if layer_weights is not None:
        cos = cos * (layer_weights.float() * len(layer_weights))[:, None, None]
    return _masked_mean(cos, mask, count)


def retain_loss(
    adapted: Tensor, frozen: Tensor, mask: Tensor, distance: RetainDistance = "l2", count: Count = None
) -> Tensor:
    """L_retain = mean over masked tokens and layers of d(adapted, frozen).

    - l2 (paper, eq. 1): ||adapted - frozen||_2.
    - relative: ||adapted - frozen||_2 / ||frozen||_2. The plain distance's gradient has unit size while
      the cosine's is about 1 / ||h||, so on models with large hidden states (SmolLM2: ~190, outlier
      tokens 25,000) the plain retain term outweighs rerouting by that factor (issue 10).
    - relative_squared: the square of `relative`: a spring whose pull is zero at the start (so it
      never pins the adapters at adapted == frozen, where rerouting's gradient is zero too) and grows
      with the drift of the benign representations.
    """
    frozen = frozen.float()
    dist = torch.linalg.vector_norm(adapted.float() - frozen, ord=2, dim=-1)
    if distance in ("relative", "relative_squared"):
        dist = dist / torch.linalg.vector_norm(frozen, ord=2, dim=-1).clamp_min(1e-6)
        if distance == "relative_squared":
            dist = dist.square()
    elif distance != "l2":
        raise ValueError(f"unknown retain distance {distance!r}; choose l2, relative or relative_squared")
    return _masked_mean(dist, mask, count)


def center_sums(frozen: Tensor, mask: Tensor) -> Tensor:
    """[L, H + 1]: per layer, the frozen states summed over the masked tokens, and their count. Sums of
    several chunks (and devices) add up, so `center_from_sums` of the total is the whole batch's mean."""
    w = mask.to(frozen.dtype)[None, :, :, None]
    return torch.cat([(frozen * w).sum(dim=(1, 2)), w.sum(dim=(1, 2)).expand(frozen.shape[0], 1)], dim=-1)


def center_from_sums(sums: Tensor, dtype: torch.dtype) -> Tensor:
    """[L, 1, 1, H]: the mean of `center_sums` (summed in float32), in `dtype`: what `centered` removes."""
    sums = sums.float()
    return (sums[:, :-1] / sums[:, -1:].clamp_min(1.0)).to(dtype)[:, None, None, :]


def for_cosine(
    adapted: Tensor,
    frozen: Tensor,
    mask: Tensor,
    mode: Representation = "raw",
    outlier_dims: Sequence[int] = (),
    center: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The representation the rerouting cosine sees (issue 10).

    - raw: the hidden states as they are (paper).
    - centered: the frozen per-dimension mean over the batch's masked tokens, per layer, removed from
      both, so a few high-energy dimensions shared by every token no longer pin the cosine near 1.
      `center` [L, 1, 1, H]: that mean when computed beforehand over more than these rows (a batch run in
      chunks, several devices: `center_sums`, `center_from_sums`); None: the mean over `mask` here.
    - no_outliers: the given dimensions (found from frozen activation statistics) set to zero in both.
    """
    if mode == "raw":
        return adapted, frozen
    if mode == "centered":
        if center is None:
            center = center_from_sums(center_sums(frozen.detach(), mask), frozen.dtype)
        return adapted - center, frozen - center
    if mode == "no_outliers":
        keep = torch.ones(frozen.shape[-1], dtype=frozen.dtype, device=frozen.device)
        keep[list(outlier_dims)] = 0
        return adapted * keep, frozen * keep
    raise ValueError(f"unknown representation {mode!r}; choose raw, centered or no_outliers")


def dimension_energy(frozen: Tensor, mask: Tensor) -> Tensor:
    """[H]: the summed squared activation of each hidden dimension over masked tokens and layers."""
    w = mask.to(frozen.dtype)[None, :, :, None]
    return (frozen.float() ** 2 * w).sum(dim=(0, 1, 2))


def top_dimensions(energy: Tensor, k: int) -> list[int]:
    """The `k` dimensions of largest energy, in increasing order."""
    return torch.topk(energy, k).indices.sort().values.tolist() if k > 0 else []


def outlier_dimensions(frozen: Tensor, mask: Tensor, k: int) -> list[int]:
    """The `k` hidden dimensions with the largest mean squared activation over masked tokens and layers."""
    return top_dimensions(dimension_energy(frozen, mask), k)


def coefficients(
    step: int,
    max_steps: int,
    alpha: float,
    schedule: Schedule = "dual",
    decay_multiplier: float = 2.0,
    retain_weight: float = 1.0,
    warmup_steps: int = 0,
) -> tuple[float, float]:
    """(c_cb, c_retain) at optimizer step `step` of `max_steps` (T), with p = min(1, t / (m T)):

    - dual (paper): c_cb = alpha (1 - p), c_retain = alpha p.
    - cosine: c_cb = alpha (1 + cos(pi p)) / 2, c_retain = alpha (1 - cos(pi p)) / 2.
    - single: c_cb = alpha (1 - p), c_retain = retain_weight (constant).

    During a rerouting-only warm-up (`step < warmup_steps`) c_retain is 0 (issue 10); the schedule
    itself still runs on the global step, so resuming or accumulating gradients changes nothing.
    """
    if max_steps <= 0:
        raise ValueError("max_steps must be positive")
    p = min(1.0, step / (decay_multiplier * max_steps))
    if schedule == "dual":
        c_cb, c_retain = alpha * (1 - p), alpha * p
    elif schedule == "cosine":
        c = (1 + math.cos(math.pi * p)) / 2
        c_cb, c_retain = alpha * c, alpha * (1 - c)
    elif schedule == "single":
        c_cb, c_retain = alpha * (1 - p), retain_weight
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose dual, cosine or single")
    if step < warmup_steps:
        c_retain = 0.0
    return c_cb, c_retain
