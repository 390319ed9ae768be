"""`agents`: build tool-call cases, and run the agent experiment (issue 6)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .console import console


def agents_command(argv: list[str]) -> int:
    """agents build|experiment: tool-call circuit breakers against prompt injection (issue 6)"""
    parser = argparse.ArgumentParser(prog="circuit-breakers agents")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser(
        "build", help="tool-call cases from AgentDojo (needs the agents extra) or from tool-call chats"
    )
    build.add_argument("--source", choices=["agentdojo", "routing"], default="agentdojo")
    build.add_argument("--suites", default="banking,slack,travel,workspace", help="AgentDojo suites (comma list)")
    build.add_argument("--attacks", default="important_instructions,ignore_previous,tool_knowledge")
    build.add_argument("--chats", help="routing: a ShareGPT/LLaMA-Factory tool-call JSON (e.g. the Glaive demo)")
    build.add_argument(
        "--tools",
        choices=["used", "all"],
        default="used",
        help="tool schemas per case: those the case involves, or all",
    )
    build.add_argument("--compact_tools", action="store_true", help="first line of descriptions, no pydantic titles")
    build.add_argument(
        "--max_tool_result_chars", type=int, default=None, help="cut tool results to a window around the injection"
    )
    build.add_argument("--out", required=True, help="cases JSONL")
    exp = sub.add_parser(
        "experiment", help="split cases, train on the training split, score base vs circuit-broken (teacher-forced)"
    )
    exp.add_argument("cases", nargs="+", help="cases JSONL file(s) from `agents build`")
    exp.add_argument("--out", required=True, help="results JSON")
    exp.add_argument("--n_train_cb", type=int, default=240)
    exp.add_argument("--n_eval", type=int, default=120)
    exp.add_argument("--heldout_attacks", default="tool_knowledge")
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument(
        "--base_from",
        help="reuse the base model's scores from an earlier results JSON (same cases, "
        "n_eval, seed and held-out attacks; checked)",
    )
    args, rest = parser.parse_known_args(argv)
    from ..data.agentdojo import agentdojo_cases
    from ..data.agents import case_counts, read_cases, routing_injection_cases, write_cases

    if args.action == "build":
        if rest:
            parser.error(f"unknown arguments {rest}")
        if args.source == "agentdojo":
            cases = agentdojo_cases(
                args.suites.split(","),
                args.attacks.split(","),
                tools=args.tools,
                compact_tools=args.compact_tools,
                max_tool_result_chars=args.max_tool_result_chars,
            )
        else:
            from ..data.loaders import load_sharegpt_json

            if not args.chats:
                parser.error("--source routing needs --chats FILE")
            cases = routing_injection_cases(load_sharegpt_json(args.chats))
        write_cases(cases, args.out)
        console.print_json(json.dumps(case_counts(cases)))
        console.print(f"[bold green]cases[/] {args.out}")
        return 0
    from ..experiments.agents import agent_experiment, read_agent_result, save_agent_result
    from ..recipes import parse_config

    recipe = rest if "--config" in rest else ["--config", "agent-embedded", *rest]  # overrides apply to the recipe
    model_cfg, data_cfg, cb_cfg = parse_config(recipe)
    from ..training.run import place_training

    place_training(model_cfg, cb_cfg)  # a device that is not there: stop before reading the cases
    cases = [c for path in args.cases for c in read_cases(path)]
    base = None
    if args.base_from:  # the base model's scores from an earlier run on the same splits
        base = with_settings(read_agent_result(args.base_from))
    result = agent_experiment(
        cases,
        model_cfg,
        data_cfg,
        cb_cfg,
        args.n_train_cb,
        args.n_eval,
        [a for a in args.heldout_attacks.split(",") if a],
        args.seed,
        base_result=base,
    )
    save_agent_result(result, args.out)
    console.print_json(json.dumps({k: result[k] for k in ("base", "circuit_broken")}, default=str))
    return 0


def with_settings(result: dict[str, Any]) -> dict[str, Any]:
    """A result written before results recorded their settings kept its command line (`config`): parse it,
    so `--base_from` still compares the same settings."""
    if "settings" in result or not isinstance(result.get("config"), list):
        return result
    from ..experiments.main_job import recipe_settings
    from ..recipes import parse_config

    return {**result, "settings": recipe_settings(*parse_config(list(result["config"])))}
