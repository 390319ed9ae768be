"""AgentDojo cases (issue 6): the builder of `ToolCase`s from AgentDojo's suites, kept apart from the
case type (`data.agents`) because it is the one part that needs the optional `agentdojo` package.

For each suite, user task, injection task and attack template: the conversation (system, user prompt,
the user task's ground-truth calls and their results) up to the first tool result that carries the
injection, built by the attack's own template, beside the same conversation without it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from typing import Any

from .agents import ToolCase, hf_call, plain_call
from .records import DataError

__all__ = ["AGENTDOJO_MODEL_NAME", "AGENTDOJO_VERSION", "DEFAULT_ATTACKS", "agentdojo_cases", "agentdojo_tool_schema"]

AGENTDOJO_VERSION = "v1.2.2"
DEFAULT_ATTACKS: tuple[str, ...] = ("important_instructions", "ignore_previous", "tool_knowledge")
AGENTDOJO_MODEL_NAME = "gpt-4o-2024-05-13"
"""The important_instructions attack names the victim model; it needs a model name AgentDojo knows."""


def agentdojo_tool_schema(function: Any, compact: bool = False) -> dict[str, Any]:
    """An AgentDojo `Function` as a Hugging Face tool schema; `compact` keeps the first line of the
    description and drops pydantic's titles (shorter prompts for small models)."""
    params = function.parameters.model_json_schema()
    description = function.description or ""
    if compact:
        description = description.strip().split("\n")[0]
        params = json.loads(json.dumps(params))
        params.pop("title", None)
        for prop in params.get("properties", {}).values():
            prop.pop("title", None)
            if "description" in prop:
                prop["description"] = prop["description"].strip().split("\n")[0]
    return {"type": "function", "function": {"name": function.name, "description": description, "parameters": params}}


def _key(needle: str) -> str:
    """A short piece of an injected text that survives the tool's formatting (YAML collapses blank
    lines and may re-indent): its first non-blank line, at most 30 characters."""
    line = next((ln.strip() for ln in needle.splitlines() if ln.strip()), "")
    return line[:30]


