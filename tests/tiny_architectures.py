"""Tiny random models of many architectures (2-4 blocks, hidden 32), built in code: nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from helpers import make_tokenizer

HIDDEN = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, initializer_range=0.2)
ATTENTION = dict(**HIDDEN, num_key_value_heads=2)
MOE = dict(num_experts_per_tok=2, output_router_logits=False)


def tiny_config(arch: str, vocab_size: int = 300, layers: int = 4) -> transformers.PretrainedConfig:
    """The config of a tiny `arch` (a transformers model_type, or `gemma3` for the multimodal wrapper)."""
    t = transformers
    n = dict(vocab_size=vocab_size, num_hidden_layers=layers)
    plain = {
        "llama": t.LlamaConfig,
        "mistral": t.MistralConfig,
        "qwen2": t.Qwen2Config,
        "phi3": t.Phi3Config,
    }
    if arch in plain:
        return plain[arch](**n, **ATTENTION)
    if arch == "qwen3":
        return t.Qwen3Config(**n, **ATTENTION, head_dim=8)
    if arch == "gemma2":
        return t.Gemma2Config(**n, **ATTENTION, head_dim=8, sliding_window=8)
    if arch == "gemma3_text":
        return t.Gemma3TextConfig(**n, **ATTENTION, head_dim=8, sliding_window=8)
    if arch == "gemma3":  # the multimodal wrapper (Gemma3ForConditionalGeneration) with a tiny SigLIP tower
        text = t.Gemma3TextConfig(**n, **ATTENTION, head_dim=8, sliding_window=8)
        vision = t.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
        )
        return t.Gemma3Config(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            boi_token_index=vocab_size - 3,
            eoi_token_index=vocab_size - 2,
            image_token_index=vocab_size - 1,
        )
    if arch == "gpt_neox":
        return t.GPTNeoXConfig(**n, **HIDDEN)
    if arch == "falcon":
        return t.FalconConfig(**n, hidden_size=32, num_attention_heads=4, initializer_range=0.2)
    if arch == "gpt2":
        return t.GPT2Config(
            vocab_size=vocab_size, n_layer=layers, n_embd=32, n_head=4, n_positions=256, initializer_range=0.2
        )
    if arch == "mixtral":
        return t.MixtralConfig(**n, **ATTENTION, **MOE, num_local_experts=4)
    if arch == "qwen2_moe":
        return t.Qwen2MoeConfig(
            **n, **ATTENTION, **MOE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=32
        )
    if arch == "olmoe":
        return t.OlmoeConfig(**n, **ATTENTION, **MOE, num_experts=4)
    if arch in ("deepseek_v3", "glm4_moe"):
        moe = dict(**MOE, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1)
        moe.update(n_group=1, topk_group=1)
        if arch == "glm4_moe":
            return t.Glm4MoeConfig(**n, **ATTENTION, **moe, head_dim=8)
        mla = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4)
        return t.DeepseekV3Config(**n, **HIDDEN, num_key_value_heads=4, **moe, **mla)  # latent attention: no GQA
    if arch == "jamba":
        return t.JambaConfig(
            **n,
            **ATTENTION,
            num_experts=2,
            num_experts_per_tok=1,
            expert_layer_period=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_dt_rank=4,
        )
    if arch in ("mamba", "falcon_mamba"):
        cls = t.MambaConfig if arch == "mamba" else t.FalconMambaConfig
        return cls(**n, hidden_size=32, state_size=4, time_step_rank=4, initializer_range=0.2, use_mambapy=False)
    if arch == "rwkv":
        return t.RwkvConfig(**n, hidden_size=32, attention_hidden_size=32, intermediate_size=64, context_length=64)
    raise ValueError(f"no tiny config for {arch}")


def tiny_model(arch: str, vocab_size: int = 300, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of `arch`, float32, eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, layers)
    for part in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        part.bos_token_id, part.eos_token_id, part.pad_token_id = 0, 1, 2  # inside the tiny vocabulary
    if arch == "gemma3":
        model = transformers.Gemma3ForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(torch.float32).eval()


def save_tiny_arch(path: Path, arch: str, layers: int = 4) -> Path:
    """A model + tokenizer folder of a tiny `arch` that `load_model` (and so `train()`) can load."""
    tokenizer = make_tokenizer("chatml")
    model = tiny_model(arch, vocab_size=len(tokenizer), layers=layers)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
