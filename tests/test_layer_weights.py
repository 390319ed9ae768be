"""Learned layer weights (issue 9): softmax weights over the target layers, trained with the adapters."""

import pytest
import torch

from circuit_breakers.config import CircuitBreakerConfig, ConfigError
from circuit_breakers.representations import hidden_states, stacked
from circuit_breakers.training.trainer import LAYER_WEIGHTS_FILE
from test_chunked_step import batch, trainer_for


def test_logit_gradient_is_the_per_layer_loss_minus_the_weighted_mean(tmp_path):
    trainer, model = trainer_for(tmp_path, 0, layer_weights="learned")
    inputs = batch()
    # per-layer mean ReLU(cos) over the circuit-breaker tokens, computed here from the two passes
    mask = (inputs["cb_mask"] * inputs["attention_mask"]).float()
    with torch.no_grad():
        adapted = stacked(hidden_states(model, inputs["input_ids"], inputs["attention_mask"], [2, 4]), [2, 4])
        with model.disable_adapter():
            frozen = stacked(hidden_states(model, inputs["input_ids"], inputs["attention_mask"], [2, 4]), [2, 4])
    cos = torch.nn.functional.cosine_similarity(adapted, frozen, dim=-1).relu()
    per_layer = (cos * mask).sum(dim=(1, 2)) / mask.sum()
    trainer.training_step(model, dict(inputs))
    c_cb = trainer.step_metrics["coef_rerouting"][-1]
    # d/dz_l sum_k softmax(z)_k L_k at z = 0 (weights 1/2): (1/2) (L_l - mean_k L_k)
    want = c_cb * 0.5 * (per_layer - per_layer.mean())
    torch.testing.assert_close(trainer.layer_logits.grad, want, rtol=1e-4, atol=1e-7)
    assert trainer.step_metrics["layer_weight_2"] == [0.5] and trainer.step_metrics["layer_weight_4"] == [0.5]


def test_logits_have_their_own_optimizer_group_and_move_towards_the_harder_layer(tmp_path):
    trainer, model = trainer_for(tmp_path, 0, layer_weights="learned", layer_weight_lr=0.5, learning_rate=1e-3)
    trainer.create_optimizer()
    groups = [g for g in trainer.optimizer.param_groups if any(p is trainer.layer_logits for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == 0.5 and groups[0]["weight_decay"] == 0.0
    trainer.training_step(model, batch())
    grad = trainer.layer_logits.grad.clone()
    trainer.optimizer.step()
    weights = trainer.layer_weights()
    assert weights.sum().item() == pytest.approx(1.0)
    # descent: the layer whose rerouting loss is larger (positive gradient) loses weight
    assert (weights[grad.argmax()] < 0.5) and (weights[grad.argmin()] > 0.5)


def test_uniform_weights_add_no_parameter(tmp_path):
    trainer, _ = trainer_for(tmp_path, 0)
    assert trainer.layer_logits is None and trainer.layer_weights() is None


def test_unknown_layer_weights_mode_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="layer_weights"):
        CircuitBreakerConfig(output_dir=str(tmp_path), layer_weights="soft", use_cpu=True, report_to="none")


def test_checkpoint_round_trip_restores_the_logits(tmp_path):
    trainer, model = trainer_for(tmp_path / "a", 0, layer_weights="learned")
    with torch.no_grad():
        trainer.layer_logits.copy_(torch.tensor([0.3, -0.7]))
    trainer.save_extra_state(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / LAYER_WEIGHTS_FILE).is_file()
    other, _ = trainer_for(tmp_path / "b", 0, layer_weights="learned")
    other.model = other.model_wrapped = model
    other.load_extra_state(str(tmp_path / "ckpt"))
    torch.testing.assert_close(other.layer_logits.detach(), torch.tensor([0.3, -0.7]))


def test_chunked_step_with_learned_weights_equals_the_whole_batch(tmp_path):
    inputs = batch()
    whole, model_w = trainer_for(tmp_path / "w", 0, layer_weights="learned")
    loss_w = whole.training_step(model_w, dict(inputs))
    chunked, model_c = trainer_for(tmp_path / "c", 40, layer_weights="learned")
    loss_c = chunked.training_step(model_c, dict(inputs))
    assert chunked.step_metrics["chunks"][-1] >= 3
    assert loss_c.item() == pytest.approx(loss_w.item(), rel=1e-5)
    torch.testing.assert_close(chunked.layer_logits.grad, whole.layer_logits.grad, rtol=1e-4, atol=1e-8)
    assert whole.layer_logits.grad.abs().sum() > 0