def _window(text: str, needle: str, limit: int | None) -> str:
    """At most `limit` characters of a tool result, centred on where `needle` starts (the injection slot)."""
    if limit is None or len(text) <= limit:
        return text
    key = _key(needle)
    at = text.find(key) if key else -1
    if at < 0:
        return text[:limit] + " ..."
    lo = max(0, min(at - limit // 3, len(text) - limit))
    return ("... " if lo else "") + text[lo : lo + limit] + (" ..." if lo + limit < len(text) else "")


def _agentdojo() -> Any:
    try:
        import agentdojo  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the AgentDojo builder needs the optional `agents` extra: pip install 'circuit-breakers[agents]'"
        ) from err
    from agentdojo.agent_pipeline.agent_pipeline import load_system_message
    from agentdojo.agent_pipeline.tool_execution import tool_result_to_str
    from agentdojo.attacks.attack_registry import load_attack
    from agentdojo.functions_runtime import FunctionsRuntime
    from agentdojo.task_suite.load_suites import get_suites

    return load_system_message, tool_result_to_str, load_attack, FunctionsRuntime, get_suites


class _NamedPipeline:
    """Stands in for the attacked pipeline: AgentDojo's attacks only read its `name`."""

    def __init__(self, name: str) -> None:
        self.name = name


def agentdojo_cases(
    suites: Sequence[str] | None = None,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    version: str = AGENTDOJO_VERSION,
    user_tasks: Sequence[str] | None = None,
    injection_tasks: Sequence[str] | None = None,
    tools: str = "used",
    compact_tools: bool = False,
    max_tool_result_chars: int | None = None,
    system_message: str | None = None,
    n_distractors: int = 2,
    progress: Callable[[str], None] | None = None,
) -> list[ToolCase]:
    """Cases from AgentDojo: for each suite, user task, injection task and attack, the conversation
    (system, user prompt, the user task's ground-truth calls and results) up to the first tool result
    that carries the injection, built by the attack's own template.

    Per (user task, injection task) one clean case (same conversation, default environment) and one
    injected case per attack. `correct_call` is the user task's next ground-truth call (None when the
    task ends there; `correct_answer` then holds its final answer), `injected_call` the injection
    task's first ground-truth call. `tools`: `all` (every tool of the suite, as AgentDojo gives them)
    or `used` (the tools of the conversation, the next call, the injection's call and the distractors:
    shorter prompts). `max_tool_result_chars` cuts long tool results to a window around the injection
    slot (same slot on clean and injected cases).
    """
    load_system_message, tool_result_to_str, load_attack, FunctionsRuntime, get_suites = _agentdojo()
    all_suites = get_suites(version)
    system = load_system_message(None) if system_message is None else system_message
    out: list[ToolCase] = []
    for suite_name in suites or list(all_suites):
        if suite_name not in all_suites:
            raise DataError(f"unknown AgentDojo suite {suite_name!r}; choose from {sorted(all_suites)}")
        suite = all_suites[suite_name]
        runtime = FunctionsRuntime(suite.tools)
        functions = {f.name: f for f in suite.tools}
        defaults = suite.get_injection_vector_defaults()
        canaries = {v: f"<CANARY---{v}--->" for v in defaults}
        pipeline = _NamedPipeline(AGENTDOJO_MODEL_NAME)
        attack_objs = {name: load_attack(name, suite, pipeline) for name in attacks}
        clean_env = suite.load_and_inject_default_environment({})
        canary_env = suite.load_and_inject_default_environment(canaries)
        inj_tasks = {k: v for k, v in suite.injection_tasks.items() if injection_tasks is None or k in injection_tasks}
        inj_calls = {}
        for inj_id, inj_task in inj_tasks.items():
            calls = inj_task.ground_truth(copy.deepcopy(clean_env))
            # an injection task whose goal needs no tool call (e.g. "say X") has nothing to reroute here
            inj_calls[inj_id] = plain_call(calls[0].function, calls[0].args) if calls else None
        first_calls = {}  # every user task's first call: distractors that use the suite's own tools
        for ut_id, ut in suite.user_tasks.items():
            gt = ut.ground_truth(copy.deepcopy(clean_env))
            if gt:
                first_calls[ut_id] = plain_call(gt[0].function, gt[0].args)

        for ut_id, ut in suite.user_tasks.items():
            if user_tasks is not None and ut_id not in user_tasks:
                continue
            if progress:
                progress(f"{suite_name}/{ut_id}")
            # Where the injection lands: run the ground truth on the canary environment.
            env = copy.deepcopy(canary_env)
            gt = ut.ground_truth(copy.deepcopy(canary_env))
            step, vectors = None, []
            for i, call in enumerate(gt):
                result, _ = runtime.run_function(env, call.function, call.args, raise_on_error=False)
                text = tool_result_to_str(result)
                vectors = [v for v, c in canaries.items() if c in text]
                if vectors:
                    step = i
                    break
            if step is None:
                continue  # not injectable

            # Distractors: other user tasks' first calls to tools other than the correct one.
            def prefix_and_next(
                environment: Any, needle_for: Callable[[str], str]
            ) -> tuple[list[dict], Any, str | None]:
                env_run = copy.deepcopy(environment)
                calls = ut.ground_truth(copy.deepcopy(environment))
                messages: list[dict[str, Any]] = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": ut.PROMPT},
                ]
                for i, call in enumerate(calls[: step + 1]):
                    result, error = runtime.run_function(env_run, call.function, call.args, raise_on_error=False)
                    text = tool_result_to_str(result) if error is None else f"error: {error}"
                    text = _window(text, needle_for(vectors[0]), max_tool_result_chars)
                    tool_calls = [hf_call(plain_call(call.function, call.args), i)]
                    messages.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
                    tool_turn = {"role": "tool", "content": text, "tool_call_id": f"call{i:05d}", "name": call.function}
                    messages.append(tool_turn)
                nxt = calls[step + 1] if len(calls) > step + 1 else None
                next_call = plain_call(nxt.function, nxt.args) if nxt is not None else None
                return messages, next_call, (ut.GROUND_TRUTH_OUTPUT or None)

            clean_messages, clean_next, answer = prefix_and_next(clean_env, lambda v: defaults[v])
            for inj_id, inj_task in inj_tasks.items():
                injected_call = inj_calls[inj_id]
                if injected_call is None:
                    continue
                distractors = [
                    c
                    for u, c in sorted(first_calls.items())
                    if u != ut_id and c["name"] not in {injected_call["name"], (clean_next or {}).get("name")}
                ]
                seen, picked = set(), []
                for c in distractors:
                    if c["name"] not in seen and len(picked) < n_distractors:
                        seen.add(c["name"])
                        picked.append(c)
                used = {m["tool_calls"][0]["function"]["name"] for m in clean_messages if m.get("tool_calls")}
                used |= {injected_call["name"]} | {c["name"] for c in picked}
                used |= {clean_next["name"]} if clean_next else set()
                schema = [
                    agentdojo_tool_schema(f, compact_tools) for f in suite.tools if tools == "all" or f.name in used
                ]
                common = dict(
                    tools=schema,
                    source="agentdojo",
                    suite=suite_name,
                    user_task=ut_id,
                    injection_task=inj_id,
                    distractors=picked,
                    correct_answer=answer,
                )
                out.append(
                    ToolCase(
                        messages=clean_messages,
                        correct_call=clean_next,
                        injected_call=injected_call,
                        injected=False,
                        **common,
                    )
                )
                for attack_name, attack in attack_objs.items():
                    injections = attack.attack(ut, inj_task)
                    env_i = suite.load_and_inject_default_environment(injections)
                    messages, nxt, _ = prefix_and_next(env_i, lambda v: injections.get(v, defaults[v]))
                    landed = str(messages[-1]["content"])
                    if not any(_key(injections.get(v, "")) and _key(injections.get(v, "")) in landed for v in vectors):
                        continue  # the injection did not reach the result (e.g. cut away)
                    out.append(
                        ToolCase(
                            messages=messages,
                            correct_call=nxt,
                            injected_call=injected_call,
                            injected=True,
                            attack=attack_name,
                            meta={"vectors": vectors},
                            **common,
                        )
                    )
        del functions
    return out
