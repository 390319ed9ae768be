"""ShareGPT / LLaMA-Factory chats (turns and a `tools` field) as Hugging Face chat messages.

Both the ShareGPT file loader and the `datasets` loader read this layout; the conversion lives here
once so that a chat read either way gives the same messages and tool calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .records import DataError

__all__ = ["sharegpt_to_messages", "tool_schemas"]

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "function_call": "function_call",
    "tool_call": "function_call",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}


def _tool_calls(value: Any, counter: list[int]) -> list[dict[str, Any]]:
    """LLaMA-Factory function_call value (one `{name, arguments}` or a list) -> HF `tool_calls`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"function_call is not valid JSON ({err.msg})") from err
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise DataError("a function_call needs a `name`")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # keep the string: some datasets store free-form arguments
        counter[0] += 1
        # Nine alphanumeric characters: the shape Mistral's templates insist on.
        function = {"name": call["name"], "arguments": arguments}
        out.append({"id": f"call{counter[0]:05d}", "type": "function", "function": function})
    return out


def sharegpt_to_messages(turns: Sequence[Mapping[str, Any]], system: str | None = None) -> list[dict[str, Any]]:
    """ShareGPT / LLaMA-Factory turns (`from`/`value` or `role`/`content`) -> HF chat messages.

    `function_call` turns become assistant turns with `tool_calls`; `observation` turns become `tool`
    messages answering the pending calls in order.
    """
    if not isinstance(turns, (list, tuple)) or not turns:
        raise DataError("the conversation must be a non-empty list of turns")
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    counter = [0]
    pending: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise DataError(f"turn {i} is not an object")
        speaker = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = _SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise DataError(f"turn {i} has unknown speaker {speaker!r}")
        if role == "function_call":
            try:
                calls = _tool_calls(value, counter)
            except DataError as err:
                raise DataError(f"turn {i}: {err}") from err
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            pending = list(calls)
            continue
        if not isinstance(value, str):
            raise DataError(f"turn {i} ({speaker}) has no text value")
        if role == "tool":
            message: dict[str, Any] = {"role": "tool", "content": value}
            if pending:
                call = pending.pop(0)
                message |= {"tool_call_id": call["id"], "name": call["function"]["name"]}
            messages.append(message)
            continue
        messages.append({"role": role, "content": value})
    return messages


def tool_schemas(value: Any) -> list[dict[str, Any]] | None:
    """A `tools` field (JSON string or list of function schemas) -> HF tool schemas, or None."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"`tools` is not valid JSON ({err.msg})") from err
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError("`tools` must be a list of function schemas")
    if not value:
        return None
    return [t if "type" in t and "function" in t else {"type": "function", "function": t} for t in value]
