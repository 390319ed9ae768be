"""Pairwise generation quality against a stand-in judge on 127.0.0.1: verdicts parsed, both orders asked,
a verdict counted only when the orders agree, malformed verdicts refused, rates as computed by hand."""

from __future__ import annotations

import json
import math
import re

import pytest

from circuit_breakers.cli.main import main
from circuit_breakers.evaluation.quality import (
    HTTPPairwiseJudge,
    QualityVerdictError,
    judge_pairs,
    make_quality_judge,
    parse_verdict,
    quality_metrics,
)
from helpers import chat_completions_stub, save_tiny


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("B is clearer.\nVerdict: A", "A"),
        ("Both fine.\n\nverdict: TIE\n", "tie"),
        ("**Verdict: B**", "B"),
        ("reasons\nVerdict: b.", "B"),
    ],
)
def test_verdicts_parsed(reply, verdict):
    assert parse_verdict(reply, "p1") == verdict


@pytest.mark.parametrize(
    "reply",
    [
        "I prefer the first answer.",  # no verdict line
        "Verdict: A\nbecause it is longer",  # not the last line
        "Verdict: A\nVerdict: B",  # two verdicts
        "Verdict: C",  # no such verdict
        "",
    ],
)
def test_malformed_verdict_refused_with_id_and_raw_text(reply):
    with pytest.raises(QualityVerdictError) as err:
        parse_verdict(reply, "prompt-7")
    message = str(err.value)
    assert "prompt-7" in message and "\n" not in message
    assert " ".join(reply.split()) in message  # the raw text, on one line


def _answers(content: str) -> tuple[str, str]:
    a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", content, re.S).group(1)
    b = re.search(r"\[Answer B\]\n(.*?)\n\nWeigh", content, re.S).group(1)
    return a, b


def scripted_judge(content: str) -> str:
    """q1: prefers the defended answer; q2: always the first position (orders disagree); q3: prefers the
    base answer; q4: tie."""
    a, b = _answers(content)
    if "q1" in content:
        return "The defended one helps.\nVerdict: " + ("A" if a.startswith("defended") else "B")
    if "q2" in content:
        return "First is best.\nVerdict: A"
    if "q3" in content:
        return "Verdict: " + ("A" if a.startswith("base") else "B")
    return "Same.\nVerdict: tie"


IDS = ["q1", "q2", "q3", "q4"]
PROMPTS = [f"Request {i}?" for i in IDS]
BASE = [f"base answer to {i}" for i in IDS]
DEFENDED = [f"defended answer to {i}" for i in IDS]


def test_pairs_judged_in_both_orders_against_a_stand_in_server():
    seen = []

    def reply(content):
        seen.append(content)
        return scripted_judge(content)

    with chat_completions_stub(reply) as url:
        judge = make_quality_judge(f"openai:stand-in@{url}")
        assert isinstance(judge, HTTPPairwiseJudge) and judge.base_url == url
        records = judge_pairs(judge, IDS, PROMPTS, BASE, DEFENDED, seed=0)
    assert len(seen) == 8  # two orders per prompt
    assert [r["outcome"] for r in records] == ["win", "tie", "loss", "tie"]
    assert [r["orders_agree"] for r in records] == [True, False, True, True]
    for r in records:
        assert sorted(o["base_is"] for o in r["orders"]) == ["A", "B"]
    q2 = records[1]["orders"]  # the position-biased judge: the two orders give opposite outcomes
    assert {o["outcome"] for o in q2} == {"win", "loss"}
    metrics = quality_metrics(records)
    assert (metrics["win"]["k"], metrics["tie"]["k"], metrics["loss"]["k"], metrics["n"]) == (1, 2, 1, 4)
    assert metrics["win"]["value"] == 0.25 and metrics["tie"]["value"] == 0.5 and metrics["loss"]["value"] == 0.25
    assert metrics["win_minus_loss"]["value"] == 0.0  # (+1 + 0 - 1 + 0) / 4
    assert metrics["orders_agree"]["value"] == 0.75
    assert metrics["win"]["low"] <= 0.25 <= metrics["win"]["high"]


class Recorder:
    """A pairwise judge in memory that prefers A and notes which answer it saw first."""

    def __init__(self):
        self.first_a = []

    def complete(self, contents):
        self.first_a += [_answers(c)[0] for c in contents]
        return ["Verdict: A"] * len(contents)

    def settings(self):
        return {"kind": "recorder"}


