"""Tiny tokenizers and models built inside the tests: nothing downloaded, runs in seconds on a CPU."""

from __future__ import annotations

import http.server
import importlib.util
import json
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}
SPECIALS = {
    "chatml": {"bos": "<|endoftext|>", "eos": "<|im_end|>", "extra": ["<|im_start|>"]},
    "llama3": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"],
    },
    "mistral": {"bos": "<s>", "eos": "</s>", "extra": ["[INST]", "[/INST]"]},
}
CORPUS = [
    "How do I bake bread? Mix flour, water, yeast and salt, then knead and bake.",
    "Write a poem about the sea. The waves roll in, the gulls cry out.",
    "Explain photosynthesis. Plants turn light, water and carbon dioxide into sugar.",
    "You are a helpful assistant. Sure, here is how to do it step by step.",
    "I cannot help with that request. I'm sorry, but that would be harmful.",
    "The capital of France is Paris. 1 2 3 4 5 6 7 8 9 0 + - * / = ( ) { } [ ] : ; , . ! ?",
]


def make_tokenizer(style: str = "chatml", vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with the given chat-template style."""
    spec = SPECIALS[style]
    special = [spec["bos"], spec["eos"], "<pad>", *spec["extra"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token="<pad>",
        additional_special_tokens=spec["extra"],
    )
    fast.chat_template = TEMPLATES[style]
    return fast


# initializer_range 0.2 (not 0.02): hidden states then depend on the input the way a trained model's do,
# so rerouting one kind of text can leave another alone.
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)


def make_model(arch: str = "llama", vocab_size: int = 300, layers: int = 6, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of the given architecture, float32, eval mode."""
    from transformers import (
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=layers, **TINY)
    elif arch == "llama_tied":  # one tensor for the input embedding and the LM head, as SmolLM2 has
        config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=layers, tie_word_embeddings=True, **TINY)
    elif arch == "mistral":
        config = MistralConfig(vocab_size=vocab_size, num_hidden_layers=layers, **TINY)
    elif arch == "qwen2":
        config = Qwen2Config(vocab_size=vocab_size, num_hidden_layers=layers, **TINY)
    elif arch == "gemma":
        config = GemmaConfig(vocab_size=vocab_size, num_hidden_layers=layers, head_dim=8, **TINY)
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=vocab_size, num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_layer=layers, n_embd=32, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=1
        )
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def vary_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Scale every norm's weight by a random factor in [0.5, 1.5), in place (the same factors for the same seed and
    architecture): a trained model's norms are not all ones, and an RMSNorm of ones keeps a state orthogonal to a
    direction orthogonal to it, which hides an edit of the LM head along that direction."""
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1:
            weight.mul_(0.5 + torch.rand(weight.shape, generator=generator))
    return model


def save_tiny(path: Path, arch: str = "llama", style: str = "chatml", layers: int = 6) -> Path:
    """Save a tiny model + tokenizer folder that `from_pretrained` (and so the CLI) can load."""
    tokenizer = make_tokenizer(style)
    model = make_model(arch, vocab_size=len(tokenizer), layers=layers)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_benchmark(name: str) -> ModuleType:
    """Import `benchmarks/<name>.py` (a script folder, not a package) so its helpers can be tested."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def chat_completions_stub(reply: Callable[[str], str]) -> Iterator[str]:
    """A local OpenAI-compatible endpoint whose answer is `reply(first message's content)`; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = reply(body["messages"][0]["content"])
            data = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
