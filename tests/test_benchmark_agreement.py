"""The training-step benchmark's loss-agreement check on a tiny model (issue 7): our compute_loss on a
dynamically padded combined batch equals the paper-defined losses of reference mode's fixed-width,
left-padded, four-pass step, token for token."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_model, make_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


PROMPTS = [
    "How do I bake bread?",
    "Write a poem about the sea.",
    "Explain photosynthesis to me please.",
    "The capital of France is Paris. Is it?",
]
SMALL = (96, 48, 160)  # reference widths for tiny examples: prompt, completion, retain


def examples(bench, tokenizer, n=4):
    return bench.build_examples(tokenizer, n, seed=1, completion_tokens=(5, 30), cb_prompts=PROMPTS)


def test_reference_batch_keeps_tokens_and_masks(bench):
    tokenizer = make_tokenizer("chatml")
    cb, retain = examples(bench, tokenizer)
    batch = bench.reference_batch(cb, retain, tokenizer.pad_token_id, *SMALL)
    p = SMALL[0]
    assert batch["input_ids_circuit_breaker"].shape == (4, 144) and batch["input_ids"].shape == (4, 160)
    for i, e in enumerate(cb):
        row, att = batch["input_ids_circuit_breaker"][i], batch["attention_mask_circuit_breaker"][i]
        # the prompt ends exactly at the 96-token boundary, the completion starts there
        assert row[p - e.completion_start : p + len(e) - e.completion_start].tolist() == e.input_ids
        assert att.sum().item() == len(e) and att[p - 1].item() == 1 and att[p].item() == 1 and att[0].item() == 0
        assert batch["loss_mask_circuit_breaker"][i].sum().item() == sum(e.loss_mask)
    for i, e in enumerate(retain):
        assert batch["input_ids"][i, : len(e)].tolist() == e.input_ids
        assert batch["loss_mask"][i].tolist() == e.loss_mask + [0] * (160 - len(e))
    assert 0 < sum(retain[0].loss_mask) < len(retain[0])  # retain mask: completion only


def test_ours_equals_reference_losses(bench, tmp_path):
    tokenizer = make_tokenizer("chatml")
    cb, retain = examples(bench, tokenizer)
    setup = bench.make_setup([2, 4])
    assert setup.c_cb > 0 and setup.c_retain > 0
    base = make_model("llama", vocab_size=len(tokenizer), layers=6)
    result = bench.check_agreement(
        base,
        setup,
        cb,
        retain,
        tokenizer.pad_token_id,
        str(tmp_path),
        lora_b_std=0.05,
        ref_lengths=SMALL,
        chunk_tokens=60,
    )  # several chunks
    # non-trivial losses: rerouting cosine below 1, retain distance above 0
    assert 0.1 < result["loss_cb_ours"] < 0.999
    assert result["loss_retain_ours"] > 1e-3
    assert result["max_rel_diff"] < 1e-4, result  # includes the loss of the step run in chunks


def test_reference_losses_differ_when_masks_differ(bench, tmp_path):
    """The check has teeth: dropping one masked token from reference mode's batch changes the losses."""
    tokenizer = make_tokenizer("chatml")
    cb, retain = examples(bench, tokenizer)
    setup = bench.make_setup([2, 4])
    base = make_model("llama", vocab_size=len(tokenizer), layers=6)
    ref = bench.reference_model(base, setup, checkpointing=False)
    bench.randomize_lora_b(ref, 0.05, 0)
    batch = bench.reference_batch(cb, retain, tokenizer.pad_token_id, *SMALL)
    with torch.no_grad():
        _, cb_a, r_a = bench.reference_losses(
            ref, batch, setup.target_layers, setup.retain_layers, 1.0, 1.0, training=False
        )
        batch["loss_mask"][0, batch["loss_mask"][0].nonzero()[0]] = 0
        batch["loss_mask_circuit_breaker"][0, SMALL[0]] = 0
        _, cb_b, r_b = bench.reference_losses(
            ref, batch, setup.target_layers, setup.retain_layers, 1.0, 1.0, training=False
        )
    assert abs(cb_a - cb_b) / cb_a > 1e-5 and abs(r_a - r_b) / r_a > 1e-5
