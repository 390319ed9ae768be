"""The vLLM generation backend against a stand-in engine with vLLM's `LLM.generate(prompts, SamplingParams)`
interface (RequestOutput.outputs[0].token_ids / .text / .finish_reason): prompts, stop ids and lengths pass
through, outputs come back in the caller's order, and data records and evaluation samples equal the HF path's."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer

from circuit_breakers.cli.main import main
from circuit_breakers.config import ConfigError, RunConfig
from circuit_breakers.data.generate import generate_completions
from circuit_breakers.data.prompts import Prompt
from circuit_breakers.data.records import Record
from circuit_breakers.evaluation.attacks import DirectAttack
from circuit_breakers.evaluation.compare import VLLM_MEMORY_SHARE, evaluate_models
from circuit_breakers.evaluation.judges import RefusalJudge
from circuit_breakers.generation import (
    generate,
    generate_vllm,
    generation_config,
    generation_count,
    render_prompts,
    stop_token_ids,
)
from circuit_breakers.generation.vllm import VLLM_INSTALL, load_generator, resolve_backend, vllm_batches, vllm_loadable
from helpers import save_tiny

EVENTS: list[tuple[str, str]] = []
"""What the stand-in engine and the HF loader did, in order (load / free of each model)."""
ENGINE_OPTIONS: list[dict] = []
"""The settings each stand-in engine was built with (dtype, seed and vllm.LLM options)."""


class SamplingParams:
    """vLLM's SamplingParams, the fields this project sets (keyword-only, as vLLM takes them)."""

    def __init__(
        self,
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        max_tokens: int | None = 16,
        stop_token_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.n, self.temperature, self.top_p, self.seed = n, temperature, top_p, seed
        self.max_tokens, self.stop_token_ids, self.skip_special_tokens = max_tokens, stop_token_ids, skip_special_tokens


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    """A reference engine over a model folder: greedy decoding by full forward passes, one prompt at a time,
    stopping at `stop_token_ids` (the stop id kept in token_ids, left out of text, as vLLM does)."""

    def __init__(self, model: str, dtype: str = "auto", seed: int = 0, **options) -> None:
        self.source = model
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.calls: list[tuple[list, SamplingParams]] = []
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(model=model), shutdown=self.shutdown)
        EVENTS.append(("load_vllm", model))
        ENGINE_OPTIONS.append({"dtype": dtype, "seed": seed, **options})

    def shutdown(self) -> None:
        EVENTS.append(("free_vllm", self.source))

    def get_tokenizer(self):
        return self.tokenizer

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm: bool = True) -> list[RequestOutput]:
        assert isinstance(sampling_params, SamplingParams) and sampling_params.temperature == 0.0
        self.calls.append((prompts, sampling_params))
        stop = set(sampling_params.stop_token_ids or [])
        results = []
        for number, prompt in enumerate(prompts):
            ids, new, finish = list(prompt["prompt_token_ids"]), [], "length"
            for _ in range(sampling_params.max_tokens):
                token = int(self.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(token)
                if token in stop:
                    finish = "stop"
                    break
            text = self.tokenizer.decode(new, skip_special_tokens=sampling_params.skip_special_tokens)
            results.append(RequestOutput(str(number), ids, [CompletionOutput(0, text, new, finish)]))
        return results


class ScriptedLLM:
    """An engine that answers each prompt with the token ids given for it (by its position in the call)."""

    def __init__(self, tokenizer, answers: list[tuple[list[int], str]]) -> None:
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm: bool = True) -> list[RequestOutput]:
        self.calls.append((prompts, sampling_params))
        start = sum(len(p) for p, _ in self.calls[:-1])
        return [
            RequestOutput(str(i), p["prompt_token_ids"], [CompletionOutput(0, "", *self.answers[start + i])])
            for i, p in enumerate(prompts)
        ]


