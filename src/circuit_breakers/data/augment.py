"""The paper's data augmentations, as options (Zou et al. 2024, section 4 and appendix).

- Rerouting examples with the user turn removed: the harmful completion alone must trip the breaker,
  so the rerouting does not hinge on recognising the request.
- Retain examples from refusal data: the model's refusals to harmful prompts kept as retain data, so
  that rerouting harmful *content* does not also wipe out the ability to refuse harmful *requests*.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Sequence
from typing import Literal

from .records import DataError, Record
from .refusal import looks_like_refusal

__all__ = ["as_refusal_retain", "drop_user_turns", "without_user_turn", "xstest_refusal_retain"]


def without_user_turn(record: Record, mode: Literal["drop", "empty"] = "drop") -> Record:
    """A copy of `record` whose turns before the completion keep only the system turns.

    `drop` removes the user (and earlier assistant/tool) turns; `empty` keeps one user turn with empty
    text, for chat templates that insist on a user turn before the assistant.
    """
    if mode not in ("drop", "empty"):
        raise DataError(f"unknown mode {mode!r}; choose drop or empty")
    turn = record.completion_turn
    head = [dict(m) for m in record.messages[:turn] if m["role"] == "system"]
    if mode == "empty":
        head.append({"role": "user", "content": ""})
    messages = head + [copy.deepcopy(record.messages[turn])]
    meta = dict(record.meta) | {"augmentation": "no_user_turn"}
    return Record(
        messages=messages,
        kind=record.kind,
        tools=record.tools,
        category=record.category,
        source=record.source,
        meta=meta,
    )


def drop_user_turns(
    records: Sequence[Record],
    fraction: float = 0.5,
    seed: int = 0,
    add: bool = False,
    mode: Literal["drop", "empty"] = "drop",
) -> list[Record]:
    """Apply `without_user_turn` to a seeded random `fraction` of the records.

    With `add=False` the chosen records are replaced (the set keeps its size); with `add=True` the
    stripped copies are appended to all the originals.
    """
    if not 0.0 <= fraction <= 1.0:
        raise DataError("fraction must lie in [0, 1]")
    n = round(len(records) * fraction)
    chosen = set(random.Random(seed).sample(range(len(records)), n))
    if add:
        return list(records) + [without_user_turn(records[i], mode) for i in sorted(chosen)]
    return [without_user_turn(r, mode) if i in chosen else r for i, r in enumerate(records)]


def as_refusal_retain(records: Iterable[Record], only_refusals: bool = False) -> list[Record]:
    """Copies of records (prompt + refusal) with kind `refusal_retain`.

    With `only_refusals`, completions that do not look like refusals are left out: retaining a
    compliant answer to a harmful prompt would teach the opposite of what is wanted.
    """
    out = []
    for record in records:
        if only_refusals and not looks_like_refusal(record.completion):
            continue
        copy_ = copy.deepcopy(record)
        copy_.kind = "refusal_retain"
        out.append(copy_)
    return out


def xstest_refusal_retain(records: Iterable[Record]) -> list[Record]:
    """XSTest completion records (from `load_xstest_completions`) that refuse an unsafe prompt in
    full, as human-labelled refusal-retain data."""
    return [
        r
        for r in as_refusal_retain(records)
        if r.meta.get("label") == "unsafe" and r.meta.get("final_label") == "2_full_refusal"
    ]
