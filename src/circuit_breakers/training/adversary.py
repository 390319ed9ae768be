"""The RR + LAT adversaries: shifts of a hidden state (or of a soft suffix's embeddings) on the circuit-breaker
rows that undo the circuit breaker as far as they can, so that the step trains rerouting to hold under them.

Both ascend the rerouting cosine (adapted vs frozen, in the representation the loss sees) with signed
steps, the embedding attack's rule; neither touches a parameter's gradient. The trainer calls
`LatentAdversary.shift` (lat_positions all / prompt) or `LatentAdversary.suffix_shift` (suffix) and runs
its adapted pass under `representations.perturbed` with the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import CircuitBreakerConfig, ConfigError
from ..representations import hidden_states, perturbed, stacked

Seen = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""(adapted, frozen, mask) -> the two representations the rerouting cosine compares (`losses.for_cosine`)."""


@dataclass(frozen=True)
class LatSettings:
    """The adversary's knobs (the `lat_*` settings of CircuitBreakerConfig)."""

    layer: int
    steps: int
    epsilon: float
    step_size: float
    positions: str = "all"
    suffix_init: str = ""

    @classmethod
    def from_config(cls, cfg: CircuitBreakerConfig) -> LatSettings:
        return cls(
            cfg.lat_layer, cfg.lat_steps, cfg.lat_epsilon, cfg.lat_step_size, cfg.lat_positions, cfg.lat_suffix_init
        )


