"""The `Prompt` value: one request to send to a model, its prompt JSONL files and the packaged sets.

Prompt-only data (HarmBench, AdvBench, XSTest, ... read by `loaders`, or any `datasets` source read by
`datasets_io`) becomes `Prompt`s, which `generate.py` turns into records with the model's own
completions and evaluation sends to the models it compares.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import write_jsonl_atomic
from .readers import existing_file
from .records import DataError, iter_jsonl

__all__ = ["BUILTIN_PROMPT_SETS", "Prompt", "load_builtin_prompts", "read_prompts", "stable_id", "write_prompts"]

BUILTIN_PROMPT_SETS: tuple[str, ...] = ("benign", "borderline")


def stable_id(text: str, messages: Any = None) -> str:
    """An id that is the same on every run for the same content (resuming generation relies on it)."""
    payload = json.dumps(messages if messages else text, sort_keys=True, ensure_ascii=False)
    return "p-" + hashlib.sha1(payload.encode("utf-8")).hexdigest()[:12]


@dataclass
class Prompt:
    """One request to send to a model: what evaluation and `generate_completions` consume.

    `text` is the full user turn (for HarmBench contextual behaviours the context comes first);
    `context` keeps the context on its own for judges that want it; `target` is an affirmative
    opening ("Sure, here is ...") usable as a prefill. `messages`, when set, is a multi-turn chat
    ending with the user turn whose text is `text`.
    """

    id: str
    text: str
    category: str | None = None
    source: str | None = None
    context: str | None = None
    target: str | None = None
    messages: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_messages(self, system_prompt: str | None = None) -> list[dict[str, Any]]:
        """Chat messages for this prompt; `system_prompt` is added unless the chat has a system turn."""
        messages = [dict(m) for m in self.messages] if self.messages else [{"role": "user", "content": self.text}]
        if system_prompt is not None and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict without empty optional fields."""
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, [])}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], default_id: str | None = None) -> Prompt:
        """From `{"text": ...}` or `{"messages": [...]}` (ending with a user turn); other keys go to meta."""
        if not isinstance(row, Mapping):
            raise DataError("a prompt row must be a JSON object")
        messages = row.get("messages")
        text = row.get("text", row.get("prompt"))
        if messages is not None:
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise DataError("`messages` must be a non-empty list of {role, content} objects")
            if messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), str):
                raise DataError("a multi-turn prompt must end with a user turn")
            text = text if text is not None else messages[-1]["content"]
        if not isinstance(text, str) or not text.strip():
            raise DataError("a prompt needs non-empty `text` (or `messages`)")
        known = {"id", "text", "prompt", "category", "source", "context", "target", "messages", "meta"}
        meta = dict(row.get("meta") or {}) | {k: v for k, v in row.items() if k not in known}
        return cls(
            id=str(row.get("id") if row.get("id") is not None else default_id or stable_id(text, messages)),
            text=text,
            category=row.get("category"),
            source=row.get("source"),
            context=row.get("context"),
            target=row.get("target"),
            messages=messages,
            meta=meta,
        )


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from JSONL rows `{"id", "text" | "messages", "category", ...}`; errors name the line."""
    path = existing_file(path)
    prompts = []
    seen: set[str] = set()
    for line, row in iter_jsonl(path):
        try:
            prompt = Prompt.from_dict(row)
        except DataError as err:
            raise DataError(f"{path}:{line}: {err}") from err
        if prompt.id in seen:
            raise DataError(f"{path}:{line}: duplicate id {prompt.id!r}")
        seen.add(prompt.id)
        prompts.append(prompt)
    return prompts


def write_prompts(prompts: Iterable[Prompt], path: str | Path) -> Path:
    """Write prompts as JSONL (the format `read_prompts` and `load_prompt_file` read), atomically."""
    return write_jsonl_atomic(path, (prompt.to_dict() for prompt in prompts))


def load_builtin_prompts(name: str) -> list[Prompt]:
    """The project's own prompt sets, shipped as package data: `benign` and `borderline`.

    Written for this project (no rows copied from other datasets); harmful prompts are never shipped.
    """
    if name not in BUILTIN_PROMPT_SETS:
        raise DataError(f"unknown built-in prompt set {name!r}; choose one of {BUILTIN_PROMPT_SETS}")
    resource = importlib.resources.files("circuit_breakers") / "prompts" / f"{name}.jsonl"
    with importlib.resources.as_file(resource) as path:
        prompts = read_prompts(path)
    for prompt in prompts:
        prompt.source = prompt.source or f"builtin:{name}"
    return prompts
