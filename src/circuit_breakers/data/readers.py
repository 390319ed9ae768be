"""Line-numbered readers for CSV and JSON files: every row or item comes with the line it starts on.

The public-format loaders check each row's schema; when a check fails, the `DataError` names the file
and that line so a user can fix the file. Nothing here knows any data set's columns.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fileio import decode_utf8
from .records import DataError, data_file, iter_jsonl

__all__ = ["LineCounter", "existing_file", "json_items", "json_object", "read_csv", "text_field"]


def existing_file(path: str | Path) -> Path:
    """`path` as a Path, or a `DataError` naming it when there is no such file."""
    return data_file(path)


def not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8, naming the line of its first undecodable byte (a text
    reader decodes ahead in blocks, so its position says nothing about the line)."""
    try:
        decode_utf8(path.read_bytes(), path, DataError)
    except DataError as err:
        return err
    return DataError(f"{path}: not UTF-8 text")


def read_csv(path: str | Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(first line of the row, row) for each CSV row; a missing column or a ragged row raises."""
    path = existing_file(path)
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            header = reader.fieldnames
        except csv.Error as err:
            raise DataError(f"{path}:1: unreadable CSV header ({err})") from err
        except UnicodeDecodeError as err:
            raise not_utf8(path) from err
        if not header:
            raise DataError(f"{path}:1: empty file (expected a header with {', '.join(required)})")
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {missing}; the header has {list(header)}")
        line = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataError(f"{path}:{reader.line_num}: unreadable CSV row ({err})") from err
            except UnicodeDecodeError as err:
                raise not_utf8(path) from err
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{path}:{line}: expected {len(header)} fields, got a different number")
            yield line, row
            line = reader.line_num + 1


def text_field(path: Path, line: int, row: Mapping[str, Any], key: str) -> str:
    """`row[key]` when it is non-empty text; otherwise a `DataError` naming the file, line and key."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}:{line}: `{key}` must be non-empty text")
    return value


def json_object(path: Path, line: int, item: Any) -> Mapping[str, Any]:
    """`item` when it is a JSON object; otherwise a `DataError` naming the file and line."""
    if not isinstance(item, dict):
        raise DataError(f"{path}:{line}: expected a JSON object, got {type(item).__name__}")
    return item


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def json_items(path: str | Path, key: str | None = None) -> list[tuple[int, Any]]:
    """(line, item) for each item of a JSON array (or of `obj[key]`), or of a JSONL file.

    Parsing item by item keeps the line number of every item, so a schema error can name its line.
    """
    path = existing_file(path)
    if path.suffix == ".jsonl":
        if key is not None:
            raise DataError(f"{path}: expected a JSON file with a `{key}` field, got JSONL")
        return list(iter_jsonl(path))
    text = decode_utf8(path.read_bytes(), path, DataError)
    decoder = json.JSONDecoder()
    lines = LineCounter(text)

    def fail(pos: int, msg: str) -> DataError:
        return DataError(f"{path}:{lines.at(pos)}: {msg}")

    def decode(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
        except RecursionError as err:
            raise fail(pos, "invalid JSON (nested too deeply)") from err
        except ValueError as err:  # e.g. an integer with more digits than Python converts
            raise fail(pos, f"invalid JSON ({str(err)[:200]})") from err

    pos = _skip_ws(text, 0)
    if key is not None:  # walk the top-level object to the value of `key`
        if text[pos : pos + 1] != "{":
            raise fail(pos, f"expected a JSON object with a `{key}` list")
        pos = _skip_ws(text, pos + 1)
        while True:
            if text[pos : pos + 1] == "}" or pos >= len(text):
                raise fail(pos, f"no `{key}` field")
            name, pos = decode(pos)
            pos = _skip_ws(text, pos)
            if text[pos : pos + 1] != ":":
                raise fail(pos, "invalid JSON (expected ':')")
            pos = _skip_ws(text, pos + 1)
            if name == key:
                break
            _, pos = decode(pos)
            pos = _skip_ws(text, pos)
            if text[pos : pos + 1] == ",":
                pos = _skip_ws(text, pos + 1)
    if text[pos : pos + 1] != "[":
        raise fail(pos, "expected a JSON list of objects")
    items: list[tuple[int, Any]] = []
    pos = _skip_ws(text, pos + 1)
    if text[pos : pos + 1] == "]":
        return items
    while True:
        item, end = decode(pos)
        items.append((lines.at(pos), item))
        pos = _skip_ws(text, end)
        if text[pos : pos + 1] == ",":
            pos = _skip_ws(text, pos + 1)
        elif text[pos : pos + 1] == "]":
            break
        else:
            raise fail(pos, "invalid JSON (expected ',' or ']')")
    if key is None and _skip_ws(text, pos + 1) < len(text):
        raise fail(_skip_ws(text, pos + 1), "invalid JSON (extra data after the list)")
    return items


class LineCounter:
    """Line numbers of increasing character offsets in O(total length)."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        """The 1-based line of character offset `pos` (fast when offsets only increase)."""
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line
