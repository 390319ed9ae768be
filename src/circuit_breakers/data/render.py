"""Render records with the tokenizer's own chat template and mark exactly the completion tokens.

The completion span comes from character offsets of the rendered text. Where the completion starts
is found by rendering the same chat with a sentinel in place of the completion: everything before the
sentinel is what the template writes before the completion (system prompt, headers, generation
prompt), whatever the template, and even when no user turn precedes the completion. The mask then
runs to the end of the turn's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `<|eom_id|>`, `</s>` ...).
Text is tokenized once, without adding special tokens, because the template already holds the BOS:
no BOS twice."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from .records import DataError, Record

MaskMode = Literal["completion", "full", "completion_plus_last_prompt_tokens"]
MASK_MODES: tuple[str, ...] = ("completion", "full", "completion_plus_last_prompt_tokens")


class DropRow(Exception):
    """A row that cannot be used; `reason` is a short key counted in the mask report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Example:
    """Token ids of one rendered record, and which of them the loss sees."""

    input_ids: list[int]
    loss_mask: list[int]
    completion_start: int
    completion_end: int
    kind: str
    truncated: bool = False
    full_completion_length: int | None = None
    """Completion tokens (with end-of-turn) before truncation, for the coverage figure of the report."""
    tool_call_start: int | None = None
    """Index of the first token of the completion's tool call (None: the completion makes no call);
    `render` has checked that it, every call name and the end token lie in the loss mask."""

    def __len__(self) -> int:
        return len(self.input_ids)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(token_id)
    return ids


# --- tool calls (issue 6) ---------------------------------------------------------------------------
# How a record's `tools` and assistant `tool_calls` become text. `template`: the chat template writes
# them (it must support tools). `llama31`: Llama-3.1's built-in JSON format,
# `<|python_tag|>{"name": ..., "parameters": ...}` ended by `<|eom_id|>`, tool results as `ipython`
# turns. `json`: for templates without tool support, each call is a JSON object in the assistant
# content and the tool schemas are described in the system turn. `auto`: llama31 when the tokenizer
# has Llama-3.1's tool tokens, else template when the template writes tool calls, else json. A record
# chooses with `meta["tool_format"]`; without it the template alone renders (rows it cannot render are
# dropped as `tool_calls_not_rendered`).
ToolFormat = Literal["auto", "template", "llama31", "json"]
TOOL_FORMATS: tuple[str, ...] = ("auto", "template", "llama31", "json")
PYTHON_TAG, EOM, EOT_LLAMA = "<|python_tag|>", "<|eom_id|>", "<|eot_id|>"
JSON_TOOLS_PREAMBLE = (
    "You can call tools. To call one, reply with only a JSON object "
    '{"name": <tool name>, "arguments": <arguments object>}. Tools:'
)
_PROBE_NAME = "cbprobetoolq7Zx"
_support_cache: dict[tuple[int, str], dict[str, bool]] = {}


