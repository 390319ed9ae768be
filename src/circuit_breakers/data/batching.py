"""Paired batches: every batch holds circuit-breaker and retain examples, padded only as far as needed.

Both sets go through the model as one batch (one frozen pass and one adapted pass per step), with
two loss masks telling the rows apart. Pairs are formed between examples of similar length, and the
trainer's length-grouped sampler keeps similar pairs together, so little compute goes to padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from .records import DataError
from .render import Example


class PairedDataset(Dataset):
    """Item i = one circuit-breaker example and `retain_per_cb` retain examples of similar length.

    Its length is set by the larger set, so every example of both sets is seen each epoch.
    """

    def __init__(self, circuit_breaker: Sequence[Example], retain: Sequence[Example], retain_per_cb: int = 1):
        if not circuit_breaker:
            raise DataError("the circuit-breaker set is empty (every row was dropped or none was given)")
        if not retain:
            raise DataError("the retain set is empty (every row was dropped or none was given)")
        if retain_per_cb < 1:
            raise DataError("retain_per_cb must be at least 1")
        self.cb = sorted(circuit_breaker, key=len)
        self.retain = sorted(retain, key=len)
        self.k = retain_per_cb
        self.n = max(len(self.cb), -(-len(self.retain) // self.k))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        cb = self.cb[i * len(self.cb) // self.n]
        base = i * len(self.retain) // self.n
        retain = [self.retain[(base + j) % len(self.retain)] for j in range(self.k)]
        return {"cb": cb, "retain": retain}

    @property
    def lengths(self) -> list[int]:
        """Padded length each item needs (for length-grouped sampling)."""
        return [max(len(item["cb"]), *(len(r) for r in item["retain"])) for item in (self[i] for i in range(self.n))]


@dataclass
class PairedCollator:
    """Stack circuit-breaker rows then retain rows, right-padded to the longest row of the batch.

    Returns `input_ids`, `attention_mask`, `cb_mask` (loss tokens of circuit-breaker rows, 0 on retain
    rows) and `retain_mask` (the reverse). Padding is 0 in all masks.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cb_rows = [item["cb"] for item in items]
        retain_rows = [r for item in items for r in item["retain"]]
        rows: list[Example] = cb_rows + retain_rows
        width = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        loss = torch.zeros((n, width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row.input_ids)
            attention[i, : len(row)] = 1
            loss[i, : len(row)] = torch.tensor(row.loss_mask)
        is_cb = torch.zeros((n, 1), dtype=torch.long)
        is_cb[: len(cb_rows)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "cb_mask": loss * is_cb,
            "retain_mask": loss * (1 - is_cb),
        }


def pad_examples(examples: Sequence[Example], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, loss_mask), right-padded to the longest example: for scoring passes."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        attention[row, : len(e)] = 1
        mask[row, : len(e)] = torch.tensor(e.loss_mask)
    return ids, attention, mask
