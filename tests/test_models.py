"""Model loading, layer discovery, truncation, adapters and merged export."""

import pytest
import torch

from circuit_breakers import models
from circuit_breakers.representations import hidden_states
from helpers import make_model, make_tokenizer

ARCHS = ["llama", "mistral", "qwen2", "gemma", "gpt_neox", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_find_decoder_layers_and_hidden_state_indexing(arch):
    model = make_model(arch, layers=5)
    layers = models.find_decoder_layers(model)
    assert len(layers) == 5
    ids = torch.randint(3, 200, (2, 7))
    mask = torch.ones_like(ids)
    ours = hidden_states(model, ids, mask, [0, 2, 4])
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i in (0, 2, 4):  # index 5 would be after the final norm in HF; we never use it
        assert torch.allclose(ours[i], ref[i], atol=1e-6), i


@pytest.mark.parametrize("arch", ARCHS)
def test_truncation_keeps_lower_hidden_states(arch):
    model = make_model(arch, layers=6)
    ids = torch.randint(3, 200, (1, 9))
    mask = torch.ones_like(ids)
    before = hidden_states(model, ids, mask, [3])[3]
    dropped = models.truncate_layers(model, 3)
    assert len(dropped) == 3 and models.num_layers(model) == 3
    assert torch.allclose(hidden_states(model, ids, mask, [3])[3], before, atol=1e-6)


def test_unknown_architecture_gives_clear_error():
    with pytest.raises(models.ModelError, match="cannot find the decoder layers"):
        models.find_decoder_layers(torch.nn.Linear(2, 2))


def test_layer_validation():
    assert models.validate_layers([20, 10, 10], 32) == [10, 20]
    with pytest.raises(models.ModelError, match=r"out of range: this model has 30 layers"):
        models.validate_layers([10, 31], 30)
    with pytest.raises(models.ModelError, match="0 is the embedding output"):
        models.validate_layers([0], 30)


def test_default_target_layers_follow_paper_proportions():
    assert models.default_target_layers(32) == [10, 20]
    assert models.default_target_layers(30) == [9, 19]


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    tok = make_tokenizer("chatml")
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(models.ModelError, match="no chat template"):
        models.load_tokenizer(str(tmp_path))


def test_non_causal_model_is_refused(tmp_path):
    from transformers import T5Config, T5Model

    T5Model(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(models.ModelError, match="not a causal language model"):
        models.load_model(str(tmp_path))


def test_disabled_adapter_equals_base(tmp_path):
    from circuit_breakers.adapters import add_lora
    from circuit_breakers.config import ModelConfig

    model = make_model("llama", layers=4)
    ids = torch.randint(3, 200, (2, 6))
    base_logits = model(input_ids=ids).logits.clone()
    peft_model = add_lora(model, ModelConfig(lora_init="random", lora_init_scale=0.1), [0, 1, 2])
    peft_model.eval()
    assert not torch.allclose(peft_model(input_ids=ids).logits, base_logits, atol=1e-4)
    with peft_model.disable_adapter():
        assert torch.equal(peft_model(input_ids=ids).logits, base_logits)


def test_default_target_layers_stay_inside_small_models():
    """Issue 30, item 10: a 1-layer model got the default [1, 2], then an error about layer 2, which the
    user never passed. The defaults now lie in 1..n_layers for every depth."""
    from circuit_breakers.models import default_target_layers, validate_layers

    assert default_target_layers(1) == [1]
    assert default_target_layers(2) == [1, 2]
    assert default_target_layers(32) == [10, 20]
    for n in range(1, 80):
        layers = default_target_layers(n)
        assert validate_layers(layers, n) == layers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_deepest_index_is_the_last_block_before_the_final_norm(arch):
    """Index n (the number of blocks) is the last block's output un-normed; transformers' hidden_states[n] is the
    same tensor after the final norm (docs/training.md, Layers)."""
    model = make_model(arch, layers=3)
    ids = torch.randint(3, 200, (2, 7))
    mask = torch.ones_like(ids)
    ours = hidden_states(model, ids, mask, [3])[3]
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[3]
    norm = model.model.norm if arch == "llama" else model.transformer.ln_f
    assert not torch.allclose(ours, ref, atol=1e-4)
    assert torch.allclose(norm(ours), ref, atol=1e-5)


def hybrid_model(kind: str) -> torch.nn.Module:
    """Tiny Jamba / RecurrentGemma: their configs derive the layer types from the depth (read-only)."""
    from transformers import AutoModelForCausalLM, JambaConfig, RecurrentGemmaConfig

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    if kind == "jamba":
        config = JambaConfig(
            **common,
            num_key_value_heads=2,
            num_experts=2,
            expert_layer_period=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_dt_rank=4,
        )
    else:
        config = RecurrentGemmaConfig(**common, num_key_value_heads=2, lru_width=32, attention_window_size=8)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["jamba", "recurrent_gemma"])
def test_truncation_of_models_whose_layer_types_follow_the_depth(kind):
    model = hybrid_model(kind)
    ids = torch.randint(3, 200, (1, 6))
    mask = torch.ones_like(ids)
    before = hidden_states(model, ids, mask, [2])[2]
    dropped = models.truncate_layers(model, 2)
    assert len(dropped) == 2 and models.num_layers(model) == 2
    assert torch.allclose(hidden_states(model, ids, mask, [2])[2], before, atol=1e-6)
