"""A step run in chunks of rows (issue 7) gives the same loss, gradient and metrics as the whole batch."""

import pytest
import torch

from circuit_breakers.adapters import add_lora
from circuit_breakers.config import CircuitBreakerConfig, ConfigError, ModelConfig
from circuit_breakers.training import CircuitBreakerTrainer, chunk_rows
from helpers import make_model


def test_chunk_rows_sorts_by_length_and_respects_the_budget():
    lengths = [3, 9, 5, 9, 1, 7]
    attention = torch.zeros(6, 10, dtype=torch.long)
    for row, n in enumerate(lengths):
        attention[row, :n] = 1
    chunks = chunk_rows(attention, 20)
    # longest first: rows 1 and 3 (9 tokens: 2 x 9 = 18 <= 20), then row 5 (7) with 2 (5): 2 x 7 = 14, + row 0
    # (3 x 7 = 21 > 20) starts the next with row 4
    assert [(rows.tolist(), width) for rows, width in chunks] == [([1, 3], 9), ([2, 5], 7), ([0, 4], 3)]
    assert all(len(rows) * width <= 20 for rows, width in chunks)
    assert chunk_rows(attention, 0)[0][0].tolist() == list(range(6)) and chunk_rows(attention, 0)[0][1] == 9
    # a row longer than the budget is a chunk of its own
    assert [r.tolist() for r, _ in chunk_rows(attention, 4)][:2] == [[1], [3]]
    # left padding: the width reaches the last real token
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert [w for _, w in chunk_rows(left, 100)] == [4]


def test_negative_chunk_budget_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="max_chunk_tokens"):
        CircuitBreakerConfig(output_dir=str(tmp_path), max_chunk_tokens=-1, use_cpu=True, report_to="none")


def batch(seed=0, rows=3, width=24, vocab=300):
    """3 circuit-breaker + 3 retain rows of different lengths, right-padded, completions masked."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * rows
    ids = torch.randint(3, vocab, (n, width), generator=gen)
    attention = torch.zeros(n, width, dtype=torch.long)
    loss = torch.zeros(n, width, dtype=torch.long)
    for row, length in enumerate([24, 9, 15, 20, 6, 12][:n]):
        attention[row, :length] = 1
        loss[row, length // 3 : length] = 1
    ids = ids * attention  # pad id 0
    is_cb = (torch.arange(n) < rows).long()[:, None]
    return {"input_ids": ids, "attention_mask": attention, "cb_mask": loss * is_cb, "retain_mask": loss * (1 - is_cb)}


def trainer_for(tmp_path, max_chunk_tokens, **settings):
    base = make_model("llama", layers=4, seed=3)
    model = add_lora(base, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_init="random"), range(4))
    cfg = CircuitBreakerConfig(
        output_dir=str(tmp_path),
        max_steps=10,
        use_cpu=True,
        report_to="none",
        retain_layers="all",
        stall_check_steps=0,
        max_chunk_tokens=max_chunk_tokens,
        **settings,
    )
    trainer = CircuitBreakerTrainer(model=model, args=cfg, target_layers=[2, 4], retain_layers=[1, 2, 3, 4])
    trainer.state.global_step = 3
    trainer.current_gradient_accumulation_steps = 1
    return trainer, model


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"representation": "centered", "retain_distance": "relative_squared"},
        {"representation": "no_outliers", "num_outlier_dims": 2, "retain_distance": "relative"},
    ],
)
def test_chunked_step_equals_whole_batch(tmp_path, settings):
    inputs = batch()
    whole, model_w = trainer_for(tmp_path / "w", 0, **settings)
    loss_w = whole.training_step(model_w, dict(inputs))
    grads_w = gradients(model_w)

    chunked, model_c = trainer_for(tmp_path / "c", 40, **settings)
    assert len(chunk_rows(inputs["attention_mask"], 40)) >= 3
    loss_c = chunked.training_step(model_c, dict(inputs))
    grads_c = gradients(model_c)

    assert loss_w.item() > 0
    assert loss_c.item() == pytest.approx(loss_w.item(), rel=1e-5)
    assert grads_w.keys() == grads_c.keys() and any(g.abs().sum() > 0 for g in grads_w.values())
    for name, g in grads_w.items():  # float noise only: summation order differs between the two
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)
    assert whole.step_metrics.pop("chunks") == [1.0] and chunked.step_metrics.pop("chunks")[-1] >= 3
    for key, values in whole.step_metrics.items():
        assert chunked.step_metrics[key][-1] == pytest.approx(values[-1], rel=1e-5, abs=1e-7), key
    if settings.get("representation") == "no_outliers":
        assert chunked.outlier_dims == whole.outlier_dims and len(whole.outlier_dims) == 2


@pytest.mark.parametrize("chunk", [0, 16])
def test_bf16_setting_runs_the_step_under_autocast_with_float32_weights_and_loss(tmp_path, chunk):
    """`bf16: true` was accepted and ignored (the step never calls the forward accelerate wraps)."""
    results = {}
    for bf16 in (False, True):
        trainer, model = trainer_for(tmp_path / str(bf16), chunk, bf16=bf16)
        seen: set[torch.dtype] = set()
        layer = model.get_base_model().model.layers[1].mlp.down_proj
        handle = layer.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
        try:
            loss = trainer.training_step(model, batch())
        finally:
            handle.remove()
        results[bf16] = (seen, loss, gradients(model))
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert results[False][0] == {torch.float32} and results[True][0] == {torch.bfloat16}
    assert results[True][1].dtype == torch.float32
    assert results[True][1].item() == pytest.approx(results[False][1].item(), rel=0.05)
    g32 = torch.cat([g.flatten() for g in results[False][2].values()])
    g16 = torch.cat([g.flatten() for g in results[True][2].values()])
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.95


def test_bf16_recipe_is_accepted_on_a_machine_without_an_accelerator(tmp_path, monkeypatch):
    """TrainingArguments refused `bf16: true` on a CPU-only machine ("doesn't support bf16/gpu")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = CircuitBreakerConfig(output_dir=str(tmp_path), bf16=True, report_to="none")
    assert cfg.bf16 and cfg.use_cpu
    assert not CircuitBreakerConfig(output_dir=str(tmp_path), report_to="none").use_cpu
