"""The optional vLLM backend (`generation_backend: vllm`): whether it can be used, which backend a setting
picks, loading and freeing a `vllm.LLM`, and its batches.

It runs the same rendered prompts, as the token ids the HF path feeds, through a `vllm.LLM`: `generate` and
`generate_batches` take one in place of a model (`vllm_batches`), with the same stop ids and lengths, greedy as
temperature 0, and return its token ids parsed as HF's are, so the data stage and evaluation write the same
records either way. vLLM itself is imported only inside the functions that need it. `generate_vllm` (`generate`
on an engine) stays beside `generate` in `generation`, which imports this module: nothing here imports it back.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .count import count_generated, generated_length, stop_set

VLLM_INSTALL = "pip install 'circuit-breakers[vllm]'"
"""How a user gets the optional vLLM backend (named in the error when it is asked for and missing)."""
VLLM_MISSING = f"generation_backend vllm: vLLM is not installed; run {VLLM_INSTALL}, or use generation_backend hf"
VLLM_CHUNK = 256
"""Prompts per `LLM.generate` call: enough for vLLM's own scheduling to fill a GPU, few enough that a caller
writing each chunk (the data stage) loses little to an interruption."""

logger = logging.getLogger("circuit_breakers")


def is_vllm_model(model: Any) -> bool:
    """True for a `vllm.LLM` instance (checked without importing vllm when it is absent)."""
    return type(model).__module__.startswith("vllm") and hasattr(model, "generate")


def vllm_available() -> bool:
    """Whether the optional vLLM backend can be used."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:  # a module in sys.modules without a spec
        return "vllm" in sys.modules


def resolve_backend(setting: str, device: str | torch.device) -> str:
    """`hf` or `vllm` for a `generation_backend` setting on `device` (a resolved device or its name): auto is
    vLLM only when it is installed and the device is CUDA; vllm asked for is used wherever vLLM is installed (it
    places itself). Asking for vllm without it installed is a one-line ConfigError at the start."""
    from ..config import GENERATION_BACKENDS, ConfigError

    if setting not in GENERATION_BACKENDS:
        raise ConfigError(f"generation_backend {setting!r} is not one of {', '.join(GENERATION_BACKENDS)}")
    if setting == "hf" or (setting == "auto" and not (torch.device(device).type == "cuda" and vllm_available())):
        return "hf"
    if not vllm_available():
        raise ConfigError(VLLM_MISSING)
    return "vllm"


