"""One typed record for every data set: circuit-breaker, retain and refusal-retain examples."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..fileio import decode_utf8, write_jsonl_atomic

Kind = Literal["circuit_breaker", "retain", "refusal_retain"]
KINDS: tuple[str, ...] = ("circuit_breaker", "retain", "refusal_retain")
ROLES = {"system", "user", "assistant", "tool", "ipython"}


class DataError(ValueError):
    """Bad input data; the message names the file and line when there is one."""


@dataclass
class Record:
    """A chat whose completion turn (default: the last assistant turn) is what the losses look at.

    `messages` use the OpenAI / Hugging Face chat format (`role`, `content`, optional `tool_calls`);
    `tools` holds JSON schemas for templates that render them.
    """

    messages: list[dict[str, Any]]
    kind: Kind = "circuit_breaker"
    completion_index: int | None = None
    tools: list[dict[str, Any]] | None = None
    category: str | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown kind {self.kind!r}; choose one of {KINDS}")
        if not isinstance(self.messages, list) or not self.messages:
            raise DataError("messages must be a non-empty list")
        for i, message in enumerate(self.messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise DataError(f"message {i} needs a role in {sorted(ROLES)}")
            if not isinstance(message.get("content", ""), (str, type(None), list)):
                raise DataError(f"message {i} content must be text")
        turns = [m["role"] for m in self.messages if m["role"] != "system"]
        if turns[:1] == ["assistant"] and "user" in turns:
            raise DataError(
                "the chat starts with an assistant turn before the first user turn; chat templates expect the "
                "user to speak first (a completion alone, with no user turn, is allowed)"
            )
        index = self.completion_turn
        if self.messages[index]["role"] != "assistant":
            raise DataError(f"completion turn {index} is not an assistant turn")

    @property
    def completion_turn(self) -> int:
        """Index of the completion turn in `messages`."""
        if self.completion_index is not None:
            if not -len(self.messages) <= self.completion_index < len(self.messages):
                raise DataError(f"completion_index {self.completion_index} out of range")
            return self.completion_index % len(self.messages)
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "assistant":
                return i
        raise DataError("no assistant turn to use as completion")

    @property
    def prompt(self) -> str:
        """Text of the last user turn before the completion (for reports and splits)."""
        for message in reversed(self.messages[: self.completion_turn]):
            if message["role"] == "user":
                return str(message.get("content") or "")
        return ""

    @property
    def completion(self) -> str:
        """Text of the completion turn."""
        return str(self.messages[self.completion_turn].get("content") or "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict without empty optional fields."""
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, [])}

    @classmethod
    def from_dict(cls, row: dict[str, Any], kind: Kind | None = None) -> Record:
        """Build from a dict with at least `messages`; unknown keys go to `meta`."""
        if not isinstance(row, dict) or "messages" not in row:
            raise DataError("row needs a `messages` list")
        known = {"messages", "kind", "completion_index", "tools", "category", "source", "meta"}
        meta = dict(row.get("meta") or {}) | {k: v for k, v in row.items() if k not in known}
        return cls(
            messages=row["messages"],
            kind=kind or row.get("kind", "circuit_breaker"),
            completion_index=row.get("completion_index"),
            tools=row.get("tools"),
            category=row.get("category"),
            source=row.get("source"),
            meta=meta,
        )

    @classmethod
    def from_prompt(cls, prompt: str, completion: str, kind: Kind, **kwargs: Any) -> Record:
        """A single-turn record."""
        return cls(
            messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            kind=kind,
            **kwargs,
        )


def data_file(path: str | Path) -> Path:
    """`path` as a Path when it is a file; a DataError saying what it is otherwise."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def parse_jsonl_line(path: Path, number: int, raw: bytes) -> Any:
    """The JSON value on one line (None for a blank line); undecodable text, invalid JSON, values nested
    too deeply or numbers too long raise a DataError naming the file and line."""
    line = decode_utf8(raw, path, DataError, number)
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number}: invalid JSON ({err.msg})") from err
    except RecursionError as err:
        raise DataError(f"{path}:{number}: invalid JSON (nested too deeply)") from err
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise DataError(f"{path}:{number}: invalid JSON ({str(err)[:200]})") from err


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line raises DataError naming it."""
    path = data_file(path)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                yield number, parse_jsonl_line(path, number, raw)


def read_records(path: str | Path, kind: Kind | None = None, dropped: Counter | None = None) -> list[Record]:
    """Records from a JSONL file of `{"messages": [...], ...}` rows; errors name file and line.

    With `dropped` given, bad rows (invalid JSON, invalid record) are counted there under "malformed"
    and skipped instead of raising, so a training run or `data inspect` survives a few bad lines.
    """
    path = data_file(path)
    records = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                row = parse_jsonl_line(path, number, raw)
            except DataError:
                if dropped is None:
                    raise
                dropped["malformed"] += 1
                continue
            try:
                records.append(Record.from_dict(row, kind))
            except (TypeError, ValueError) as err:
                if dropped is None:
                    raise DataError(f"{path}:{number}: {err}") from err
                dropped["malformed"] += 1
    return records


def write_records(records: Iterable[Record], path: str | Path) -> Path:
    """Write records as JSONL (atomically: a crash leaves the old file or the new one, never a torn one)."""
    return write_jsonl_atomic(path, (record.to_dict() for record in records))
