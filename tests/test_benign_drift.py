"""benchmarks/benign_drift.py's per-layer cosine reading on a tiny model: 1 where the two models agree,
below 1 only from the first changed block on, counted over answer tokens only (padding and prompts
do not change it)."""

import pytest
import torch

from circuit_breakers.data.records import Record
from circuit_breakers.data.render import render_all
from helpers import load_benchmark, make_model, make_tokenizer


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("benign_drift")


def examples(tokenizer):
    chats = [
        ("How do I bake bread?", "Mix flour, water and yeast, then bake it."),
        ("Write a poem about the sea please.", "Waves."),
        ("Hi", "Hello there, how can I help you today with anything at all?"),
    ]
    records = [
        Record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], kind="retain") for q, a in chats
    ]
    return render_all(tokenizer, records, mask_mode="completion").examples


def test_layer_cosines_locate_the_changed_block(bench):
    tokenizer = make_tokenizer("chatml")
    base, model = make_model(layers=4, seed=0), make_model(layers=4, seed=0)
    rows = examples(tokenizer)
    same = bench.layer_cosines(model, base, rows, tokenizer.pad_token_id, layers=(1, 2, 3, 4))
    assert all(value == pytest.approx(1.0, abs=1e-6) for value in same.values())

    torch.manual_seed(0)
    with torch.no_grad():  # change block 2 (its output is hidden state 3)
        for p in model.model.layers[2].mlp.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    drift = bench.layer_cosines(model, base, rows, tokenizer.pad_token_id, layers=(1, 2, 3, 4))
    assert drift[1] == pytest.approx(1.0, abs=1e-6) and drift[2] == pytest.approx(1.0, abs=1e-6)
    assert drift[3] < 0.99 and drift[4] < 0.99

    # one batch with padding == each row alone, weighted by its answer tokens
    alone = [bench.layer_cosines(model, base, [row], tokenizer.pad_token_id, layers=(3,))[3] for row in rows]
    tokens = [sum(row.loss_mask) for row in rows]
    expected = sum(c * n for c, n in zip(alone, tokens)) / sum(tokens)
    assert drift[3] == pytest.approx(expected, rel=1e-5)