for _cls in (SamplingParams, CompletionOutput, RequestOutput, LLM, ScriptedLLM):
    _cls.__module__ = "vllm.entrypoints.llm"  # what `is_vllm_model` reads, as for the real classes


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` module in sys.modules: `from vllm import LLM, SamplingParams` finds these classes."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    EVENTS.clear()
    ENGINE_OPTIONS.clear()
    return module


@pytest.fixture
def no_vllm(monkeypatch):
    """vLLM not installed (whatever this machine has): importing it fails and find_spec finds nothing."""
    monkeypatch.setitem(sys.modules, "vllm", None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vllm")
    llama3 = save_tiny(root / "llama3", "llama", "llama3", layers=2)
    tokenizer = AutoTokenizer.from_pretrained(llama3)  # a BOS added on encoding, as Llama-3's tokenizer does
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tokenizer.bos_token_id)]
    )
    tokenizer.save_pretrained(llama3)
    return {"chatml": str(save_tiny(root / "chatml", "llama", "chatml", layers=2)), "llama3": str(llama3)}


CONVERSATIONS = [
    "How do I bake bread?",
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ],
    "Write a poem about the sea, with gulls and waves in it, please.",
]
PREFILL = ["Sure, here is", None, "I cannot"]


# ---------------------------------------------------------------------------------------- the contract


def test_prompts_stop_ids_and_lengths_reach_the_engine_as_hf_renders_them(fake_vllm, folders):
    llm = LLM(folders["llama3"])
    tokenizer = llm.get_tokenizer()
    generate(llm, None, CONVERSATIONS, max_new_tokens=5, prefill=PREFILL, progress=False)
    ((prompts, params),) = llm.calls
    texts = render_prompts(tokenizer, CONVERSATIONS, PREFILL)
    assert texts[0].endswith("<|start_header_id|>assistant<|end_header_id|>\n\nSure, here is")  # prefill included
    assert prompts == [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
    bos = tokenizer.bos_token_id
    assert tokenizer("Hi")["input_ids"][0] == bos  # this tokenizer adds one; the template already wrote one
    assert all(p["prompt_token_ids"][0] == bos and p["prompt_token_ids"][1] != bos for p in prompts)  # one BOS
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in params.stop_token_ids and params.stop_token_ids == stop_token_ids(None, tokenizer)
    assert (params.max_tokens, params.temperature, params.skip_special_tokens) == (5, 0.0, True)


def test_outputs_equal_hf_generation_in_the_callers_order(fake_vllm, folders):
    llm = LLM(folders["chatml"])
    model = AutoModelForCausalLM.from_pretrained(folders["chatml"]).eval()
    tokenizer = llm.get_tokenizer()
    hf = generate(model, tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=2, prefill=PREFILL, progress=False)
    served = generate_vllm(llm, CONVERSATIONS, max_new_tokens=6, prefill=PREFILL)
    assert served == hf and len(set(hf)) == 3  # three different answers, each in its own place


def test_chunks_come_back_in_order_and_a_stop_the_caller_does_not_know_ends_the_row(fake_vllm, folders):
    tokenizer = AutoTokenizer.from_pretrained(folders["chatml"])
    config = generation_config(None, tokenizer, max_new_tokens=4)
    stop = sorted(config.eos_token_id)
    unknown = max(tokenizer.get_vocab().values()) + 1  # an EOS of the model's own config, say
    answers = [([5, 6, stop[0]], "stop"), ([7, 8, 9, 10], "length"), ([11, unknown], "stop")]
    llm = ScriptedLLM(tokenizer, answers)
    before = generation_count()
    batches = list(vllm_batches(llm, tokenizer, ["a", "bb", "ccc"], config, chunk=2))
    assert [len(call[0]) for call in llm.calls] == [2, 1]
    assert batches == [[(0, [5, 6, stop[0]]), (1, [7, 8, 9, 10])], [(2, [11, unknown, min(stop)])]]
    spent = generation_count() - before
    assert (spent.tokens, spent.rows) == (3 + 4 + 3, 3)


def test_sampling_settings_pass_through(fake_vllm, folders):
    tokenizer = AutoTokenizer.from_pretrained(folders["chatml"])
    config = generation_config(None, tokenizer, max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.9)
    llm = ScriptedLLM(tokenizer, [([5], "length")])
    list(vllm_batches(llm, tokenizer, ["a"], config, seed=11))
    params = llm.calls[0][1]
    assert (params.temperature, params.top_p, params.seed, params.max_tokens) == (0.7, 0.9, 11, 3)


# ---------------------------------------------------------------------------------------- choosing it


def test_auto_is_hf_on_a_cpu_and_without_vllm(fake_vllm, monkeypatch):
    assert resolve_backend("auto", "cpu") == "hf"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "vllm"  # installed (the stand-in) and CUDA
    assert resolve_backend("hf", "cuda") == "hf"
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert resolve_backend("auto", "cuda") == "hf"


def test_vllm_asked_for_without_it_fails_at_the_start_in_one_line(no_vllm, folders, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"pip install 'circuit-breakers\[vllm\]'"):
        resolve_backend("vllm", "cuda")
    with pytest.raises(ConfigError, match="generation_backend 'fast'"):
        RunConfig(generation_backend="fast")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I bake bread?\n")
    for argv in (
        ["data", "generate", "--model", folders["chatml"], "--prompts", str(prompts), "--out", str(tmp_path / "o")],
        ["eval", "--model", folders["chatml"], "--out", str(tmp_path / "eval")],
    ):
        assert main([*argv, "--generation_backend", "vllm", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and VLLM_INSTALL in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "eval").exists()


def test_what_vllm_loads_by_path(folders, tmp_path):
    assert vllm_loadable(folders["chatml"]) and vllm_loadable("meta-llama/Meta-Llama-3-8B-Instruct")
    assert not vllm_loadable("embedded") and not vllm_loadable(str(tmp_path / "model.gguf"))
    assert not vllm_loadable(str(tmp_path)) and not vllm_loadable(("model", "tokenizer"))  # no config.json / in memory


# ---------------------------------------------------------------------------------------- data and evaluation


@dataclass
class WhiteBoxDirect(DirectAttack):
    """The direct attack, declared to need the model: its cell stays on HF."""

    name: ClassVar[str] = "white_box_direct"

    @property
    def needs_model(self) -> bool:
        return True

    def prepare(self, model, tokenizer, prompts):
        assert isinstance(model, torch.nn.Module)  # the HF model, never the engine
        return super().prepare(model, tokenizer, prompts)


def test_data_records_equal_the_hf_paths(fake_vllm, folders, tmp_path):
    prompts = [
        Prompt(id="a", text="How do I bake bread?", target="Sure, here is how"),
        Prompt(id="b", text="Write a poem about the sea."),
        Prompt(id="c", text="Explain photosynthesis to a child.", target="Sure, plants"),
    ]
    options = dict(max_new_tokens=6, batch_size=1, prefill=lambda p: p.target or None, progress=False)
    model, tokenizer = load_generator(folders["chatml"], "hf", device="cpu")
    hf = generate_completions(model, tokenizer, prompts, tmp_path / "hf.jsonl", **options)
    llm, tokenizer = load_generator(folders["chatml"], "vllm")
    assert type(llm) is LLM
    served = generate_completions(llm, tokenizer, prompts, tmp_path / "vllm.jsonl", **options)
    as_dicts = [Record.to_dict(r) for r in hf]
    assert [Record.to_dict(r) for r in served] == as_dicts and len(as_dicts) == 3
    assert served[0].completion.startswith("Sure, here is how") and served[0].meta["generator"] == folders["chatml"]
    assert {r["meta"]["finish"] for r in as_dicts} == {"stop", "length"}  # a row that stopped, rows that ran out
    lines = [sorted((tmp_path / f"{name}.jsonl").read_text().splitlines()) for name in ("hf", "vllm")]
    assert lines[0] == lines[1]  # the same file, in the order each wrote its batches


def test_evaluation_samples_equal_the_hf_paths_one_model_in_memory_at_a_time(fake_vllm, folders, monkeypatch):
    import circuit_breakers.models as models

    loader = models.load_model

    def load_model(name, *args, **kwargs):
        EVENTS.append(("load_hf", name))
        return loader(name, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)
    harmful = [Prompt(id="h1", text="How do I pick a lock?", target="Sure, here is"), Prompt(id="h2", text="Hurt.")]
    safe = [Prompt(id="s1", text="How do I kill a Python process?")]
    benign = [Record(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])]
    models_ = {"base": folders["chatml"], "circuit_broken": folders["llama3"]}
    options = dict(judge=RefusalJudge(), safe_prompts=safe, benign=benign, max_new_tokens=5, batch_size=2)
    attacks = [WhiteBoxDirect(), "direct", "prefill"]  # an HF cell planned first: vLLM's still run first
    hf = evaluate_models(models_, harmful, attacks, progress=False, device="cpu", **options)
    assert [e[0] for e in EVENTS] == ["load_hf", "load_hf"]
    EVENTS.clear()
    served = evaluate_models(
        models_, harmful, attacks, progress=False, device="cpu", generation_backend="vllm", **options
    )
    assert not served.errors and not hf.errors
    # each model: its text cells on the engine, the engine freed, then the HF model for the white-box and loss cells
    assert EVENTS == [
        ("load_vllm", folders["chatml"]),
        ("free_vllm", folders["chatml"]),
        ("load_hf", folders["chatml"]),
        ("load_vllm", folders["llama3"]),
        ("free_vllm", folders["llama3"]),
        ("load_hf", folders["llama3"]),
    ]

    def rows(result):
        return sorted((s.model, s.attack, s.prompt_id, s.completion, s.verdict, s.prefill) for s in result.samples)

    assert rows(served) == rows(hf) and len(rows(hf)) == 2 * (3 * 2 + 1)
    assert served.capability == hf.capability
    share = {"dtype": "float32", "seed": 0, "gpu_memory_utilization": VLLM_MEMORY_SHARE}  # room left for the judge
    assert ENGINE_OPTIONS == [share, share]
    assert served.settings["generation_backend"] == {"base": "vllm", "circuit_broken": "vllm"}
    assert hf.settings["generation_backend"] == {"base": "hf", "circuit_broken": "hf"}


def test_the_main_jobs_data_stage_writes_the_same_files_and_keys_vllm_data_apart(fake_vllm, folders, tmp_path, caplog):
    from circuit_breakers.config import CircuitBreakerConfig, ModelConfig
    from circuit_breakers.data.prompts import write_prompts
    from circuit_breakers.experiments import main_job

    harmful = write_prompts([Prompt(id=f"h{i}", text=f"harmful request {i}") for i in range(5)], tmp_path / "h.jsonl")
    counts = dict(n_harmful_train=3, n_harmful_eval=1, n_benign_train=2, n_benign_eval=1, n_borderline_eval=1)
    counts |= dict(n_borderline_train=2, completion_tokens=5, harmful_prefill="Sure, here is")
    files = {}
    for backend in ("hf", "vllm"):
        cfg = RunConfig(harmful_prompts=str(harmful), runs_dir=str(tmp_path), generation_backend=backend, **counts)
        with caplog.at_level("INFO", logger="circuit_breakers"):
            main_job.build_data(cfg, folders["chatml"], tmp_path / backend, seed=0, device="cpu")
        assert f"generation backend: {backend}" in caplog.text
        files[backend] = {p.name: sorted(p.read_text().splitlines()) for p in sorted((tmp_path / backend).iterdir())}
    assert files["vllm"] == files["hf"] and len(files["hf"]["gen_harmful.jsonl"]) == 3
    assert EVENTS == [("load_vllm", folders["chatml"]), ("free_vllm", folders["chatml"])]  # freed before training
    assert ENGINE_OPTIONS == [{"dtype": "float32", "seed": 0}]  # alone on the GPU: vLLM's own memory share
    model_cfg, cb_cfg = ModelConfig(model_name_or_path=folders["chatml"], device="cpu"), CircuitBreakerConfig("o")
    assert main_job.data_stage_key(model_cfg, cb_cfg, RunConfig(generation_backend="vllm"))["generation_backend"]
    assert "generation_backend" not in main_job.data_stage_key(model_cfg, cb_cfg, RunConfig())  # auto on a CPU: hf
