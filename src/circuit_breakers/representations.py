"""Capture the hidden states of chosen layers, running only the decoder body (never the LM head).

Indexing follows transformers' `hidden_states`: index 0 is the embedding output and index i is the
output of decoder block i-1, always before the final norm (transformers' last index is after it; with
blocks dropped for training, the deepest target is the last block kept and must stay un-normed).
Forward hooks collect just the requested indices, so nothing else is stacked or kept, and the forward
pass stops right after the deepest one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .models import find_decoder_layers, unwrap_model


class _Stop(Exception):
    """Raised by the hook on the deepest requested layer: the rest of the forward is not needed."""


def _body(model: nn.Module) -> nn.Module:
    """The decoder body (embeddings + blocks + final norm) of a *ForCausalLM model."""
    base = unwrap_model(model)
    return getattr(base, "base_model", base)


def hidden_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    layers: Sequence[int],
    through: nn.Module | None = None,
) -> dict[int, Tensor]:
    """{index: [B, T, H]} for each requested hidden-state index, without computing logits.

    `through`: a distributed wrapper of `model` (DDP, FSDP, a DeepSpeed engine) whose own forward must
    run, so that it gathers sharded parameters and prepares gradient synchronisation (issue 8). The whole
    model then runs (stopping part-way would leave the wrapper half done), with logits for one position only.
    """
    wanted = sorted(set(layers))
    blocks = find_decoder_layers(model)
    if wanted and wanted[-1] > len(blocks):
        raise ValueError(f"layer {wanted[-1]} requested but the model has {len(blocks)} blocks")
    body = _body(model)
    out: dict[int, Tensor] = {}
    deepest = wanted[-1] if wanted else 0
    # Under gradient checkpointing blocks re-run during backward, where stopping must not happen.
    base = unwrap_model(model)
    checkpointing = getattr(base, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    stop_early = not checkpointing and through is None

    def make_hook(index: int):
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            out[index] = output[0] if isinstance(output, tuple) else output  # type: ignore[index]
            if stop_early and index == deepest:
                raise _Stop

        return hook

    def embedding_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        # hidden_states[0] is the first block's input (token + position embeddings, scaled as the model does)
        out[0] = args[0] if args else kwargs["hidden_states"]
        if stop_early and deepest == 0:
            raise _Stop

    handles = []
    if 0 in wanted:
        handles.append(blocks[0].register_forward_pre_hook(embedding_hook, with_kwargs=True))
    handles += [blocks[i - 1].register_forward_hook(make_hook(i)) for i in wanted if i > 0]
    try:
        if through is None:
            body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
            through(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return out


def stacked(states: dict[int, Tensor], layers: Sequence[int]) -> Tensor:
    """[L, B, T, H] for `layers`, in the given order."""
    return torch.stack([states[i] for i in layers])


@contextmanager
def perturbed(model: nn.Module, layer: int, delta: Tensor | None) -> Iterator[None]:
    """Within the block, hidden state `layer` (0: the embedding output) of every forward of `model` is
    shifted by `delta` [B, T, H]: the latent adversary of RR + LAT. Hooks registered later (those of
    `hidden_states`) see the shifted value. `delta=None` changes nothing."""
    if delta is None:
        yield
        return
    blocks = find_decoder_layers(model)

    def shift_input(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0] + delta, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta}

    def shift_output(_module: nn.Module, _args: object, output: object) -> object:
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta  # type: ignore[operator]

    if layer == 0:
        handle = blocks[0].register_forward_pre_hook(shift_input, with_kwargs=True)
    else:
        handle = blocks[layer - 1].register_forward_hook(shift_output)
    try:
        yield
    finally:
        handle.remove()
