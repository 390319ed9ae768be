"""Capability retention: teacher-forced loss on held-out benign completions, and an optional bridge
to lm-evaluation-harness (MMLU etc.) for users with a GPU.

The loss is the mean cross-entropy per completion token (prompt tokens excluded, end-of-turn
included) with masks from `data.render`, the same masks training uses, so "the retain set's loss
went up by x" means the same thing in training logs and here. A circuit breaker that keeps benign
behaviour leaves this loss where the base model had it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..data.batching import pad_examples
from ..data.records import Record
from ..data.render import render_all


@dataclass
class LossResult:
    """Teacher-forced loss over the completion tokens of some records."""

    mean_loss: float
    perplexity: float
    mean_record_loss: float
    n_tokens: int
    n_records: int
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    record_losses: list[float] = field(default_factory=list)

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_records:
            out.pop("record_losses")
        return out


@torch.no_grad()
def _example_losses(
    model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int, progress: bool = False
) -> list[tuple[float, int]]:
    """(summed loss, counted tokens) per rendered example, in the order given.

    Batches are formed from length-sorted examples (little padding); results are put back in order.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="capability loss", leave=False):
            index = order[start : start + batch_size]
            batch = [examples[i] for i in index]
            ids, attention, mask = pad_examples(batch, pad)
            width = ids.shape[1]
            ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
            # Token t is predicted from position t-1: a mask on the first token has no prediction.
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(batch), width - 1)
            weights = mask[:, 1:].float()
            for row, i in enumerate(index):
                out[i] = (float((nll[row] * weights[row]).sum()), int(weights[row].sum()))
    finally:
        if was_training:
            model.train()
    return out


def teacher_forced_loss(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
) -> LossResult:
    """Mean loss per completion token of `records` (chat records whose completion is the reference
    answer). Rows that cannot be rendered are counted in `dropped`, never silently lost;
    `record_losses` follow the order of the rendered records."""
    rendered = render_all(tokenizer, records, mask_mode="completion", max_length=max_length)
    sums = _example_losses(model, tokenizer, rendered.examples, batch_size, progress)
    total, count = sum(s for s, _ in sums), sum(c for _, c in sums)
    per_record = [s / max(c, 1) for s, c in sums]
    mean = total / count if count else math.nan
    return LossResult(
        mean_loss=mean,
        perplexity=math.exp(mean) if count else math.nan,
        mean_record_loss=sum(per_record) / len(per_record) if per_record else math.nan,
        n_tokens=count,
        n_records=len(rendered.examples),
        dropped=dict(rendered.dropped),
        truncated=rendered.truncated,
        record_losses=per_record,
    )


def record_losses(
    model: Any, tokenizer: Any, records: Sequence[Record], batch_size: int = 8, max_length: int = 512
) -> list[float]:
    """Mean loss per completion token of each record, aligned with `records` (NaN where a record
    cannot be rendered or has no completion token), so two models' losses pair record by record."""
    examples, where = [], []
    for i, record in enumerate(records):
        rendered = render_all(tokenizer, [record], mask_mode="completion", max_length=max_length)
        if rendered.examples:
            examples.append(rendered.examples[0])
            where.append(i)
    out = [math.nan] * len(records)
    for i, (total, count) in zip(where, _example_losses(model, tokenizer, examples, batch_size)):
        out[i] = total / count if count else math.nan
    return out


def lm_eval_available() -> bool:
    """Whether the optional lm-evaluation-harness bridge can run (`pip install lm-eval`)."""
    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(
    model_path: str,
    tasks: Sequence[str] = ("mmlu",),
    batch_size: int | str = "auto",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on a saved model folder (a merged circuit-broken model or its
    base) and return its per-task results. Optional: needs `lm_eval` and, in practice, a GPU."""
    if not lm_eval_available():
        raise ImportError("the lm-evaluation-harness bridge needs `pip install lm-eval` (GPU recommended)")
    import lm_eval

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_path},dtype={dtype}",
        tasks=list(tasks),
        batch_size=batch_size,
        limit=limit,
        num_fewshot=num_fewshot,
        device=device,
    )
    return {"tasks": list(tasks), "results": output.get("results", {}), "limit": limit, "num_fewshot": num_fewshot}
