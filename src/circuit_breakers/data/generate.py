"""Completions from a model itself: harmful continuations, refusals and benign answers as records.

The rerouting loss must see the model *producing* harmful content, and the retain loss its own
ordinary behaviour, so both sets are best drawn from the model being trained (the paper used an
uncensored model for harmful text and Llama-3's own refusals as extra retain data). Generation is
greedy, batched with left padding, uses the tokenizer's chat template, and can prefill the assistant
turn ("Sure, here is ...") to draw harmful text out of a refusal-trained model. Output is JSONL written
batch by batch, so an interrupted run resumes where it stopped instead of starting over.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..generation import generate_batches, generation_config, render_prompts, stop_token_ids
from ..generation.vllm import is_vllm_model, vllm_source
from .prompts import Prompt, load_builtin_prompts
from .records import DataError, Kind, Record, read_records, write_records
from .refusal import looks_like_refusal

__all__ = [
    "Prefill",
    "as_prompts",
    "end_of_turn_ids",
    "generate_benign_retain",
    "generate_completions",
    "generate_refusal_retain",
    "looks_like_refusal",
    "model_words",
    "read_generated",
    "refuses",
    "split_refusals",
    "target_prefill",
]

Prefill = Callable[[Prompt], "str | None"]
"""Returns the text that starts the assistant turn for a prompt (None: no prefill)."""


def target_prefill(prompt: Prompt) -> str | None:
    """Prefill with the prompt's affirmative target (HarmBench / AdvBench "Sure, here is ...")."""
    return prompt.target or None


def as_prompts(items: Iterable[Prompt | str | Mapping[str, Any]]) -> list[Prompt]:
    """Prompts from Prompt objects, plain strings or dicts; duplicates (same id) are kept once."""
    out: list[Prompt] = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, Prompt):
            prompt = item
        elif isinstance(item, str):
            prompt = Prompt.from_dict({"text": item})
        else:
            prompt = Prompt.from_dict(item)
        if prompt.id not in seen:
            seen.add(prompt.id)
            out.append(prompt)
    return out


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """Token ids that end an assistant turn (`generation.stop_token_ids`, taken tokenizer first)."""
    return stop_token_ids(model, tokenizer)


# ---------------------------------------------------------------------------------- the JSONL file


def read_generated(path: str | Path) -> list[Record]:
    """Records of a generation file, repairing a last line cut off by an interruption.

    A crash can leave half a line at the end; it is removed (that prompt is generated again). A bad
    line anywhere else is real corruption and raises DataError naming the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    good_end = 0
    offset = 0
    for number, line in enumerate(lines, 1):
        end = offset + len(line) + (1 if number < len(lines) else 0)
        if line.strip():
            try:
                json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                if any(rest.strip() for rest in lines[number:]):
                    raise DataError(f"{path}:{number}: invalid JSON in a generation file ({err})") from err
                break
        good_end = end
        offset = end
    if good_end < len(raw):
        with path.open("r+b") as handle:
            handle.truncate(good_end)
    elif raw and not raw.endswith(b"\n"):
        with path.open("ab") as handle:
            handle.write(b"\n")
    return read_records(path)


def _progress(enabled: bool, total: int, done: int, description: str):  # -> rich Progress or None
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    progress.start()
    progress.add_task(description, total=total, completed=done)
    return progress


def _prefill_for(prefill: Prefill | str | None, prompt: Prompt) -> str | None:
    if prefill is None:
        return None
    text = prefill if isinstance(prefill, str) else prefill(prompt)
    return text or None


def _until_stop(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stop_ids: set[int]) -> tuple[str, str]:
    """(decoded text before the first stop id, finish reason "stop" or "length")."""
    cut = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    if cut is None:
        return tokenizer.decode(list(ids), skip_special_tokens=True), "length"
    return tokenizer.decode(list(ids[:cut]), skip_special_tokens=True), "stop"


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Iterable[Prompt | str | Mapping[str, Any]],
    out_path: str | Path,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    prefill: Prefill | str | None = None,
    system_prompt: str | None = None,
    kind: Kind = "circuit_breaker",
    progress: bool = True,
) -> list[Record]:
    """Greedy completions for `prompts`, appended to `out_path` (JSONL of Records) batch by batch.

    Prompts whose id is already in the file are skipped, so a second call after an interruption
    continues. `prefill` (a string, or a function of the prompt such as `target_prefill`) starts the
    assistant turn and becomes the start of the completion. Longest prompts go first so an
    out-of-memory error shows at once. Returns the records of these prompts, in their order.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise DataError("batch_size and max_new_tokens must be at least 1")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    items = as_prompts(prompts)
    done = {str(r.meta.get("prompt_id")) for r in read_generated(out_path)}
    todo = [p for p in items if p.id not in done]

    starts = [_prefill_for(prefill, prompt) for prompt in todo]
    texts = render_prompts(tokenizer, [prompt.to_messages(system_prompt) for prompt in todo], starts)
    config = generation_config(model, tokenizer, max_new_tokens)
    stop_ids = set(config.eos_token_id)
    name = vllm_source(model) if is_vllm_model(model) else getattr(model.config, "_name_or_path", None)
    generator = name or type(model).__name__
    bar = _progress(progress, len(items), len(items) - len(todo), f"generating {kind}")
    try:
        batches = closing(generate_batches(model, tokenizer, texts, config, batch_size))
        with out_path.open("a", encoding="utf-8") as handle, batches as generated:
            for batch in generated:
                for row, ids in batch:
                    prompt, start = todo[row], starts[row]
                    new_text, finish = _until_stop(tokenizer, ids, stop_ids)
                    completion = (start + new_text) if start else new_text.lstrip()
                    answer = {"role": "assistant", "content": completion.rstrip()}
                    record = Record(
                        messages=[*prompt.to_messages(system_prompt), answer],
                        kind=kind,
                        category=prompt.category,
                        source=prompt.source,
                        meta={"prompt_id": prompt.id, "prefill": start, "finish": finish, "generator": generator},
                    )
                    handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                if bar is not None:
                    bar.advance(bar.task_ids[0], len(batch))
    finally:
        if bar is not None:
            bar.stop()
    wanted = {p.id for p in items}
    by_id = {str(r.meta.get("prompt_id")): r for r in read_records(out_path) if str(r.meta.get("prompt_id")) in wanted}
    return [by_id[p.id] for p in items if p.id in by_id]


