"""Capability-bounded weight interpolation between a model and a further-trained copy of it.

Why: hardening a circuit breaker (RR + LAT, `lat_epsilon > 0`) costs capability by an amount that varies
with the seed, from nothing to doubling the benign loss, on a 135M model. Walking the straight line in
weight space from the model training started from (the vanilla circuit breaker) to the hardened one,
`start + w (end - start)` (weight-space ensembling, as WiSE-FT does for fine-tuning), the cost is not
spread evenly: on the embedded model it stays near the start's until close to the end. So the largest `w`
whose benign-loss change against the base model stays within a budget keeps a run inside the main job's
capability limit by construction and keeps what hardening happened before the cost. The budget is read on
validation records (not the held-out set that reports the result), and `w` is searched from 1 downwards
on a grid, not bisected: the loss change along the line is not monotone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.records import Record
from ..evaluation.tamper.weights import InterpolationError, check_compatible, set_interpolated

DEFAULT_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


@dataclass
class Interpolation:
    """The chosen weight and every weight tried, with its benign-loss change against the base model."""

    weight: float
    loss_change: float
    max_loss_change: float
    tried: list[tuple[float, float]] = field(default_factory=list)
    start: str = ""
    end: str = ""
    base: str = ""
    n_records: int = 0


def interpolate_within_budget(
    start: str | Path,
    end: str | Path,
    records: Sequence[Record],
    base: str = "embedded",
    max_loss_change: float = 0.05,
    grid: Sequence[float] = DEFAULT_GRID,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[nn.Module, Interpolation]:
    """The model at the largest grid weight whose teacher-forced loss on `records` is at most
    `1 + max_loss_change` times the base model's, and how it was chosen. Raises InterpolationError
    when no weight on the grid is within the budget (the start itself may not be). The models are read on
    `device` in `dtype`; the start and end weights are kept on the CPU in float32 (the sums are made there)
    beside the model, three copies of the weights in all."""
    from ..evaluation.capability import teacher_forced_loss
    from ..models import load_model, load_tokenizer, resolve_device, resolve_dtype

    if not records:
        raise InterpolationError("no validation records to read the budget on")
    start, end = str(start), str(end)
    tokenizer = load_tokenizer(base)
    base_model = load_model(base, dtype=dtype, device=device)
    base_loss = teacher_forced_loss(base_model, tokenizer, records, batch_size=batch_size).mean_loss
    del base_model
    end_state = {k: v.detach() for k, v in load_model(end, dtype=torch.float32).state_dict().items()}
    model = load_model(start, dtype=torch.float32)
    start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    where = resolve_device(device)
    model = model.to(where, resolve_dtype(dtype, where))
    check_compatible(start_state, end_state)
    result = Interpolation(
        weight=float("nan"),
        loss_change=float("nan"),
        max_loss_change=max_loss_change,
        start=start,
        end=end,
        base=str(base),
        n_records=len(records),
    )
    for weight in sorted(grid, reverse=True):
        set_interpolated(model, start_state, end_state, weight)
        change = teacher_forced_loss(model, tokenizer, records, batch_size=batch_size).mean_loss / base_loss - 1
        result.tried.append((weight, change))
        if change <= max_loss_change:
            result.weight, result.loss_change = weight, change
            return model, result
    table = ", ".join(f"{w:g}: {c:+.1%}" for w, c in result.tried)
    raise InterpolationError(f"no weight keeps the loss change within {max_loss_change:+.1%} ({table})")


def save_interpolation(model: nn.Module, result: Interpolation, out_dir: str | Path, overwrite: bool = False) -> Path:
    """The chosen model, the start model's tokenizer and `interpolation.json` (the weight and the
    readings behind it). An `out_dir` holding anything is replaced only with `overwrite`."""
    from ..models import load_tokenizer, save_model

    record = json.dumps(asdict(result), indent=2)
    return save_model(model, load_tokenizer(result.start), out_dir, {"interpolation.json": record}, overwrite)
