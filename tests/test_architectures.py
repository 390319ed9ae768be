"""The architecture matrix (issue 30): tiny random models of many architectures train a few steps through
`train()`, and the merged export has every block, equals base + adapter, and leaves everything outside the
adapted modules of the trained blocks exactly as the base model had it."""

import pytest
import torch
from peft import PeftModel

from circuit_breakers.adapters import lora_summary
from circuit_breakers.models import find_layer_path, load_model, num_layers
from circuit_breakers.training.run import train
from test_training import config, records
from tiny_architectures import save_tiny_arch

ARCHITECTURES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gemma3",  # Gemma3ForConditionalGeneration with a SigLIP vision tower
    "phi3",
    "gpt_neox",
    "falcon",
    "gpt2",
    "mixtral",
    "qwen2_moe",
    "olmoe",
    "deepseek_v3",
    "glm4_moe",
    "jamba",
    "mamba",
    "falcon_mamba",
    "rwkv",
]
# (architecture, extra settings): the fused experts adapted too, which needs lora_dropout 0
VARIANTS = [(arch, ()) for arch in ARCHITECTURES] + [
    ("mixtral", ("--lora_targets", "all", "--lora_dropout", "0")),
    ("deepseek_v3", ("--lora_targets", "all", "--lora_dropout", "0")),
]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "extra"), VARIANTS, ids=[f"{a}{'-all' if e else ''}" for a, e in VARIANTS])
def test_training_exports_a_full_merged_model_equal_to_base_plus_adapter(arch, extra, tmp_path):
    base_dir = save_tiny_arch(tmp_path / "base", arch, layers=4)
    settings = ["--target_layers", "3", "--max_steps", "2", "--learning_rate", "1e-2", "--save_steps", "100"]
    m, d, c = config(
        base_dir, tmp_path / "run", *settings, "--lora_init", "random", "--lora_init_scale", "0.05", *extra
    )
    result = train(m, d, c, *records(2))
    lora = result.summary["lora"]
    assert result.summary["lora_blocks"] == [0, 1, 2] and result.summary["trained_layers"] == 3
    assert lora["per kind"]["attention"] > 0, lora
    if extra:
        assert lora["per kind"]["experts"] > 0, lora

    base = load_model(str(base_dir), dtype="float32").eval()
    merged = load_model(str(result.merged_dir), dtype="float32").eval()
    assert num_layers(merged) == 4  # block 3 was dropped while training and is back
    adapted = PeftModel.from_pretrained(load_model(str(base_dir), dtype="float32"), str(result.adapter_dir)).eval()
    assert lora_summary(adapted)["modules"] == lora["modules"]  # on the full model: not on the blocks above too
    ids = torch.randint(3, 250, (2, 11))
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    # Jamba: rounding the merged weights to float32, with no LoRA at all, already moves its logits by about the
    # bound (its selective scan amplifies it); a LoRA the forward bypasses moved them by far more
    tolerance = 2e-5 if arch == "jamba" else 1e-5
    assert torch.allclose(got, want, atol=tolerance, rtol=0), (got - want).abs().max()

    # exactly the weights of the modules that got LoRA changed: all of them, and nothing else (embeddings,
    # vision tower, LM head, final norm, block 3, the biases and norms inside blocks 0..2)
    before, after = base.state_dict(), merged.state_dict()
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    parameters = set(lora["modules"]) & set(before)  # fused expert weights are parameters themselves
    expected = {f"{name}.weight" for name in lora["modules"] if name not in parameters} | parameters
    assert changed == expected
    path = find_layer_path(base)
    assert all(name.startswith((f"{path}.0.", f"{path}.1.", f"{path}.2.")) for name in lora["modules"])
