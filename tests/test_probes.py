"""Harmfulness probes and the generation monitor (issue 9), on tiny models built in the test."""

import math

import pytest

from circuit_breakers.data.records import Record
from circuit_breakers.data.render import render_all
from circuit_breakers.guard.probes import (
    Probe,
    ProbeMonitor,
    ProbeSettings,
    calibrate,
    detection_rates,
    example_scores,
    token_features,
    train_probe,
    window_score,
)
from circuit_breakers.models import find_decoder_layers
from helpers import make_model, make_tokenizer

HARMFUL = [
    "Sure, here is how to do it step by step.",
    "Sure, here is how: mix flour, water, yeast and salt.",
    "Sure, here is the plan step by step.",
]
BENIGN = [
    "The waves roll in, the gulls cry out.",
    "Plants turn light, water and carbon dioxide into sugar.",
    "The capital of France is Paris.",
]


def examples(tokenizer, texts, n, kind):
    records = [Record.from_prompt(f"Write a poem about the sea {i}.", texts[i % len(texts)], kind) for i in range(n)]
    return render_all(tokenizer, records, "completion", 128).examples


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer("chatml")
    return make_model("llama", vocab_size=len(tokenizer), layers=4), tokenizer


def test_calibration_threshold_by_hand():
    probe = Probe(ProbeSettings(layer=1, hidden_size=4))
    benign = [i / 10 for i in range(1, 11)]  # 0.1 .. 1.0
    # 20% of 10 = 2 benign examples may fire: those above the third largest score, 0.8
    assert calibrate(probe, benign, 0.2) == pytest.approx(0.8)
    assert probe.settings.threshold == pytest.approx(0.8) and probe.settings.target_fpr == 0.2
    rates = detection_rates([0.95, 0.85, 0.5, 0.79], benign, 0.8)
    assert rates["recall"] == 0.5 and rates["false_positive_rate"] == pytest.approx(0.2)
    assert calibrate(probe, benign, 0.0) == pytest.approx(1.0)  # nothing benign may fire
    with pytest.raises(ValueError):
        calibrate(probe, [], 0.05)


def test_features_are_streamed_per_batch_and_cover_exactly_the_completion_tokens(tiny):
    model, tokenizer = tiny
    ex = examples(tokenizer, HARMFUL, 5, "circuit_breaker")
    batches = list(token_features(model, ex, layer=2, batch_size=2, pad_token_id=tokenizer.pad_token_id))
    assert [index for index, _, _ in batches] == [[0, 1], [2, 3], [4]]
    for index, feats, rows in batches:
        assert feats.shape == (sum(sum(ex[i].loss_mask) for i in index), 32)
        assert sorted(set(rows.tolist())) == index


def test_probe_separates_held_out_completions_and_survives_save_load(tiny, tmp_path):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    harmful, benign = examples(tokenizer, HARMFUL, 12, "circuit_breaker"), examples(tokenizer, BENIGN, 12, "retain")
    probe = train_probe(model, harmful[:8], benign[:8], layer=3, epochs=30, lr=1e-2, batch_size=4, pad_token_id=pad)
    threshold = calibrate(probe, example_scores(model, probe, benign[:8], pad_token_id=pad), 0.05)
    h_scores = example_scores(model, probe, harmful[8:], pad_token_id=pad)
    b_scores = example_scores(model, probe, benign[8:], pad_token_id=pad)
    assert min(h_scores) > max(b_scores), (h_scores, b_scores)  # held out: every harmful one above every benign
    assert detection_rates(h_scores, b_scores, threshold)["recall"] == 1.0

    loaded = Probe.load(probe.save(tmp_path / "probe"))
    assert loaded.settings == probe.settings
    a = example_scores(model, probe, harmful[8:], pad_token_id=pad)
    b = example_scores(model, loaded, harmful[8:], pad_token_id=pad)
    assert a == pytest.approx(b)
    with pytest.raises(FileNotFoundError, match="holds no probe"):
        Probe.load(tmp_path)


def test_probe_layer_out_of_range_is_refused(tiny):
    model, tokenizer = tiny
    ex = examples(tokenizer, HARMFUL, 2, "circuit_breaker")
    with pytest.raises(ValueError, match="out of range"):
        train_probe(model, ex, ex, layer=9)


def test_window_score_by_hand():
    assert window_score([0.1, 0.9, 0.8, 0.1], 2) == pytest.approx(0.85)  # the window (0.9, 0.8)
    assert window_score([0.2, 0.4], 8) == pytest.approx(0.3)  # shorter than the window: all tokens
    assert window_score([0.1, 0.9, 0.1, 0.9], 1) == pytest.approx(0.9)
    assert window_score([], 4) == 0.0


