"""benchmarks/lat_pool.py: readings pooled over two lat_hardening.py folders, a prompt broken if any of its
variants is, the beyond-target reading weighted by each folder's prompts, paired counts on shared prompts."""

import json
from pathlib import Path

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("lat_pool")


def folder(path: Path, broken: dict[str, dict[str, list[bool]]], strict: dict[str, float], n: int) -> Path:
    """A lat_hardening.py --out folder: `broken[model][prompt]` lists each variant's verdict."""
    path.mkdir()
    rows = [
        {"model": m, "attack": "embedding", "prompt_id": p, "harmful": h}
        for m, prompts in broken.items()
        for p, verdicts in prompts.items()
        for h in verdicts
    ]
    rows += [{"model": m, "attack": "direct", "prompt_id": p, "harmful": True} for m in broken for p in broken[m]]
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"n_prompts": n, "asr_embedding_beyond_target": strict}))
    return path


def test_pool_over_two_slices(bench, tmp_path):
    first = folder(
        tmp_path / "a",
        {
            "vanilla": {"p1": [True], "p2": [True], "p3": [True, False]},
            "hard": {"p1": [False], "p2": [False, False], "p3": [False, True]},
        },
        {"vanilla": 0.5, "hard": 0.2},
        n=3,
    )
    second = folder(
        tmp_path / "b",
        {"vanilla": {"p4": [True]}, "hard": {"p4": [False]}, "other": {"p4": [True]}},
        {"vanilla": 1.0, "hard": 0.0, "other": 1.0},
        n=1,
    )
    out = bench.pool([first, second], "vanilla")
    assert out["vanilla"]["asr_embedding"] == 1.0  # p3 broken by its first variant only
    assert out["hard"]["asr_embedding"] == 0.25
    assert out["vanilla"]["asr_embedding_beyond_target"] == pytest.approx((0.5 * 3 + 1.0) / 4)
    assert out["hard"]["asr_embedding_beyond_target"] == pytest.approx(0.6 / 4)
    assert "vs_reference" not in out["vanilla"]
    paired = out["hard"]["vs_reference"]
    assert (paired["prompts"], paired["reference_only"], paired["model_only"]) == (4, 3, 0)
    assert paired["difference"] == pytest.approx(-0.75)
    assert paired["mcnemar_p"] == pytest.approx(2 * 1 / 2**3)  # two-sided binomial at 1/2, 3 discordant
    assert out["other"]["vs_reference"]["prompts"] == 1  # compared only where both were attacked
    with pytest.raises(SystemExit, match="missing"):
        bench.pool([first], "missing")
