"""Records and prompts from any source the `datasets` library reads: a hub id, a local folder, or a
json / jsonl / csv / parquet file, with a column mapping onto this project's fields.

Kept apart from the public-format loaders because it imports `datasets` (only when called) and reads
sets whose columns the user names rather than a format this project knows.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .prompts import Prompt
from .records import DataError, Kind, Record
from .sharegpt import sharegpt_to_messages, tool_schemas

__all__ = ["load_dataset_prompts", "load_dataset_records"]

_DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _load_hf(name_or_path: str | Path, split: str, field: str | None = None) -> Any:
    """A `datasets.Dataset` from a hub id, a local folder, or a local json/jsonl/csv/parquet file."""
    import datasets

    path = Path(name_or_path)
    try:
        if path.is_file():
            builder = _DATASET_BUILDERS.get(path.suffix)
            if builder is None:
                raise DataError(
                    f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_DATASET_BUILDERS)}"
                )
            kwargs = {"field": field} if field and builder == "json" else {}
            return datasets.load_dataset(builder, data_files=str(path), split=split, **kwargs)
        return datasets.load_dataset(str(name_or_path), split=split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFound, DatasetGenerationError, ...)
        raise DataError(f"{name_or_path}: cannot load with `datasets` ({type(err).__name__}: {err})") from err


def _mapping(
    column_mapping: Mapping[str, str], allowed: Collection[str], columns: Collection[str], name: Any
) -> dict[str, str]:
    unknown = set(column_mapping) - set(allowed)
    if unknown:
        raise DataError(f"column_mapping has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = [c for c in column_mapping.values() if c not in columns]
    if missing:
        raise DataError(f"{name}: no column(s) {missing}; the columns are {sorted(columns)}")
    return dict(column_mapping)


_RECORD_KEYS = ("messages", "prompt", "input", "completion", "system", "category", "tools", "id")
_PROMPT_KEYS = ("prompt", "input", "category", "target", "context", "id")


def load_dataset_records(
    name_or_path: str | Path,
    column_mapping: Mapping[str, str],
    split: str = "train",
    kind: Kind = "retain",
    field: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Records from any `datasets` source (hub id, folder, json/jsonl/csv/parquet file).

    `column_mapping` maps this project's names to the dataset's columns: either `messages` (a list of
    role/content or from/value turns) or `prompt` + `completion`, optionally `input` (appended to the
    prompt), `system`, `category`, `tools`, `id`. Example: `{"prompt": "instruction", "completion": "output"}`.
    """
    data = _load_hf(name_or_path, split, field)
    cols = _mapping(column_mapping, _RECORD_KEYS, data.column_names, name_or_path)
    if "messages" not in cols and not {"prompt", "completion"} <= set(cols):
        raise DataError("column_mapping needs `messages`, or both `prompt` and `completion`")
    records = []
    for n, row in enumerate(data):
        if limit is not None and n >= limit:
            break
        try:
            system = row[cols["system"]] if "system" in cols else None
            if "messages" in cols:
                messages = sharegpt_to_messages(row[cols["messages"]], system=system or None)
            else:
                prompt, completion = row[cols["prompt"]], row[cols["completion"]]
                extra = row[cols["input"]] if "input" in cols else None
                if not isinstance(prompt, str) or not prompt.strip() or not isinstance(completion, str):
                    raise DataError("prompt must be non-empty text and completion text")
                if extra:
                    prompt = f"{prompt}\n\n{extra}"
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion},
                ]
            meta = {"row": n} | ({"id": row[cols["id"]]} if "id" in cols else {})
            records.append(
                Record(
                    messages=messages,
                    kind=kind,
                    tools=tool_schemas(row[cols["tools"]]) if "tools" in cols else None,
                    category=row[cols["category"]] if "category" in cols else None,
                    source=str(name_or_path),
                    meta=meta,
                )
            )
        except DataError as err:
            raise DataError(f"{name_or_path}: row {n}: {err}") from err
    return records


def load_dataset_prompts(
    name_or_path: str | Path,
    column_mapping: Mapping[str, str],
    split: str = "train",
    field: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts from any `datasets` source; `column_mapping` maps `prompt` (required), optionally
    `input`, `category`, `target`, `context`, `id` to the dataset's columns."""
    data = _load_hf(name_or_path, split, field)
    cols = _mapping(column_mapping, _PROMPT_KEYS, data.column_names, name_or_path)
    if "prompt" not in cols:
        raise DataError("column_mapping needs `prompt`")
    prompts = []
    for n, row in enumerate(data):
        if limit is not None and n >= limit:
            break
        text = row[cols["prompt"]]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{name_or_path}: row {n}: `{cols['prompt']}` must be non-empty text")
        extra = row[cols["input"]] if "input" in cols else None
        if extra:
            text = f"{text}\n\n{extra}"
        fields = {key: row[column] for key, column in cols.items()}
        prompts.append(
            Prompt(
                id=str(fields["id"] if fields.get("id") is not None else f"{Path(str(name_or_path)).stem}-{n}"),
                text=text,
                category=fields.get("category"),
                source=str(name_or_path),
                context=fields.get("context"),
                target=fields.get("target"),
            )
        )
    return prompts