@pytest.mark.parametrize(
    "threshold,window,halts,new_tokens", [(-1.0, 1, True, 2), (-1.0, 3, True, 4), (2.0, 1, False, 12)]
)
def test_monitor_halts_generation_when_the_probe_fires_and_unhooks(tiny, threshold, window, halts, new_tokens):
    model, tokenizer = tiny
    probe = Probe(ProbeSettings(layer=2, hidden_size=32, threshold=threshold, window=window))
    monitor = ProbeMonitor(model, probe)
    ids = tokenizer("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")["input_ids"]
    with monitor.attached():
        out = model.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            stopping_criteria=[monitor],
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )
    new = out.shape[1] - ids.shape[1]
    assert bool(monitor.fired[0]) is halts
    # the first token is not judged (its state is the prompt's); then `window` judged tokens before firing
    assert new == new_tokens
    block = find_decoder_layers(model)[1]
    assert not block._forward_hooks  # removed after generation
    assert 0.0 <= float(monitor.scores[0]) <= 1.0 and not math.isnan(float(monitor.scores[0]))


def test_cli_probe_train_writes_probe_and_held_out_report(tmp_path):
    import json

    from circuit_breakers.cli.main import main
    from helpers import save_tiny

    model = save_tiny(tmp_path / "model", layers=4)

    def write(path, texts, n):
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": texts[i % len(texts)]},
                ]
            }
            for i in range(n)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    harmful, benign = write(tmp_path / "h.jsonl", HARMFUL, 20), write(tmp_path / "b.jsonl", BENIGN, 20)
    out = tmp_path / "model" / "probe"
    code = main(
        [
            "probe",
            "train",
            "--model",
            str(model),
            "--harmful",
            harmful,
            "--benign",
            benign,
            "--out",
            str(out),
            "--epochs",
            "20",
            "--lr",
            "1e-2",
            "--window",
            "4",
        ]
    )
    assert code == 0
    report = json.loads((out / "probe_report.json").read_text())
    assert report["counts"] == {
        "harmful_train": 14,
        "harmful_test": 6,
        "benign_train": 12,
        "benign_calibration": 4,
        "benign_test": 4,
    }
    assert report["layer"] == 2 and report["window"] == 4  # default: the middle of 4 blocks
    assert report["test"]["recall"] == 1.0
    probe = Probe.load(out)
    assert probe.settings.threshold == pytest.approx(report["threshold"]) and probe.settings.window == 4


def test_find_probe_auto_takes_the_probe_beside_a_local_model(tmp_path):
    """`serve --probe auto`: MODEL_DIR/probe when it holds a saved probe, else no guard; `none` is no guard
    and any other value is the probe folder itself."""
    from circuit_breakers.guard.probes import PROBE_CONFIG, find_probe

    model = tmp_path / "model"
    (model / "probe").mkdir(parents=True)
    assert find_probe(str(model), "auto") is None  # a folder without probe.json is not a probe
    (model / "probe" / PROBE_CONFIG).write_text("{}")
    assert find_probe(str(model), "auto") == str(model / "probe")
    assert find_probe(str(model), "none") is None
    assert find_probe(str(model), str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")


class ScriptedProbe(Probe):
    """A probe whose score the test controls: the i-th judged token gets `script(i)`; it records every
    hidden state it was asked to judge."""

    def __init__(self, settings, script):
        super().__init__(settings)
        self.script, self.seen = script, []

    def probability(self, hidden):
        import torch

        self.seen.append(hidden.detach().clone())
        return torch.full(hidden.shape[:-1], float(self.script(len(self.seen) - 1)), device=hidden.device)


def test_monitor_judges_every_generated_token_including_the_last_and_a_short_answer(tiny):
    """Issue 30 item 11: generate never computes the last token's hidden state and the window never filled
    on answers shorter than it; `finish` judges the last token and a short answer's mean."""
    import torch

    from circuit_breakers.representations import hidden_states

    model, tokenizer = tiny
    ids = tokenizer("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")["input_ids"]

    def run(probe, n):
        monitor = ProbeMonitor(model, probe)
        with monitor.attached():
            out = model.generate(
                ids,
                max_new_tokens=n,
                do_sample=False,
                stopping_criteria=[monitor],
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
                return_dict_in_generate=True,
            )
            monitor.finish(out.sequences, out.past_key_values)
        return monitor, out.sequences

    # every generated token judged, each on its own hidden state (the same as a full forward's)
    probe = ScriptedProbe(ProbeSettings(layer=2, hidden_size=32, threshold=0.5, window=1), lambda i: 0.0)
    monitor, seq = run(probe, 6)
    assert len(probe.seen) == 6 and not bool(monitor.fired[0])
    full = hidden_states(model, seq, torch.ones_like(seq), [2])[2][0, ids.shape[1] :]
    assert torch.allclose(torch.cat(probe.seen), full, atol=1e-5)

    # only the last token is harmful: halted
    last = ScriptedProbe(ProbeSettings(layer=2, hidden_size=32, threshold=0.5, window=1), lambda i: float(i == 5))
    assert bool(run(last, 6)[0].fired[0])

    # an answer shorter than the window: the mean of its tokens is judged, as `window_score` does
    short = ScriptedProbe(ProbeSettings(layer=2, hidden_size=32, threshold=0.5, window=8), lambda i: 0.9)
    monitor, _ = run(short, 4)
    assert bool(monitor.fired[0]) and float(monitor.scores[0]) == pytest.approx(0.9)
    quiet = ScriptedProbe(ProbeSettings(layer=2, hidden_size=32, threshold=0.5, window=8), lambda i: 0.3)
    assert not bool(run(quiet, 4)[0].fired[0])
