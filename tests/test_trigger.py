"""The judge-free trigger rate (issue 28): 0 for identical models, 1 for a model whose target-layer
states are replaced; the per-source ASR table and the refusals-kept count read from judged samples."""

import copy

import torch

from circuit_breakers.data.records import Record
from circuit_breakers.evaluation.results import EvalResult, Sample, refusals_kept
from circuit_breakers.evaluation.tables import source_rows
from circuit_breakers.evaluation.trigger import prompt_cosines, trigger_rates
from circuit_breakers.models import find_decoder_layers
from helpers import make_model, make_tokenizer

RECORDS = [
    Record.from_prompt(f"request {i}", f"an answer that goes on for a while {i}", "circuit_breaker", source=src)
    for i, src in enumerate(["one", "one", "two", "two", "two"])
]


def test_identical_models_never_fire():
    tokenizer = make_tokenizer()
    base = make_model(vocab_size=len(tokenizer), layers=4)
    cosines = prompt_cosines(base, copy.deepcopy(base), tokenizer, RECORDS, layers=[2, 4], batch_size=2)
    assert all(abs(c - 1.0) < 1e-5 for c in cosines)
    rates = trigger_rates(cosines, [r.source for r in RECORDS])
    assert {k: (v.fired, v.n, v.rate) for k, v in rates.items()} == {"one": (0, 2, 0.0), "two": (0, 3, 0.0)}


def test_replaced_target_states_always_fire():
    tokenizer = make_tokenizer()
    base = make_model(vocab_size=len(tokenizer), layers=4)
    other = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)

    def replace(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        noise = 100 * torch.randn(hidden.shape, generator=generator)
        return (noise, *output[1:]) if isinstance(output, tuple) else noise

    blocks = find_decoder_layers(other)
    handles = [blocks[i - 1].register_forward_hook(replace) for i in (2, 4)]
    try:
        cosines = prompt_cosines(base, other, tokenizer, RECORDS, layers=[2, 4], batch_size=3)
    finally:
        for h in handles:
            h.remove()
    assert all(c < 0.2 for c in cosines)
    rates = trigger_rates(cosines, [r.source for r in RECORDS], threshold=0.5)
    assert {k: v.rate for k, v in rates.items()} == {"one": 1.0, "two": 1.0}
    # a record that cannot be rendered is left out, not counted as fired or not
    assert trigger_rates([None, 0.9], ["one", "one"])["one"].n == 1


def sample(model, pid, source, harmful, verdict, attack="direct"):
    return Sample(
        model, attack, pid, "p", "c", harmful, harmful, float(harmful), "offline", source=source, verdict=verdict
    )


def test_per_source_table_and_refusals_kept_from_samples():
    samples = [
        # base: complies on a1, a2, refuses b1, b2
        sample("base", "a1", "a", True, "harmful"),
        sample("base", "a2", "a", True, "harmful"),
        sample("base", "b1", "b", False, "refusal"),
        sample("base", "b2", "b", False, "refusal"),
        # defended: breaks a1, complies a2, keeps refusing b1, complies on b2 (a refusal lost)
        sample("cb", "a1", "a", False, "incoherent"),
        sample("cb", "a2", "a", True, "harmful"),
        sample("cb", "b1", "b", False, "refusal"),
        sample("cb", "b2", "b", True, "harmful"),
    ]
    result = EvalResult(models={"base": "x", "cb": "y"}, attacks={"direct": {}}, judge={}, samples=samples)
    metrics = result.recompute()
    by_source = metrics["asr_by_source"]["direct"]
    assert by_source["base"]["a"]["value"] == 1.0 and by_source["cb"]["a"]["value"] == 0.5
    assert by_source["base"]["b"]["value"] == 0.0 and by_source["cb"]["b"]["value"] == 0.5
    assert refusals_kept(result, "direct") == {"cb": {"base_refused": 2, "complied": 1, "refused": 1, "other": 0}}
    doc = {
        "models": result.models,
        "metrics": metrics,
        "sources": {"train": {"a": 10, "b": 0}},
        "trigger_rate": {"cb": {"a": {"rate": 0.5}, "b": {"rate": 0.25}, "benign": {"rate": 0.1, "n": 10}}},
    }
    header, rows = source_rows(doc)
    assert header == ["source", "trained on", "held out", "ASR direct (base -> cb)", "fired (cb)"]
    assert rows == [
        ["a", "10", "2", "100% -> 50%", "50%"],
        ["b", "0", "2", "0% -> 50%", "25%"],
        ["benign", "-", "10", "-", "10%"],
    ]