def tool_support(tokenizer: PreTrainedTokenizerBase) -> dict[str, bool]:
    """What the chat template writes, found by rendering probes: `tools` (schemas), `tool_calls`
    (assistant calls), `tool_role` (a `tool` turn's content) and `system` (a system turn's content)."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    key = (id(tokenizer), template)
    if key in _support_cache:
        return _support_cache[key]

    def renders(messages: list[dict], marker: str, **kwargs: Any) -> bool:
        try:
            return marker in tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception:  # noqa: BLE001 - a template that raises on a probe does not support it
            return False

    user = {"role": "user", "content": "hi"}
    call = {"id": "call00001", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"a": 1}}}
    parameters = {"type": "object", "properties": {}}
    schema = {"type": "function", "function": {"name": _PROBE_NAME, "description": "probe", "parameters": parameters}}
    support = {
        "tools": renders([user], _PROBE_NAME, tools=[schema]),
        "tool_calls": renders([user, {"role": "assistant", "content": "", "tool_calls": [call]}], _PROBE_NAME),
        "tool_role": renders(
            [
                user,
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": _PROBE_NAME + "r", "tool_call_id": "call00001", "name": _PROBE_NAME},
            ],
            _PROBE_NAME + "r",
        ),
        "system": renders([{"role": "system", "content": _PROBE_NAME + "s"}, user], _PROBE_NAME + "s"),
    }
    _support_cache[key] = support
    return support


def _has_tokens(tokenizer: PreTrainedTokenizerBase, *tokens: str) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in tokens)


def resolve_tool_format(tokenizer: PreTrainedTokenizerBase, requested: str = "auto") -> str:
    """The concrete tool format (`template`, `llama31` or `json`) for `requested` on this tokenizer."""
    if requested not in TOOL_FORMATS:
        raise DataError(f"unknown tool format {requested!r}; choose one of {TOOL_FORMATS}")
    if requested != "auto":
        return requested
    if _has_tokens(tokenizer, PYTHON_TAG, EOM, EOT_LLAMA):
        return "llama31"
    return "template" if tool_support(tokenizer)["tool_calls"] else "json"


def call_parts(call: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, arguments dict) of a tool call in HF (`{"function": {...}}`) or flat (`{"name", "arguments"}`) form."""
    function = call.get("function", call) if isinstance(call, dict) else {}
    name = str(function.get("name", ""))
    args = function.get("arguments", function.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise DataError(f"tool call {name!r}: arguments are not valid JSON ({err.msg})") from err
    if not isinstance(args, dict):
        raise DataError(f"tool call {name!r}: arguments must be a JSON object")
    return name, args


def tool_call_text(call: dict[str, Any], fmt: str) -> str:
    """The text one tool call becomes in the `llama31` or `json` format (without the end token)."""
    name, args = call_parts(call)
    if fmt == "llama31":
        return PYTHON_TAG + json.dumps({"name": name, "parameters": args}, ensure_ascii=False)
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def tools_text(tools: list[dict[str, Any]]) -> str:
    """The `json` format's description of the tools: the preamble, then one JSON schema per line."""
    lines = [JSON_TOOLS_PREAMBLE]
    for tool in tools:
        function = tool.get("function", tool)
        shown = {k: function[k] for k in ("name", "description", "parameters") if k in function}
        lines.append(json.dumps(shown, ensure_ascii=False))
    return "\n".join(lines)


def special_token_texts(tokenizer: Any) -> list[str]:
    """Every special token's text (the named ones and the added tokens marked special), longest first: typed
    in a message, each would be tokenized as the control token itself."""
    texts = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            texts.add(str(getattr(added, "content", added)))
    return sorted((t for t in texts if t), key=lambda t: (-len(t), t))


def special_tokens_in(messages: Sequence[dict[str, Any]], specials: Sequence[str]) -> str | None:
    """Where the first message whose text (content or tool calls) holds a special token's text names it, as
    "message 2 (user) contains the special token(s) '<|im_start|>'"; None when none does. Such text is refused,
    not escaped: once rendered through the chat template it is the control token (a forged turn), and no
    escape reads the same to the model in training as at inference."""
    for i, message in enumerate(messages, 1):
        text = _content(message.get("content")) + _content(message.get("tool_calls"))
        found = sorted((text.index(t), t) for t in specials if t in text)
        if found:
            names = ", ".join(repr(t) for _, t in found)
            return f"message {i} ({message.get('role')}) contains the special token(s) {names}"
    return None


def _content(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else json.dumps(value, ensure_ascii=False)


def prepare_tool_messages(
    tokenizer: PreTrainedTokenizerBase, record: Record, messages: list[dict], fmt: str
) -> tuple[list[dict], list[dict] | None, list[str]]:
    """(messages, tools for the template, call texts) with tool calls written in `fmt`.

    The call texts are what each assistant tool-call turn ends with, in order, so `llama31` can give
    those turns `<|eom_id|>`.
    """
    tools = record.tools or None
    if fmt == "template":
        return messages, tools, []
    support = tool_support(tokenizer)
    out: list[dict] = []
    calls: list[str] = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            text = "\n".join(tool_call_text(c, fmt) for c in message["tool_calls"])
            content = _content(message.get("content"))
            calls.append(text)
            out.append({"role": "assistant", "content": (content + "\n" if content.strip() else content) + text})
        elif role in ("tool", "ipython"):
            content = _content(message.get("content"))
            if fmt == "llama31":
                out.append({"role": "ipython", "content": content})
            elif support["tool_role"]:
                out.append({"role": "tool", "content": content})
            elif out and out[-1]["role"] == "user":
                out[-1] = {**out[-1], "content": _content(out[-1].get("content")) + f"\n\nTool result: {content}"}
            else:
                out.append({"role": "user", "content": f"Tool result: {content}"})
        elif role == "user" and out and out[-1]["role"] == "user" and not support["tool_role"]:
            # a tool result written as a user turn: merge, templates that need alternation accept it
            merged = _content(out[-1].get("content")) + "\n\n" + _content(message.get("content"))
            out[-1] = {**out[-1], "content": merged}
        else:
            out.append({k: v for k, v in message.items() if k != "tool_calls"})
    if tools and not (fmt == "llama31" and support["tools"]):
        described = tools_text(tools)
        if out and out[0]["role"] == "system" and support["system"]:
            out[0] = {**out[0], "content": _content(out[0].get("content")) + "\n\n" + described}
        elif support["system"]:
            out.insert(0, {"role": "system", "content": described})
        else:
            at = next((i for i, m in enumerate(out) if m["role"] == "user"), 0)
            out[at] = {**out[at], "content": described + "\n\n" + _content(out[at].get("content"))}
        tools = None
    return out, tools if fmt == "llama31" else None, calls


def _eom_after_calls(text: str, calls: list[str]) -> str:
    """Llama-3.1: a turn that makes a tool call ends with <|eom_id|> (the template writes <|eot_id|>)."""
    at = 0
    for call in calls:
        found = text.find(call, at)
        if found < 0:
            continue
        end = found + len(call)
        eot = text.find(EOT_LLAMA, end)
        if eot >= 0 and not text[end:eot].strip():
            text = text[:eot] + EOM + text[eot + len(EOT_LLAMA) :]
        at = end
    return text


def record_tool_format(tokenizer: PreTrainedTokenizerBase, record: Record) -> str:
    """The concrete tool format this record renders with (`template` unless `meta["tool_format"]` says)."""
    return resolve_tool_format(tokenizer, str(record.meta.get("tool_format") or "template"))


def _render_messages(
    tokenizer: PreTrainedTokenizerBase, record: Record, messages: list[dict], generation_prompt: bool
) -> str:
    fmt = record_tool_format(tokenizer, record)
    messages, tools, calls = prepare_tool_messages(tokenizer, record, messages, fmt)
    kwargs = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
    return _eom_after_calls(text, calls) if fmt == "llama31" else text


def prompt_text(tokenizer: PreTrainedTokenizerBase, record: Record) -> str:
    """The rendered chat before the record's completion turn, ending with the generation prompt, with
    tools and tool calls written as `render` writes them: what a model generates from."""
    return _render_messages(tokenizer, record, record.messages[: record.completion_turn], generation_prompt=True)


def tool_call_char(tokenizer: PreTrainedTokenizerBase, record: Record, text: str, start: int) -> int | None:
    """Character offset in `text` where the completion's tool-call text starts (None: not found)."""
    turn = record.completion_turn
    message = record.messages[turn]
    fmt = record_tool_format(tokenizer, record)
    if fmt != "template":
        first = tool_call_text(message["tool_calls"][0], fmt)
        found = text.find(first, start)
        return found if found >= 0 else None
    # The template writes the calls: they start where the turn rendered without them differs. Two
    # variants (what follows the content differs between them) so a character the call text happens
    # to share with the end of a plain turn does not move the start.
    bare = {k: v for k, v in message.items() if k != "tool_calls"}
    at = len(text)
    for tail in ("", "\u2063"):
        last = {**bare, "content": _content(bare.get("content")) + tail}
        plain = _render_messages(tokenizer, record, [*record.messages[:turn], last], False)
        at = min(at, len(os.path.commonprefix([text, plain])))
    return at if start <= at < len(text) else None


# Stands in for the completion text to find where the template puts it, whatever comes before
# (generation prompt, injected system prompt, thinking tags) and even with no turn before it.
_SENTINEL = "CBSENTINELq7Zx"


def _locate_start(tokenizer: PreTrainedTokenizerBase, record: Record, text: str) -> int | None:
    """Character offset where the completion content starts in `text`, found with a sentinel."""
    turn = record.completion_turn
    probe_messages = [*record.messages[:turn], {**record.messages[turn], "content": _SENTINEL}]
    probe = _render_messages(tokenizer, record, probe_messages, generation_prompt=False)
    at = probe.find(_SENTINEL)
    if at < 0 or text[:at] != probe[:at]:
        return None
    return at


def completion_char_span(tokenizer: PreTrainedTokenizerBase, record: Record) -> tuple[str, int, int]:
    """(rendered text through the completion turn, start, end) of the completion in characters.

    `start` is where the completion content begins (not the end of the generation prompt: templates
    may put text between the two, and a completion with no turn before it has no generation prompt).
    `end` is the end of the completion content, or of the whole turn when it makes tool calls; the
    end-of-turn token is added at token level by `render`.
    """
    turn = record.completion_turn
    message = record.messages[turn]
    content = record.completion
    has_calls = bool(message.get("tool_calls"))
    if not content.strip() and not has_calls:
        raise DropRow("empty_completion")
    text = _render_messages(tokenizer, record, record.messages[: turn + 1], generation_prompt=False)
    start = _locate_start(tokenizer, record, text)
    if start is None:
        if turn == 0:
            raise DropRow("completion_not_found", "the chat template renders the completion unpredictably")
        prefix = _render_messages(tokenizer, record, record.messages[:turn], generation_prompt=True)
        start = len(os.path.commonprefix([text, prefix]))
    if has_calls:
        # Tool-call text follows the content and is part of what the model produces. A template that
        # ignores tool_calls would leave an empty turn: drop it rather than train on nothing.
        end = len(text.rstrip())
        calls = [call for call in message["tool_calls"] if isinstance(call, dict)]
        names = [str((call.get("function") or call).get("name", "")) for call in calls]
        if not names or any(name not in text[start:end] for name in names):
            raise DropRow("tool_calls_not_rendered", "the chat template does not write tool calls")
        return text, start, end
    for candidate in (content, content.strip(), content.lstrip(), content.rstrip()):
        if candidate and text.startswith(candidate, start):
            return text, start, start + len(candidate)
    for candidate in (content, content.strip()):  # the template moved it: look further on
        found = text.find(candidate, start)
        if found >= 0:
            return text, found, found + len(candidate)
    raise DropRow("completion_not_found", "the chat template changed the completion text")


def render(
    tokenizer: PreTrainedTokenizerBase,
    record: Record,
    mask_mode: MaskMode = "completion",
    max_length: int = 512,
    prompt_tokens: int = 8,
) -> Example:
    """Tokenize `record` and mark its loss tokens; raises DropRow for rows to skip.

    Masks: `completion` (the completion plus end-of-turn), `full` (every token through the end of
    turn, as the reference did for the rerouting set), `completion_plus_last_prompt_tokens` (the
    completion and the last `prompt_tokens` prompt tokens). Over `max_length`, the prompt is cut from
    the left (a leading BOS stays: models lean on it) and, if the completion alone is too long, its
    end is cut: its start is what matters. The prompt keeps at least a quarter of `max_length` (or
    all of itself if shorter) so a rerouting example never loses its request entirely.
    """
    if mask_mode not in MASK_MODES:
        raise DataError(f"unknown mask mode {mask_mode!r}; choose one of {MASK_MODES}")
    if not tokenizer.is_fast:
        raise DataError("completion masks need a fast tokenizer (character offsets)")
    forged = special_tokens_in(record.messages, special_token_texts(tokenizer))
    if forged:
        raise DropRow("special_token", forged)
    text, start, end = completion_char_span(tokenizer, record)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    first = next((i for i, (s, e) in enumerate(offsets) if e > start), None)
    if first is None:
        raise DropRow("empty_completion")
    last = max((i for i, (s, e) in enumerate(offsets) if s < end and e > s), default=first)
    # Extend through the end-of-turn token: the turn's first special token after the content, when
    # only whitespace lies between them.
    specials = _special_ids(tokenizer)
    eot = next((i for i in range(last + 1, len(ids)) if ids[i] in specials), None)
    if eot is not None and all(
        not text[s:e].strip() or ids[j] in specials for j, (s, e) in enumerate(offsets[last + 1 : eot], last + 1)
    ):
        last = eot
    stop = last + 1
    call_token = None
    if record.messages[record.completion_turn].get("tool_calls"):
        call_token = _check_tool_call_mask(tokenizer, record, text, start, ids, offsets, first, stop, specials)
    ids = ids[:stop]
    comp_len = stop - first

    truncated = False
    if stop > max_length:
        truncated = True
        if max_length < 2:
            raise DropRow("too_long", f"max_length {max_length} cannot hold a prompt and a completion")
        keep_prompt = min(first, max(max_length - comp_len, max(1, max_length // 4)))
        bos = tokenizer.bos_token_id
        head = ids[:1] if keep_prompt >= 2 and first > keep_prompt and bos is not None and ids[0] == bos else []
        prompt_part = ids[first - (keep_prompt - len(head)) : first]
        completion_part = ids[first : first + max_length - keep_prompt]
        ids = head + prompt_part + completion_part
        if call_token is not None:
            call_token = call_token - first + keep_prompt
            if call_token >= len(ids):
                raise DropRow("tool_call_mask", "truncation cut the tool call's first token")
        first, stop = keep_prompt, len(ids)

    if mask_mode == "full":
        lo = 0
    elif mask_mode == "completion_plus_last_prompt_tokens":
        lo = max(0, first - prompt_tokens)
    else:
        lo = first
    mask = [1 if lo <= i < stop else 0 for i in range(len(ids))]
    return Example(ids, mask, first, stop, record.kind, truncated, comp_len, call_token)


def _check_tool_call_mask(
    tokenizer: PreTrainedTokenizerBase,
    record: Record,
    text: str,
    start: int,
    ids: list[int],
    offsets: Sequence[tuple[int, int]],
    first: int,
    stop: int,
    specials: set[int],
) -> int:
    """Index of the tool call's first token, after checking that the completion span [first, stop)
    holds it, every call name and a closing special token; raises DropRow("tool_call_mask") naming
    what is missing, so a bad mask is listed in the report instead of trained on."""
    at = tool_call_char(tokenizer, record, text, start)
    if at is None:
        raise DropRow("tool_call_mask", "the tool call's text was not found after the completion start")
    token = next((i for i, (s, e) in enumerate(offsets) if e > at), None)
    if token is None or not first <= token < stop:
        where = f"the tool call's first token ({token}) is outside the completion tokens [{first}, {stop})"
        raise DropRow("tool_call_mask", where)
    masked = tokenizer.decode(ids[token:stop], skip_special_tokens=False)
    for call in record.messages[record.completion_turn]["tool_calls"]:
        name = call_parts(call)[0]
        if name not in masked:
            raise DropRow("tool_call_mask", f"tool name {name!r} is not in the masked tokens")
    if ids[stop - 1] not in specials:
        raise DropRow("tool_call_mask", "the masked tool call does not end with an end-of-turn token")
    if record_tool_format(tokenizer, record) == "llama31" and ids[stop - 1] != tokenizer.convert_tokens_to_ids(EOM):
        raise DropRow("tool_call_mask", "a Llama-3.1 tool call must end with <|eom_id|>")
    return token


@dataclass
class RenderResult:
    """Rendered examples plus what was dropped and why."""

    examples: list[Example] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tool_call_failures: list[str] = field(default_factory=list)
    """Rows whose tool-call mask failed its check (`record N: what`), listed in the mask report."""


def render_all(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    mask_mode: MaskMode = "completion",
    max_length: int = 512,
    prompt_tokens: int = 8,
) -> RenderResult:
    """Render every record; bad rows are counted by reason, never crash the run."""
    if mask_mode not in MASK_MODES:  # a bad setting is the caller's error, not a bad row
        raise DataError(f"unknown mask mode {mask_mode!r}; choose one of {MASK_MODES}")
    if not tokenizer.is_fast:
        raise DataError("completion masks need a fast tokenizer (character offsets)")
    result = RenderResult()
    for number, record in enumerate(records, 1):
        try:
            example = render(tokenizer, record, mask_mode, max_length, prompt_tokens)
        except DropRow as drop:
            result.dropped[drop.reason] += 1
            if drop.reason == "tool_call_mask":
                result.tool_call_failures.append(f"record {number}: {drop}")
            continue
        except (DataError, ValueError, TypeError, KeyError, AttributeError, TemplateError):
            # A row the template cannot render (wrong types, roles out of order, ...).
            result.dropped["malformed"] += 1
            continue
        result.truncated += example.truncated
        result.examples.append(example)
    return result