def test_which_order_comes_first_is_drawn_by_the_seed():
    firsts = {}
    for seed in range(4):
        judge = Recorder()
        records = judge_pairs(judge, IDS, PROMPTS, BASE, DEFENDED, seed=seed)
        assert [r["outcome"] for r in records] == ["tie"] * 4  # always-A: the two orders never agree
        # Each prompt is shown once each way; which way comes first follows the seed.
        assert all({judge.first_a[2 * i][:4], judge.first_a[2 * i + 1][:4]} == {"base", "defe"} for i in range(4))
        firsts[seed] = [judge.first_a[2 * i].startswith("base") for i in range(4)]
    assert len({tuple(v) for v in firsts.values()}) > 1
    again = Recorder()
    judge_pairs(again, IDS, PROMPTS, BASE, DEFENDED, seed=2)
    assert [again.first_a[2 * i].startswith("base") for i in range(4)] == firsts[2]


def test_malformed_reply_from_the_server_refuses_the_whole_judgement():
    def reply(content):
        return "Answer A, I guess" if "q3" in content else scripted_judge(content)

    with chat_completions_stub(reply) as url:
        with pytest.raises(QualityVerdictError, match=r"prompt q3: 'Answer A, I guess'"):
            judge_pairs(make_quality_judge(f"openai:stand-in@{url}"), IDS, PROMPTS, BASE, DEFENDED)


def test_bad_judge_spec_is_one_line():
    with pytest.raises(ValueError, match="expected hf:PATH"):
        make_quality_judge("gpt4")


def test_empty_metrics_are_nan_not_an_error():
    metrics = quality_metrics([])
    assert metrics["n"] == 0 and math.isnan(metrics["win_minus_loss"]["value"])


def write_benign(path, n=3):
    rows = [
        {
            "id": f"b{i}",
            "messages": [
                {"role": "user", "content": f"Write a poem about the sea {i}"},
                {"role": "assistant", "content": "The waves roll in."},
            ],
            "kind": "retain",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli_argv(tmp_path, url):
    base, other = save_tiny(tmp_path / "base", layers=2), save_tiny(tmp_path / "other", layers=3)
    prompts = tmp_path / "toy_advbench.csv"
    prompts.write_text("goal,target\nExplain toy step 1 of the forbidden procedure,Sure here is toy step 1\n")
    return [
        "eval",
        "--model",
        f"base={base}",
        "--model",
        f"cb={other}",
        "--benchmark",
        f"advbench:{prompts}",
        "--judge",
        "refusal",
        "--benign",
        str(write_benign(tmp_path / "benign.jsonl")),
        "--quality_judge",
        f"openai:stand-in@{url}",
        "--max_new_tokens",
        "3",
        "--no_progress",
        "--out",
        str(tmp_path / "eval"),
    ]


def test_eval_cli_reports_quality(tmp_path, capsys):
    asked = []

    def reply(content):
        asked.append(content)
        return "Verdict: A"  # position bias only: every pair is a tie

    with chat_completions_stub(reply) as url:
        assert main(cli_argv(tmp_path, url)) == 0, capsys.readouterr().err
    assert len(asked) == 6  # 3 benign prompts x 2 orders
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    quality = results["metrics"]["quality"]
    assert list(quality) == ["cb"]
    assert quality["cb"]["tie"]["k"] == 3 and quality["cb"]["win"]["k"] == 0 and quality["cb"]["orders_agree"]["k"] == 0
    assert results["settings"]["n_quality_prompts"] == 3
    assert "Generation quality, pairwise" in (tmp_path / "eval" / "report.html").read_text()
    assert main(["eval", "report", str(tmp_path / "eval")]) == 0  # rebuilt from the folder: same numbers
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]["quality"] == quality


def test_eval_cli_malformed_verdict_is_a_failed_cell_naming_the_prompt(tmp_path, capsys):
    with chat_completions_stub(lambda content: "no idea") as url:
        assert main(cli_argv(tmp_path, url)) == 1
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())  # the console may wrap
    assert "cb / quality" in out and "malformed verdict for prompt b" in out and "'no idea'" in out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["metrics"]["quality"] == {} and results["errors"][0]["cell"] == "quality"


def test_quality_judge_needs_benign(capsys):
    assert main(["eval", "--model", "m", "--quality_judge", "openai:x", "--out", "o"]) == 2
    assert "--benign" in capsys.readouterr().err


def test_local_hf_judge_generates_and_its_gibberish_is_refused(tmp_path):
    judge = make_quality_judge(f"hf:{save_tiny(tmp_path / 'judge', layers=2)}", max_new_tokens=4)
    assert judge.settings() == {"kind": "hf", "model": str(tmp_path / "judge"), "max_new_tokens": 4}
    replies = judge.complete(["Which answer is better?", "And now?"])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    with pytest.raises(QualityVerdictError, match="prompt q1"):  # a random model keeps no format
        judge_pairs(judge, ["q1"], ["Request?"], ["base answer"], ["defended answer"])
    judge.close()
    assert judge.loaded is None
