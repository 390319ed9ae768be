"""Turn the `eval` command's strings into library values: models, benchmarks, judge.

Kept out of cli.py so that the command stays "parse, call, print" and the same spellings work from
Python: `model_specs(["embedded", "cb=runs/x/train/merged"])`, `load_suite(["harmbench:../shared/data",
"xstest_safe:../shared/data"], limit=50)`, `judge_spec("harmbench:cais/HarmBench-Mistral-7b-val-cls")`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.benchmarks import BENCHMARKS, benchmark_source, is_harmful, load_benchmark, split_spec, subsample
from ..data.prompts import Prompt
from .judges import JUDGES

DEFAULT_MODEL_NAMES = ("base", "circuit_broken")
"""Display names of the first two `--model`s without a `NAME=`: the reference and the one compared."""


def model_specs(values: Sequence[str]) -> dict[str, str]:
    """`PATH` or `NAME=PATH` strings -> {display name: path / hub id / "embedded"}, in order.

    Unnamed models are called base, circuit_broken, model3, ...; the first is the reference.
    """
    if not values:
        raise ValueError("give at least one --model (the first is the reference, usually the base model)")
    out: dict[str, str] = {}
    for i, value in enumerate(values):
        name, sep, spec = value.partition("=")
        if not sep:
            name, spec = (DEFAULT_MODEL_NAMES[i] if i < len(DEFAULT_MODEL_NAMES) else f"model{i + 1}"), value
        name, spec = name.strip(), spec.strip()
        if not name or not spec:
            raise ValueError(f"--model {value!r}: expected PATH or NAME=PATH")
        if name in out:
            raise ValueError(f"--model {value!r}: the name {name!r} is used twice")
        out[name] = spec
    return out


@dataclass
class Suite:
    """Prompts of the requested benchmarks: harmful ones (ASR) and safe ones (over-refusal)."""

    harmful: list[Prompt] = field(default_factory=list)
    safe: list[Prompt] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)


def load_suite(
    specs: Sequence[str], limit: int | None = None, seed: int = 0, data_dir: str | Path | None = None
) -> Suite:
    """Load each `NAME[:PATH]` benchmark (see `benchmarks.BENCHMARKS`), `limit` prompts per benchmark.

    Harmful benchmarks feed the attacks; XSTest's safe prompts measure over-refusal (for `xstest`,
    which holds both, each prompt goes where its label says).
    """
    suite = Suite()
    for value in specs:
        name, path = split_spec(value)
        if name not in BENCHMARKS:
            raise ValueError(f"--benchmark {value!r}: unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
        prompts = load_benchmark(name, path, limit=limit, seed=seed, data_dir=data_dir)
        suite.sources[name] = benchmark_source(name, path, data_dir)
        if name == "xstest":
            suite.safe += [p for p in prompts if p.meta.get("label") == "safe"]
            suite.harmful += [p for p in prompts if p.meta.get("label") != "safe"]
        elif is_harmful(name):
            suite.harmful += prompts
        else:
            suite.safe += prompts
    if not suite.harmful and not suite.safe:
        raise ValueError("the benchmarks gave no prompts")
    return suite


def load_drift_prompts(
    specs: Sequence[str], limit: int | None = None, seed: int = 0, data_dir: str | Path | None = None
) -> list[Prompt]:
    """Benign prompts for the distribution-shift check from `NAME[:PATH]` benchmarks (e.g. `alpaca`) or prompt
    files (`builtin:benign`, CSV / JSON / JSONL / TXT): duplicates by text dropped, then a seeded subset of `limit`."""
    from ..data.loaders import load_prompt_file

    prompts: list[Prompt] = []
    seen: set[str] = set()
    for value in specs:
        name, path = split_spec(value)
        if name in BENCHMARKS:
            loaded = load_benchmark(name, path, data_dir=data_dir)
        else:
            loaded = load_prompt_file(value)
            for prompt in loaded:
                prompt.source = prompt.source or value
        for prompt in loaded:
            key = " ".join(prompt.text.lower().split())
            if key not in seen:
                seen.add(key)
                prompts.append(prompt)
    if not prompts:
        raise ValueError(f"--drift {', '.join(specs)}: no prompts")
    return subsample(prompts, limit, seed)


_MODEL_ARGUMENT = {"offline": "reference", "harmbench": "model", "llamaguard": "model", "openai": "model"}


def judge_spec(value: str) -> tuple[str, dict[str, Any]]:
    """`NAME[:MODEL]` -> (judge name, constructor options): the classifier for harmbench / llamaguard,
    the grader model for openai, the reference LM for offline."""
    name, model = split_spec(value)
    if name not in JUDGES:
        raise ValueError(f"--judge {value!r}: unknown judge {name!r}; choose one of {sorted(JUDGES)}")
    if model is None:
        return name, {}
    if name not in _MODEL_ARGUMENT:
        raise ValueError(f"--judge {value!r}: the {name} judge takes no model")
    return name, {_MODEL_ARGUMENT[name]: model}


XSTEST_COMPLETIONS = "xstest_v2_completions_gpt4.csv"


def xstest_completions_path(path: str | Path) -> Path:
    """The XSTest v2 GPT-4 completions CSV: `path` itself, or that file inside a folder given as
    `path` (XSTest's own folder or a data folder laid out like ../shared/data)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / XSTEST_COMPLETIONS, path / "xstest" / XSTEST_COMPLETIONS):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{path}: no {XSTEST_COMPLETIONS} in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: XSTest completions file not found")
    return path
