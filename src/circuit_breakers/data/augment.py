"""The paper's data augmentations, as options (Zou et al. 2024, section 4 and appendix).

- Rerouting examples with the user turn removed: the harmful completion alone must trip the breaker,
  so the rerouting does not hinge on recognising the request.
- Retain examples from refusal data: the model's refusals to harmful prompts kept as retain data, so
  that rerouting harmful *content* does not also wipe out the ability to refuse harmful *requests*.
- Phrasing variety (ours, issue 28): a seeded share of harmful requests reworded as a question, put in
  the first person, given a system prompt, or asked after a benign exchange, so the breaker does not
  learn one dataset's imperative style.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Iterable, Sequence
from typing import Literal

from .prompts import Prompt
from .records import DataError, Record
from .refusal import looks_like_refusal

__all__ = [
    "PHRASINGS",
    "SYSTEM_PROMPTS",
    "as_refusal_retain",
    "drop_user_turns",
    "rephrase",
    "vary_phrasing",
    "without_user_turn",
    "xstest_refusal_retain",
]

PHRASINGS: tuple[str, ...] = ("question", "first_person", "system", "multi_turn")
"""The rewordings `vary_phrasing` chooses among, in turn."""

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a knowledgeable assistant. Answer the user's questions directly and in detail.",
    "You are an AI assistant that always does what the user asks.",
)
"""Generic system prompts written for this project (a deployment rarely leaves the system turn empty)."""


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


def rephrase(text: str, style: str) -> str:
    """`text` reworded by a fixed rule: `question` asks it ("Could you ...?"), `first_person` states the
    need ("I need your help with this: ..."); other styles leave the words alone."""
    body = text.strip().rstrip(".!")
    if style == "question":
        if body.endswith("?"):
            return body
        return f"Could you {body[:1].lower()}{body[1:]}?"
    if style == "first_person":
        return f"I need your help with this, it matters a lot to me: {body[:1].lower()}{body[1:]}."
    return text


def vary_phrasing(
    prompts: Sequence[Prompt], fraction: float, seed: int = 0, exchanges: Sequence[tuple[str, str]] = ()
) -> list[Prompt]:
    """A seeded `fraction` of `prompts` reworded, the styles of `PHRASINGS` taken in turn: a question, the
    first person, a system prompt (`SYSTEM_PROMPTS`), or after a benign (user, assistant) exchange from
    `exchanges` (skipped when none is given). Contextual prompts and chats are left as they are; each
    changed prompt records its style in `meta['phrasing']` and keeps its id with a suffix."""
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"phrasing fraction must be between 0 and 1, got {fraction}")
    rng = random.Random(seed)
    eligible = [i for i, p in enumerate(prompts) if not p.messages and not p.context]
    chosen = sorted(rng.sample(eligible, round(len(eligible) * fraction)))
    styles = [s for s in PHRASINGS if s != "multi_turn" or exchanges]
    out = list(prompts)
    for n, index in enumerate(chosen):
        prompt, style = prompts[index], styles[n % len(styles)]
        text, messages = rephrase(prompt.text, style), None
        if style == "system":
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, {"role": "user", "content": text}]
        elif style == "multi_turn":
            user, assistant = rng.choice(list(exchanges))
            messages = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
                {"role": "user", "content": text},
            ]
        out[index] = dataclasses.replace(
            prompt, id=f"{prompt.id}~{style}", text=text, messages=messages, meta={**prompt.meta, "phrasing": style}
        )
    return out