def generate_refusal_retain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Iterable[Prompt | str | Mapping[str, Any]],
    out_path: str | Path,
    only_refusals: bool = True,
    raw_path: str | Path | None = None,
    **kwargs: Any,
) -> list[Record]:
    """The model's own answers to circuit-breaker prompts, as refusal-retain records.

    The paper added Llama-3's refusals to harmful prompts to the retain set so that refusing stays
    intact. Every generation goes to `raw_path` (default `<out>.raw.jsonl`, which also serves for
    resuming); `out_path` receives only the refusals (with `only_refusals`), because a compliant
    answer to a harmful prompt must never be retained.
    """
    out_path = Path(out_path)
    raw = Path(raw_path) if raw_path else out_path.with_name(out_path.stem + ".raw" + (out_path.suffix or ".jsonl"))
    if raw == out_path:
        raise DataError("raw_path must differ from out_path")
    records = generate_completions(model, tokenizer, prompts, raw, kind="refusal_retain", **kwargs)
    for record in records:
        record.meta["refusal"] = refuses(record)
    kept = [r for r in records if r.meta["refusal"]] if only_refusals else records
    write_records(kept, out_path)
    return kept


def generate_benign_retain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_path: str | Path,
    prompts: Iterable[Prompt | str | Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> list[Record]:
    """The model's own answers to benign prompts (default: the packaged `benign` set) as retain records."""
    items = load_builtin_prompts("benign") if prompts is None else prompts
    return generate_completions(model, tokenizer, items, out_path, kind="retain", **kwargs)


def model_words(record: Record) -> str:
    """The completion less the prefill it started with: what the model itself wrote. A refusal-trained model
    often refuses right after "Sure, here is", and refusal phrases are looked for at the start of a text."""
    prefill = str(record.meta.get("prefill") or "")
    text = record.completion
    return text[len(prefill) :] if prefill and text.startswith(prefill) else text


def refuses(record: Record, detect: Callable[[str], bool] = looks_like_refusal) -> bool:
    """Whether a completion refuses: the whole of it (a refusal prefill counts), or the model's own words after
    a compliant prefill ("Sure, here is ... Sorry, I can't")."""
    words = model_words(record)
    return detect(record.completion) or (words != record.completion and detect(words))


def split_refusals(
    records: Iterable[Record], detect: Callable[[str], bool] = looks_like_refusal
) -> tuple[list[Record], list[Record]]:
    """(compliant, refusing) harmful completions, judged by `refuses` (with `detect`).

    A refusal kept as circuit-breaker data would teach the model to break its own refusals, so the data stage
    drops these rows from the rerouting set (and may retain them as refusals)."""
    compliant: list[Record] = []
    refusing: list[Record] = []
    for record in records:
        (refusing if refuses(record, detect) else compliant).append(record)
    return compliant, refusing
