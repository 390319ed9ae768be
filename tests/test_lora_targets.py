"""Where LoRA goes (issue 30, items 4, 5, 8, 9): only the language model's decoder blocks, never a layer the
forward bypasses, a recipe key that chooses attention / MLP / experts, and a recipe key for the block path."""

import json

import pytest
import torch

from circuit_breakers.adapters import add_lora, choose_lora_targets, lora_summary
from circuit_breakers.config import ConfigError, ModelConfig
from circuit_breakers.models import ModelError, find_decoder_layers, num_layers, set_layer_path
from circuit_breakers.recipes import parse_config
from circuit_breakers.training.run import setup_model, train
from helpers import save_tiny
from tiny_architectures import tiny_model


def lora_names(peft_model) -> list[str]:
    """Names of the modules that hold a LoRA adapter (lora_A)."""
    return sorted({name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name})


def merged_and_adapted_logits(peft_model, ids):
    with torch.no_grad():
        adapted = peft_model.eval()(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    return merged, adapted


def test_lora_stays_out_of_the_vision_tower_of_a_multimodal_wrapper():
    model = tiny_model("gemma3")  # Gemma3ForConditionalGeneration: 4 text blocks, a 2-layer SigLIP tower
    vision = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    peft_model = add_lora(model, ModelConfig(lora_init="random", lora_init_scale=0.1, lora_dropout=0.0), [0, 1])
    names = lora_names(peft_model)
    assert names and all(n.startswith("base_model.model.model.language_model.layers.") for n in names), names
    assert {n.split("layers.")[1].split(".")[0] for n in names} == {"0", "1"}
    merged = peft_model.merge_and_unload()
    for key, value in merged.model.vision_tower.state_dict().items():
        assert torch.equal(value, vision[key]), key


def test_a_layer_the_forward_bypasses_gets_no_lora_and_the_merge_equals_the_adapted_model():
    model = tiny_model("jamba")  # its Mamba mixer reads dt_proj.weight directly, never calling dt_proj
    cfg = ModelConfig(lora_init="random", lora_init_scale=0.1, lora_dropout=0.0)
    targets = choose_lora_targets(model, cfg, [0, 1, 2, 3])
    assert targets.left_out["bypassed by the forward"] == [
        "model.layers.0.mamba.dt_proj",
        "model.layers.2.mamba.dt_proj",
    ]
    peft_model = add_lora(model, cfg, [0, 1, 2, 3], targets)
    names = lora_names(peft_model)
    assert not [n for n in names if "dt_proj" in n]
    assert [n for n in names if "x_proj" in n]  # the mixer's other projections keep theirs
    merged, adapted = merged_and_adapted_logits(peft_model, torch.randint(3, 250, (2, 9)))
    assert torch.allclose(merged, adapted, atol=1e-5), (merged - adapted).abs().max()


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
def test_the_default_targets_work_on_models_peft_maps_to_fused_experts(arch):
    model = tiny_model(arch)  # block 0 dense, blocks 1..3 MoE with a shared expert
    cfg = ModelConfig(lora_init="random", lora_init_scale=0.1)  # lora_dropout 0.05: what every recipe sets
    targets = choose_lora_targets(model, cfg, [0, 1, 2])
    peft_model = add_lora(model, cfg, [0, 1, 2], targets)
    summary = lora_summary(peft_model, targets.left_out)
    attention = 5 if arch == "deepseek_v3" else 4  # DeepSeek's latent attention has five projections
    assert summary["per kind"] == {"attention": 3 * attention, "mlp": 0, "experts": 0}
    # peft reads gate_proj / up_proj / down_proj as the fused experts' names: the dense MLP and the shared
    # experts cannot hold module LoRA, and the experts are left out by default (they need lora_dropout 0)
    assert len(summary["left out"]["names peft maps to fused experts"]) == 9
    assert summary["left out"]["fused experts (add experts to lora_targets)"] == [
        f"model.layers.{i}.mlp.experts.{p}" for i in (1, 2) for p in ("down_proj", "gate_up_proj")
    ]
    merged, adapted = merged_and_adapted_logits(peft_model, torch.randint(3, 250, (2, 9)))
    assert torch.allclose(merged, adapted, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_lora_targets_all_adapts_the_fused_experts_too(arch):
    model = tiny_model(arch)
    cfg = ModelConfig(lora_targets="all", lora_dropout=0.0, lora_init="random", lora_init_scale=0.1)
    peft_model = add_lora(model, cfg, [0, 1, 2])
    summary = lora_summary(peft_model)
    experts = 4 if arch == "deepseek_v3" else 6  # gate_up_proj and down_proj of each MoE block
    assert summary["per kind"]["experts"] == experts and summary["per kind"]["attention"] > 0
    merged, adapted = merged_and_adapted_logits(peft_model, torch.randint(3, 250, (2, 9)))
    assert torch.allclose(merged, adapted, atol=1e-5)


def test_lora_targets_choose_kinds_and_names():
    def kinds(**settings):
        return lora_summary(add_lora(tiny_model("qwen2_moe"), ModelConfig(**settings), [0, 1]))

    assert kinds(lora_targets="attention")["per kind"] == {"attention": 8, "mlp": 0, "experts": 0}
    # mlp: the shared expert's projections and its gate, 4 per block
    assert kinds(lora_targets="mlp")["per kind"] == {"attention": 0, "mlp": 8, "experts": 0}
    assert kinds(lora_targets="q_proj,v_proj")["per name"] == {"q_proj": 2, "v_proj": 2}
    assert kinds(lora_target_modules="q_proj")["per name"] == {"q_proj": 2}  # the older key still works
    assert kinds(lora_target_modules="all-linear")["per kind"] == {"attention": 8, "mlp": 8, "experts": 0}


def test_bad_lora_targets_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="lora_targets is empty"):
        ModelConfig(lora_targets=" , ")
    with pytest.raises(ConfigError, match="neither one of attention, mlp, experts, all nor a module name"):
        ModelConfig(lora_targets="attention;mlp")
    with pytest.raises(ConfigError, match="older name of lora_targets: keep only lora_targets"):
        ModelConfig(lora_targets="attention", lora_target_modules="q_proj")
    with pytest.raises(
        ModelError,
        match="which block 0 of LlamaForCausalLM does not have; it has attention: k_proj, o_proj, q_proj, v_proj; mlp",
    ):
        choose_lora_targets(tiny_model("llama"), ModelConfig(lora_targets="qq_proj"), [0])
    with pytest.raises(ModelError, match="set lora_dropout: 0"):
        choose_lora_targets(tiny_model("mixtral"), ModelConfig(lora_targets="experts"), [0])
    with pytest.raises(ModelError, match="selects nothing LoRA can work on"):
        choose_lora_targets(tiny_model("mamba"), ModelConfig(lora_targets="mlp"), [0])


def test_the_run_summary_and_model_card_say_which_modules_got_lora(tmp_path):
    from test_training import CHOSEN, config, records

    tiny = save_tiny(tmp_path / "tiny", "llama", "chatml", layers=6)
    m, d, c = config(tiny, tmp_path / "run", *CHOSEN, "--max_steps", "1", "--merge", "false")
    result = train(m, d, c, *records(2))
    lora = json.loads((result.output_dir / "summary.json").read_text())["lora"]
    # target layers 2 and 4: blocks 0..3, each with four attention and three MLP projections
    assert lora["per kind"] == {"attention": 16, "mlp": 12, "experts": 0}
    assert lora["per name"]["q_proj"] == 4 and len(lora["modules"]) == 28
    assert "model.layers.3.mlp.down_proj" in lora["modules"] and lora["left out"] == {}
    card = (result.adapter_dir / "README.md").read_text()
    assert "| LoRA modules | 16 attention, 12 mlp, 0 experts (down_proj x4, gate_proj x4," in card


@pytest.mark.parametrize(
    ("arch", "path"), [("mamba", "backbone.layers"), ("falcon_mamba", "backbone.layers"), ("rwkv", "rwkv.blocks")]
)
def test_mamba_and_rwkv_blocks_are_found(arch, path):
    model = tiny_model(arch)
    assert find_decoder_layers(model) is model.get_submodule(path) and num_layers(model) == 4


def test_layers_path_names_the_blocks_of_a_model_no_known_path_fits(tmp_path):
    from transformers import BioGptConfig, BioGptForCausalLM

    from helpers import make_tokenizer

    tokenizer = make_tokenizer("chatml")
    config = BioGptConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4
    )
    torch.manual_seed(0)
    BioGptForCausalLM(config).save_pretrained(tmp_path / "biogpt")  # blocks at biogpt.layers
    tokenizer.save_pretrained(tmp_path / "biogpt")
    args = ["--model_name_or_path", str(tmp_path / "biogpt"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ModelError, match="with the recipe key layers_path"):
        setup_model(*parse_config([*args, "--target_layers", "2"])[::2])
    m, _, c = parse_config([*args, "--target_layers", "2", "--layers_path", "biogpt.layers"])
    peft_model, _, plan = setup_model(m, c)
    assert plan["num_layers"] == 4 and plan["lora"]["per kind"] == {"attention": 8, "mlp": 4, "experts": 0}


def test_a_layers_path_that_names_no_block_list_is_refused():
    model = tiny_model("mamba")
    with pytest.raises(ModelError, match="layers_path 'backbone.blocks' names nothing in MambaForCausalLM; its module"):
        set_layer_path(model, "backbone.blocks")
    with pytest.raises(ModelError, match="'backbone.embeddings' is not a ModuleList but Embedding"):
        set_layer_path(model, "backbone.embeddings")
    with pytest.raises(ConfigError, match="dotted attribute path such as backbone.layers"):
        ModelConfig(layers_path="backbone..layers")
    set_layer_path(model, "backbone.layers")
    assert num_layers(model) == 4
