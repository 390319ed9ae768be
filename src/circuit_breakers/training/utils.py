"""Small pieces of the training step that know nothing of the Trainer: row chunks, soft-suffix slots, the
step's token counts and a sampler whose order depends only on (seed, epoch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..config import ConfigError


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler, with an order that depends only on (seed, epoch).

    The plain one shuffles with the global RNG as it is when an epoch starts; a run resumed in the middle
    of epoch 2 or later draws that epoch's order from another RNG state and so trains on other batches
    than the uninterrupted run did. The epoch comes from the trainer's state (`epoch_of`), not from
    `set_epoch`, which accelerate's batch-skipping wrapper does not pass on under several processes.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int, epoch_of: Callable[[], float]) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch_of = seed, epoch_of

    def __iter__(self) -> Any:
        self.generator = torch.Generator().manual_seed(self.seed + int(self.epoch_of() or 0))
        return super().__iter__()


def chunk_rows(attention_mask: Tensor, max_tokens: int) -> list[tuple[Tensor, int]]:
    """Rows grouped into chunks of at most `max_tokens` padded tokens (always at least one row), longest
    rows first, each chunk trimmed to its own longest row: [(row indices, width)].

    Sorting by length means short rows no longer pad to the batch's longest one. `max_tokens <= 0`:
    one chunk with every row.
    """
    present = attention_mask.bool()
    cols = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    ends = (present * cols).amax(dim=1).tolist()  # one past the last real token (right or left padding)
    if max_tokens <= 0:
        return [(torch.arange(len(ends)), max(ends, default=0))]
    order = sorted(range(len(ends)), key=lambda i: -ends[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * ends[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [(torch.tensor(sorted(g)), ends[g[0]]) for g in groups]


def take_rows(rows: Tensor | None, width: int | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """A chunk's rows of each tensor, cut to its width (all of each tensor when `rows` is None)."""
    if rows is None:
        return tensors
    rows = rows.to(tensors[0].device)
    return tuple(t.index_select(0, rows)[:, :width] for t in tensors)


def insert_slots(
    inputs: dict[str, Tensor], slot_ids: Tensor, turn_end: Tensor, pad_id: int
) -> tuple[dict[str, Tensor], Tensor]:
    """The batch with `slot_ids` inserted into each circuit-breaker row right before the last occurrence of
    `turn_end` (the template's tokens after the user's text: where the embedding attack puts its soft
    prompt); other rows are right-padded by as many tokens, so the batch stays rectangular. Inserted
    tokens are attended to and lie outside both loss masks. Returns the new batch and the [B, T + k]
    mask of the inserted positions. A circuit-breaker row without `turn_end` is refused."""
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    k, n = len(slot_ids), len(turn_end)
    is_cb = ((inputs["cb_mask"] * attn) > 0).any(dim=1)
    pieces: dict[str, list[Tensor]] = {key: [] for key, value in inputs.items() if value.shape == ids.shape}
    slots = torch.zeros(ids.shape[0], ids.shape[1] + k, dtype=torch.bool, device=ids.device)
    for row in range(ids.shape[0]):
        at = ids.shape[1]
        if is_cb[row]:
            hits = torch.zeros(0)
            if ids.shape[1] >= n:
                windows, present = ids[row].unfold(0, n, 1), attn[row].unfold(0, n, 1) > 0
                hits = ((windows == turn_end).all(dim=1) & present.all(dim=1)).nonzero()
            if len(hits) == 0:
                raise ConfigError(
                    f"lat_positions=suffix: circuit-breaker row {row} has no end of a user turn (the chat template's "
                    f"token ids {turn_end.tolist()}) to put the soft suffix before"
                )
            at = int(hits[-1])
            slots[row, at : at + k] = True
        for key in pieces:
            if key == "input_ids":
                fill = slot_ids if is_cb[row] else torch.full((k,), pad_id)
            elif key == "attention_mask":
                fill = torch.full((k,), int(is_cb[row]))
            else:  # loss masks
                fill = torch.zeros(k)
            value = inputs[key]
            pieces[key].append(torch.cat([value[row, :at], fill.to(value), value[row, at:]]))
    return {**inputs, **{key: torch.stack(rows) for key, rows in pieces.items()}}, slots


def step_counts(num_items_in_batch: Any) -> Tensor | None:
    """The trainer's `_get_num_items_in_batch` value ([circuit-breaker, retain] tokens of the optimizer
    step), or None when the step was called directly (the loss is then a mean over this batch)."""
    if isinstance(num_items_in_batch, Tensor) and num_items_in_batch.numel() == 2:
        return num_items_in_batch
    return None