def vllm_loadable(spec: Any) -> bool:
    """Whether vLLM can load `spec` by itself: a model folder (config.json) or a hub id. The embedded model, a
    .gguf file and an in-memory model go through HF (vLLM loads a folder by path)."""
    from ..models import EMBEDDED_MODEL

    if not isinstance(spec, (str, os.PathLike)):
        return False
    text = str(spec)
    if text == EMBEDDED_MODEL or text.endswith(".gguf"):
        return False
    path = Path(text)
    if path.exists():
        return (path / "config.json").is_file()
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def free_accelerator_memory() -> None:
    """Collect garbage and return cached CUDA blocks, so the next model (vLLM measures free memory when it
    starts) finds the memory of the one before it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_vllm(source: str | os.PathLike, dtype: str = "auto", seed: int = 0, **options: Any) -> Any:
    """A `vllm.LLM` over a model folder or hub id in `dtype` (a setting: auto is bf16 where the GPU has it),
    loaded after the memory of earlier models is returned. `options` go to `vllm.LLM` (gpu_memory_utilization,
    max_model_len, ...)."""
    from ..config import ConfigError
    from ..models import dtype_name, resolve_dtype

    if not vllm_available():
        raise ConfigError(VLLM_MISSING)
    from vllm import LLM

    free_accelerator_memory()
    where = "cuda" if torch.cuda.is_available() else "cpu"
    llm = LLM(model=str(source), dtype=dtype_name(resolve_dtype(dtype, torch.device(where))), seed=seed, **options)
    logger.info("generation backend: vllm (%s)", source)
    return llm


def load_generator(
    source: str, backend: str, dtype: str = "auto", device: str = "auto", seed: int = 0, **vllm_options: Any
) -> tuple[Any, PreTrainedTokenizerBase]:
    """(model, tokenizer) that `generate` and `generate_batches` run on. With `backend` vllm (resolved:
    `resolve_backend`) and a model vLLM loads by path, a `vllm.LLM` (`vllm_options`: see `load_vllm`) and the
    tokenizer HF generation renders with (the engine is fed its token ids, so prompts match the HF path's); else
    the HF model on `device`."""
    from ..models import load_model_and_tokenizer, load_tokenizer, resolve_model_path

    if backend == "vllm" and vllm_loadable(source):
        tokenizer = load_tokenizer(source)
        return load_vllm(resolve_model_path(source), dtype, seed, **vllm_options), tokenizer
    model, tokenizer = load_model_and_tokenizer(source, dtype, device=device)
    logger.info("generation backend: hf (%s)", source)
    return model, tokenizer


def free_vllm(llm: Any) -> None:
    """Shut a `vllm.LLM` down and return its GPU memory, so an HF model (or the next engine) can load."""
    engine = getattr(llm, "llm_engine", None)
    for owner in (getattr(engine, "engine_core", None), engine):
        shutdown = getattr(owner, "shutdown", None)
        if callable(shutdown):
            shutdown()
            break
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    except ImportError:
        pass
    else:
        destroy_model_parallel()
        destroy_distributed_environment()
    free_accelerator_memory()


def vllm_source(llm: Any) -> str | None:
    """The folder or hub id a `vllm.LLM` was loaded from (what data records name as their generator)."""
    config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    return getattr(config, "model", None)


def vllm_batches(
    llm: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: GenerationConfig,
    seed: int | None = None,
    chunk: int = VLLM_CHUNK,
) -> Iterator[list[tuple[int, list[int]]]]:
    """`generate_batches` run by a `vllm.LLM`: new token ids for rendered `texts`, `[(index in texts, ids), ...]`
    per chunk of `chunk` prompts, in order. The texts are tokenized as the HF path tokenizes them (no second
    BOS: the template holds it) and passed as token ids; `config`'s stop ids and max_new_tokens pass through,
    greedy is temperature 0. A row that stopped ends with its stop id, as on the HF path."""
    from vllm import SamplingParams

    if chunk < 1 or not config.max_new_tokens or config.max_new_tokens < 1:
        raise ValueError("chunk and max_new_tokens must be positive")
    stop = stop_set(config)
    if config.do_sample:
        sampling = {"temperature": config.temperature, "top_p": config.top_p, "seed": seed}
    else:
        sampling = {"temperature": 0.0}  # greedy
    params = SamplingParams(
        max_tokens=config.max_new_tokens, stop_token_ids=sorted(stop), skip_special_tokens=True, **sampling
    )
    for start in range(0, len(texts), chunk):
        rows = list(range(start, min(start + chunk, len(texts))))
        encoded = tokenizer([texts[i] for i in rows], add_special_tokens=False)["input_ids"]
        began = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": list(ids)} for ids in encoded], params, use_tqdm=False)
        if len(results) != len(rows):
            raise RuntimeError(f"vLLM returned {len(results)} outputs for {len(rows)} prompts")
        batch = []
        for row, result in zip(rows, results):
            out = result.outputs[0]
            ids = [int(t) for t in out.token_ids]
            if out.finish_reason == "stop" and stop and (not ids or ids[-1] not in stop):
                ids.append(min(stop))  # stopped at an id of the model's own config: end it as HF would
            batch.append((row, ids))
        count_generated(sum(generated_length(ids, stop) for _, ids in batch), len(batch), time.perf_counter() - began)
        yield batch