class LatentAdversary:
    """RR + LAT's adversary for one training run. Holds the universal soft suffix (lat_positions=suffix),
    which moves on from step to step, and its placeholder tokens.

    `tokenizer`: to find the suffix's tokens (suffix mode); `reduce_mean`: averages a tensor over
    processes (several devices move one shared suffix), None on one process."""

    def __init__(
        self,
        settings: LatSettings,
        target_layers: Sequence[int],
        tokenizer: Any = None,
        reduce_mean: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.settings = settings
        self.target_layers = list(target_layers)
        self.tokenizer = tokenizer
        self.reduce_mean = reduce_mean
        self.suffix: Tensor | None = None  # [k, H] float32: the universal soft suffix
        self.slot_tokens: tuple[Tensor, Tensor] | None = None  # (suffix init ids, end-of-user-turn ids)
        self._origin: tuple[Tensor, float] | None = None  # (placeholder embeddings, typical token norm)

    def row_cosines(
        self,
        net: nn.Module,
        ids: Tensor,
        attn: Tensor,
        m_cb: Tensor,
        frozen_cb: Tensor,
        seen: Seen | None,
        delta: Tensor | None,
    ) -> Tensor:
        """[b]: each row's mean rerouting cosine (adapted, shifted by `delta` at lat_layer, vs frozen) over its
        masked tokens and the target layers, in the representation the loss sees (`seen`; None: raw): what the
        adversary raises."""
        with perturbed(net, self.settings.layer, delta):
            adapted_cb = stacked(hidden_states(net, ids, attn, self.target_layers), self.target_layers)
        a, f = seen(adapted_cb, frozen_cb, m_cb) if seen is not None else (adapted_cb, frozen_cb)
        cos = torch.nn.functional.cosine_similarity(a.float(), f.float(), dim=-1)  # [L, b, T]
        weights = m_cb.float()[None]  # [1, b, T]
        return (cos * weights).sum(dim=(0, 2)) / (weights.sum(dim=(0, 2)) * cos.shape[0]).clamp_min(1.0)

    def shift(
        self,
        net: nn.Module,
        ids: Tensor,
        attn: Tensor,
        m_cb: Tensor,
        frozen: dict[int, Tensor],
        seen: Seen | None = None,
    ) -> Tensor | None:
        """RR + LAT: a perturbation of hidden state `lat_layer` on the circuit-breaker rows that undoes the
        circuit breaker as far as it can: `lat_steps` of projected gradient ascent on the mean rerouting
        cosine (adapted vs frozen, the representation the loss sees; no ReLU, so it still has a gradient
        once rerouted), each token's shift kept within an L2 ball of lat_epsilon x that token's own norm;
        each row keeps the shift with its highest cosine among those evaluated (the first being none).
        Steps are signed gradients, each of L2 size lat_step_size x the token's norm: the embedding attack's
        rule (PGD's per-token normalised steps overshot against a finished circuit breaker:
        docs/results/2026-11-29-rr-lat-hardening.md).
        Rows are independent (per-coordinate signed steps, per-row choice), so chunks and devices give the
        same shifts as one whole batch. lat_positions=prompt: completion tokens stay where they are.
        `net`: the unwrapped model (replicated under DDP); `frozen`: its frozen hidden states of these rows.
        Returns the [B, T, H] shift (zero on retain rows), or None without circuit-breaker rows."""
        lat = self.settings
        rows = (m_cb > 0).any(dim=1).nonzero().flatten()
        if len(rows) == 0:
            return None
        ids, attn, m_cb = ids[rows], attn[rows], m_cb[rows]  # only circuit-breaker rows: retain rows stay clean
        clean = frozen[lat.layer][rows]
        movable = (attn > 0) & ((m_cb == 0) if lat.positions == "prompt" else True)
        scale = clean.float().norm(dim=-1, keepdim=True) * movable[..., None]  # 0 where the adversary may not move
        radius = lat.epsilon * scale
        step = lat.step_size * scale / clean.shape[-1] ** 0.5  # per coordinate: L2 size lat_step_size x norm
        delta = torch.zeros_like(clean, dtype=torch.float32, requires_grad=True)
        best, best_value = torch.zeros_like(delta), torch.full((len(rows),), float("-inf"), device=delta.device)
        frozen_cb = stacked(frozen, self.target_layers)[:, rows]
        for _ in range(lat.steps):
            per_row = self.row_cosines(net, ids, attn, m_cb, frozen_cb, seen, delta.to(clean.dtype))
            (grad,) = torch.autograd.grad(per_row.sum(), [delta])
            with torch.no_grad():  # each row keeps its own best (before rerouting: no shift at all)
                better = per_row.detach() > best_value
                best[better] = delta.detach()[better]
                best_value = torch.maximum(best_value, per_row.detach())
                delta += step * grad.sign()
                norm = delta.norm(dim=-1, keepdim=True)
                delta *= torch.where(norm > radius, radius / norm.clamp_min(1e-12), torch.ones_like(norm))
        full = torch.zeros_like(frozen[lat.layer])
        full[rows] = best.to(full.dtype)
        return full

    def suffix_tokens(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(ids of lat_suffix_init, ids the chat template writes between the user's text and the answer):
        the soft suffix's placeholders and the sequence it is inserted before (its last token dropped, as
        it may merge with the answer's first characters)."""
        if self.slot_tokens is None:
            from ..data.slots import encode, split_at_slot

            tokenizer = self.tokenizer
            if tokenizer is None:
                raise ConfigError(
                    "lat_positions=suffix needs the tokenizer (processing_class) to find the user turn's end"
                )
            suffix = encode(tokenizer, self.settings.suffix_init)
            _, after = split_at_slot(tokenizer, [{"role": "user", "content": "Hello"}])
            turn_end = encode(tokenizer, after)
            if not suffix or not turn_end:
                raise ConfigError("lat_suffix_init and the chat template's generation prompt must each give tokens")
            self.slot_tokens = (torch.tensor(suffix), torch.tensor(turn_end[: max(1, len(turn_end) - 1)]))
        return tuple(t.to(device) for t in self.slot_tokens)  # type: ignore[return-value]

    def suffix_shift(
        self,
        net: nn.Module,
        ids: Tensor,
        attn: Tensor,
        m_cb: Tensor,
        slots: Tensor,
        frozen: dict[int, Tensor],
        seen: Seen | None = None,
    ) -> Tensor | None:
        """RR + LAT shaped like the embedding attack (lat_positions=suffix): the circuit-breaker rows carry
        the placeholder tokens of a soft suffix at the end of the user turn (`utils.insert_slots`, `slots`
        marks them), and the adversary moves one universal suffix, shared by every row and kept from step to
        step, so that its `lat_steps` signed steps per training step add up, over a run, to hundreds of attack
        steps (the evaluation's attack takes 100) instead of starting from nothing each step. Steps and radius
        are in units of the typical token-embedding norm (per coordinate: lat_step_size x the embedding
        matrix's rms, the attack's rule); the suffix stays within lat_epsilon such norms of its starting
        embeddings, per token. It ascends the mean rerouting cosine of the step's rows (gradients averaged
        over devices); each row is then trained on the suffix state with its highest cosine among those
        evaluated. `net`: the unwrapped model. Touches no parameter's gradient."""
        lat = self.settings
        rows = (m_cb > 0).any(dim=1).nonzero().flatten()
        if len(rows) == 0:
            return None
        embed = net.get_input_embeddings()
        suffix_ids, _ = self.suffix_tokens(ids.device)
        k, hidden = len(suffix_ids), embed.weight.shape[-1]
        if self._origin is None:  # the embeddings are frozen: computed once, not every step
            with torch.no_grad():
                origin = embed(suffix_ids).float()  # the placeholders' own embeddings: what the frozen pass read
                unit = float(embed.weight.float().pow(2).mean().sqrt()) * hidden**0.5  # typical token norm
            self._origin = (origin, unit)
        origin, unit = self._origin
        if self.suffix is None:
            self.suffix = origin.clone()
        ids, attn, m_cb, slots = ids[rows], attn[rows], m_cb[rows], slots[rows]
        if not bool((slots.sum(dim=1) == k).all()):
            raise RuntimeError("every circuit-breaker row must carry the whole soft suffix")
        where = slots.nonzero()[:, 1].view(len(rows), k)[..., None].expand(len(rows), k, hidden)
        frozen_cb = stacked(frozen, self.target_layers)[:, rows]
        dtype = frozen[0].dtype
        suffix = self.suffix.detach().clone().requires_grad_(True)
        best = torch.zeros(len(rows), ids.shape[1], hidden, device=ids.device)
        best_value = torch.full((len(rows),), float("-inf"), device=ids.device)
        for _ in range(lat.steps):
            shift = (suffix - origin).unsqueeze(0).expand(len(rows), k, hidden)
            delta = torch.zeros_like(best).scatter(1, where, shift)
            per_row = self.row_cosines(net, ids, attn, m_cb, frozen_cb, seen, delta.to(dtype))
            (grad,) = torch.autograd.grad(per_row.mean(), [suffix])
            if self.reduce_mean is not None:
                grad = self.reduce_mean(grad.contiguous())
            with torch.no_grad():
                better = per_row.detach() > best_value
                best[better] = delta.detach()[better]
                best_value = torch.maximum(best_value, per_row.detach())
                suffix += lat.step_size * unit / hidden**0.5 * grad.sign()
                offset = suffix - origin
                norm = offset.norm(dim=-1, keepdim=True)
                radius = lat.epsilon * unit
                suffix.copy_(origin + offset * torch.where(norm > radius, radius / norm.clamp_min(1e-12), 1.0))
        self.suffix = suffix.detach()
        full = torch.zeros_like(frozen[lat.layer])
        full[rows] = best.to(dtype)
        return full
