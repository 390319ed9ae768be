"""Where text appended to the last user turn lands in a chat template's rendering.

Both the attacks (a suffix or soft prompt at the end of the user's request) and the trainer's suffix
adversary (placeholders inserted at the same spot) need the exact text the template writes before and
after that point; this module is the one place that renders it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]

# A string no chat template produces or rewrites; rendering with it in place of the appended part of
# the user turn shows exactly which text comes before and after that part.
SLOT = "\u2063<<attack-slot>>\u2063"


class SlotError(ValueError):
    """A conversation or chat template with no single place for text appended to the user turn."""


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of rendered text: the template already holds any BOS, so none is added (as in
    `data.render`)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def with_suffix(messages: Sequence[Message], suffix: str) -> list[Message]:
    """A copy of `messages` with `suffix` appended verbatim to the last user turn."""
    out = copy.deepcopy(list(messages))
    for message in reversed(out):
        if message.get("role") == "user":
            message["content"] = str(message.get("content") or "") + suffix
            return out
    raise SlotError("the conversation has no user turn to append text to")


def split_at_slot(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    suffix_slot: bool = True,
    prefill: str | None = None,
) -> tuple[str, str]:
    """Render the prompt with a marker at the end of the last user turn and cut the text there.

    The parts are exactly what the template makes of the conversation, so a suffix or soft prompt
    placed between them sits where the chat template would put text appended to the user turn.
    """
    text = tokenizer.apply_chat_template(
        with_suffix(messages, SLOT) if suffix_slot else list(messages), tokenize=False, add_generation_prompt=True
    )
    if text.count(SLOT) != 1:
        raise SlotError("the chat template dropped or repeated the user turn; cannot place text at its end")
    before, after = text.split(SLOT)
    return before, after + (prefill or "")
