"""The circuit-breaker Trainer: a frozen pass and an adapted pass per step, rerouting + retain losses.

Subclassing transformers' Trainer (through `BaseTrainer`: atomic checkpoints, signal stops) gives
checkpoints, resume, logging integrations, accelerate and DeepSpeed for free; only the step, `log` and the
sampler change. The RR + LAT adversaries live in `adversary`, the stall check in `callbacks`.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import losses
from ..config import CircuitBreakerConfig, ConfigError
from ..representations import hidden_states, perturbed, stacked
from .adversary import LatentAdversary, LatSettings, Seen
from .base import BaseTrainer
from .callbacks import StallCheck, TrainingDiverged, cosine_history
from .utils import EpochLengthGroupedSampler, chunk_rows, insert_slots, step_counts, take_rows

logger = logging.getLogger("circuit_breakers")

LAYER_WEIGHTS_FILE = "layer_weights.safetensors"
"""The learned layer-weight logits, saved in each checkpoint beside the adapter (layer_weights=learned)."""


LAT_SUFFIX_FILE = "lat_suffix.safetensors"
"""RR + LAT's universal soft suffix (lat_positions=suffix), saved in each checkpoint so a resumed run goes on
with the adversary it had."""


def resolve_retain_layers(spec: str, target_layers: list[int]) -> list[int]:
    """`target` -> the target layers; `all` -> every hidden-state index 1..deepest target; else a comma list."""
    if spec == "target":
        return list(target_layers)
    if spec == "all":
        return list(range(1, max(target_layers) + 1))
    try:
        return sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError as err:
        raise ValueError(f"retain_layers must be target, all or a comma list of integers, not {spec!r}") from err


class CircuitBreakerTrainer(BaseTrainer):
    """Representation rerouting (Zou et al. 2024) on a peft model.

    Batches come from `PairedCollator`: `input_ids`, `attention_mask`, `cb_mask`, `retain_mask`.
    """

    args: CircuitBreakerConfig

    def __init__(self, *args: Any, target_layers: list[int], retain_layers: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target_layers = list(target_layers)
        self.retain_layers = list(retain_layers)
        lat = [self.args.lat_layer] if self.args.lat_epsilon > 0 else []
        self.capture_layers = sorted(set(self.target_layers) | set(self.retain_layers) | set(lat))
        if lat and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ConfigError(
                "lat_epsilon > 0 (RR + LAT) runs its adversary on the unwrapped model: use one device or "
                "DDP, not FSDP or DeepSpeed"
            )
        if lat and not 0 <= self.args.lat_layer < max(self.target_layers):
            raise ConfigError(
                f"lat_layer {self.args.lat_layer} must lie below the deepest target layer {max(self.target_layers)}"
            )
        several = self.accelerator.num_processes > 1
        if lat and self.args.lat_positions == "suffix" and several and self.args.max_chunk_tokens > 0:
            raise ConfigError(
                "lat_positions=suffix on several processes moves one shared suffix in step on all of "
                "them: run whole batches (--max_chunk_tokens 0), as chunk counts differ between "
                "processes"
            )
        self.layer_logits: nn.Parameter | None = None
        if self.args.layer_weights == "learned":  # softmax weights over target_layers, trained with the adapters
            self.layer_logits = nn.Parameter(torch.zeros(len(self.target_layers), device=self.args.device))
        self.outlier_dims: list[int] | None = None
        self.adversary: LatentAdversary | None = None  # RR + LAT (lat_epsilon > 0)
        if lat:
            reduce = self._mean_over_processes if several else None
            self.adversary = LatentAdversary(
                LatSettings.from_config(self.args), self.target_layers, self.processing_class, reduce
            )
        self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean: let Trainer divide by GA steps
        self.step_metrics: dict[str, list[float]] = defaultdict(list)  # per step since the last log
        self.stall_check = StallCheck()
        self.add_callback(self.stall_check)

    @property
    def lat_suffix(self) -> Tensor | None:
        """RR + LAT's universal soft suffix [k, H] (lat_positions=suffix), None before its first step."""
        return self.adversary.suffix if self.adversary is not None else None

    @lat_suffix.setter
    def lat_suffix(self, value: Tensor | None) -> None:
        if self.adversary is None:
            raise ConfigError("a soft suffix needs RR + LAT (lat_epsilon > 0)")
        self.adversary.suffix = value

    # --- distribution ---------------------------------------------------------------------------
    def _through(self, model: nn.Module) -> nn.Module | None:
        """The wrapper whose forward must run (DDP, FSDP, DeepSpeed), or None for a plain model."""
        if self.accelerator.num_processes > 1 or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return model
        return None

    def _global_count_scale(self, local: Tensor, layers: int) -> Tensor:
        """Turn a per-device mean over masked tokens into this device's share of the global mean.

        DDP averages gradients over devices; a mean of per-device means is the global mean only when
        every device has the same number of masked tokens. Multiplying by n * local / total makes the
        average exactly the mean over all masked tokens of the global batch, as on one device.
        """
        total = self.accelerator.reduce(local.detach().float().clone(), reduction="sum")
        n = self.accelerator.num_processes
        return n * (local.float() * layers).clamp_min(1.0) / (total.float() * layers).clamp_min(1.0)

    def _mean_over_processes(self, value: Tensor) -> Tensor:
        return self.accelerator.reduce(value, reduction="mean")

    def engine(self) -> dict[str, Any]:
        """What ran the step: accelerate's distributed type, FSDP version or ZeRO stage, process count."""
        state = self.accelerator.state
        info: dict[str, Any] = {"type": str(state.distributed_type.value), "processes": self.accelerator.num_processes}
        if self.is_fsdp_enabled:
            info["fsdp_version"] = getattr(state.fsdp_plugin, "fsdp_version", 1)
        if self.is_deepspeed_enabled:
            info["zero_stage"] = state.deepspeed_plugin.zero_stage
        return info

    # --- learned layer weights -----------------------------------------------------------------
    def layer_weights(self) -> Tensor | None:
        """Softmax weights over target_layers for the rerouting loss (None: uniform, the plain mean)."""
        return None if self.layer_logits is None else torch.softmax(self.layer_logits, dim=0)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, plus the layer-weight logits as their own group (own lr, no decay)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        logits = self.layer_logits
        if logits is not None and not any(p is logits for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group({"params": [logits], "lr": self.args.layer_weight_lr, "weight_decay": 0.0})
        return optimizer

    def _sync_layer_grad(self) -> None:
        """DDP averages the adapters' gradients, not those of parameters outside the model: do it here.
        (Averaging after every micro-batch is exact: the mean is linear and the past part is equal on all ranks.)"""
        logits = self.layer_logits
        if logits is not None and logits.grad is not None and self.accelerator.num_processes > 1:
            logits.grad.copy_(self.accelerator.reduce(logits.grad.detach().clone(), reduction="mean"))

    def outside_parameters(self) -> list[Tensor]:
        """The layer-weight logits (layer_weights=learned): trained beside the model."""
        return [self.layer_logits] if self.layer_logits is not None else []

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        self.save_extra_state(output_dir or str(self.args.output_dir))

    def save_extra_state(self, output_dir: str) -> None:
        """Write what is trained outside the adapter (layer-weight logits, LAT's soft suffix) beside it."""
        if self.layer_logits is not None or self.lat_suffix is not None:
            os.makedirs(output_dir, exist_ok=True)
        if self.layer_logits is not None:
            from safetensors.torch import save_file

            save_file(
                {"logits": self.layer_logits.detach().cpu().contiguous()}, os.path.join(output_dir, LAYER_WEIGHTS_FILE)
            )
        if self.lat_suffix is not None:
            from safetensors.torch import save_file

            save_file(
                {"suffix": self.lat_suffix.detach().cpu().contiguous()}, os.path.join(output_dir, LAT_SUFFIX_FILE)
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.load_extra_state(resume_from_checkpoint)

    def load_extra_state(self, checkpoint: str) -> None:
        """Restore what `save_extra_state` wrote, where this run has it (a file absent: left as it is)."""
        path = Path(checkpoint, LAYER_WEIGHTS_FILE)
        if self.layer_logits is not None and path.is_file():
            from safetensors.torch import load_file

            with torch.no_grad():
                self.layer_logits.copy_(load_file(str(path))["logits"].to(self.layer_logits.device))
        path = Path(checkpoint, LAT_SUFFIX_FILE)
        if self.args.lat_epsilon > 0 and self.args.lat_positions == "suffix" and path.is_file():
            from safetensors.torch import load_file

            self.lat_suffix = load_file(str(path))["suffix"].to(self.args.device)

    # --- sampling -------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            # Grouped by the global batch, so that N devices see the same global batches, in the same
            # order, as one device with N times the batch (the dataloader then shards each of them).
            global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return EpochLengthGroupedSampler(
                global_batch, dataset.lengths, self.args.data_seed or self.args.seed, lambda: self.state.epoch
            )
        return super()._get_train_sampler(train_dataset)

    # --- the step -------------------------------------------------------------------------------
    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> Any:
        """Autocast for `bf16` / `fp16` around the whole step (frozen and adapted passes; master weights,
        optimizer state and the loss stay float32). Trainer leaves autocast to accelerate, which wraps the
        model's `forward`; the step calls the decoder body through hooks and never that forward, so without
        this the setting would be accepted and do nothing."""
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.args.device.type, dtype=dtype, cache_enabled=bool(cache_enabled))

    def frozen_states(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict[int, Tensor]:
        """Hidden states of the original model: adapters off, eval mode (no dropout), no graph.

        The adapters are switched off on the unwrapped peft model (a flag on each LoRA layer, no
        parameter moves), but under FSDP, ZeRO-3 or DDP the forward runs through the wrapper, which
        gathers the sharded base weights; calling the inner module directly would see only shards.
        """
        peft_model = self.accelerator.unwrap_model(model)
        was_training = peft_model.training
        peft_model.eval()
        try:
            with torch.no_grad(), peft_model.disable_adapter():
                return hidden_states(peft_model, input_ids, attention_mask, self.capture_layers, self._through(model))
        finally:
            peft_model.train(was_training)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Tensor], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """Trainer's step, except that a batch larger than `max_chunk_tokens` runs the adapted pass and its
        backward in chunks of rows: activation memory falls with the chunk size, the gradient is unchanged
        (each chunk's loss is its share of the batch's token mean, so the chunks' gradients add up to it).

        `num_items_in_batch` (from `_get_num_items_in_batch`): the masked tokens of the whole optimizer step;
        the loss is then already normalised for gradient accumulation and must not be divided again.
        """
        counts = step_counts(num_items_in_batch)
        self.loss_is_scaled_for_ga = counts is not None
        groups = chunk_rows(inputs["attention_mask"], self.args.max_chunk_tokens) if self._chunking(model) else []
        if len(groups) < 2:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._sync_layer_grad()
            return loss
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0
        if counts is None:
            scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        with self.compute_loss_context_manager():
            loss = self._step(
                model, inputs, counts, groups, lambda chunk_loss: self.accelerator.backward(chunk_loss * scale)
            )
        self._sync_layer_grad()
        return loss.detach() * scale

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor | None:
        """[circuit-breaker tokens, retain tokens] masked in every micro-batch of this optimizer step, summed
        over processes. Losses divide by these, so gradient accumulation and several devices give exactly
        the mean over every masked token of the global batch, as one device with the whole batch would."""
        if not batch_samples or "cb_mask" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        counts = (
            sum(
                torch.stack(
                    [(b["cb_mask"] * b["attention_mask"]).sum(), (b["retain_mask"] * b["attention_mask"]).sum()]
                )
                for b in batch_samples
            )
            .float()
            .to(device)
        )
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts

    def _chunking(self, model: nn.Module) -> bool:
        """Chunked backward needs several backward calls per step: fine on one device and under DDP
        (gradient sync deferred to the last chunk), not under FSDP or DeepSpeed, whose engines own it."""
        return self.args.max_chunk_tokens > 0 and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """loss = c_cb(t) L_rerouting + c_retain(t) L_retain at optimizer step t (the global step)."""
        loss = self._step(model, inputs, step_counts(num_items_in_batch))
        return (loss, {}) if return_outputs else loss

    def _step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        counts: Tensor | None = None,
        groups: list[tuple[Tensor, int]] | None = None,
        backward: Any = None,
    ) -> Tensor:
        """The batch's loss. `groups` (from `chunk_rows`): the rows run chunk by chunk (None: all at once);
        with `backward` (a function of a chunk's loss) each chunk's loss is passed to it as soon as it is
        computed and the detached total is returned; without, the attached total.

        `counts`: masked [circuit-breaker, retain] tokens of the whole optimizer step on all devices (see
        `_get_num_items_in_batch`); without them, the means are over this batch (and all devices).

        Everything that depends on the whole batch (token counts, the centring mean, outlier dimensions,
        the global scaling across devices) is computed from the frozen passes before any adapted one.
        """
        args = self.args
        slots = None
        if args.lat_epsilon > 0 and args.lat_positions == "suffix":
            suffix_ids, turn_end = self.adversary.suffix_tokens(inputs["input_ids"].device)
            inputs, slots = insert_slots(inputs, suffix_ids, turn_end, self._pad_id())
            groups = [(rows, width + len(suffix_ids)) for rows, width in groups] if groups else None
        attention_mask = inputs["attention_mask"]
        cb_mask = inputs["cb_mask"] * attention_mask
        retain_mask = inputs["retain_mask"] * attention_mask
        slot_mask = slots if slots is not None else attention_mask  # without a suffix: a stand-in, never read
        chunks = [
            take_rows(rows, width, inputs["input_ids"], attention_mask, cb_mask, retain_mask, slot_mask)
            for rows, width in (groups or [(None, None)])
        ]
        frozen = [self.frozen_states(model, ids, attn) for ids, attn, *_ in chunks]

        distributed = self.accelerator.num_processes > 1
        n_target, n_retain = len(self.target_layers), len(self.retain_layers)
        local_cb, local_retain = cb_mask.sum().float() * n_target, retain_mask.sum().float() * n_retain
        count_cb, count_retain = local_cb, local_retain
        scale_cb = scale_retain = 1.0
        if counts is not None:  # devices average their gradients: n x (local sum / global count) sums them
            count_cb, count_retain = counts[0] * n_target, counts[1] * n_retain
            scale_cb = scale_retain = float(self.accelerator.num_processes)
        elif distributed:
            scale_cb = self._global_count_scale(cb_mask.sum(), n_target)
            scale_retain = self._global_count_scale(retain_mask.sum(), n_retain)
        center = self.batch_center(frozen, chunks) if args.representation == "centered" else None
        if args.representation == "no_outliers" and self.outlier_dims is None:
            self._find_outlier_dims(frozen, chunks)
        seen = self.cosine_view(center)

        step = self.state.global_step
        c_cb, c_retain = losses.coefficients(
            step,
            args.max_steps,
            args.alpha,
            args.schedule,
            args.decay_multiplier,
            args.retain_weight,
            args.reroute_warmup_steps,
        )
        stats: dict[str, Tensor] = defaultdict(lambda: torch.zeros(()))
        total = torch.zeros((), device=attention_mask.device)
        for i, ((ids, attn, m_cb, m_retain, slot_i), frozen_i) in enumerate(zip(chunks, frozen)):
            last = i == len(chunks) - 1
            sync = nullcontext() if last or not distributed or backward is None else self.accelerator.no_sync(model)
            delta = None
            if self.adversary is not None:  # runs on the unwrapped model (replicated under DDP)
                net = self.accelerator.unwrap_model(model)
                if slots is not None:
                    delta = self.adversary.suffix_shift(net, ids, attn, m_cb, slot_i.bool(), frozen_i, seen)
                else:
                    delta = self.adversary.shift(net, ids, attn, m_cb, frozen_i, seen)
            with sync, perturbed(model, args.lat_layer, delta):
                adapted = hidden_states(model, ids, attn, self.capture_layers, self._through(model))
                frozen_cb, adapted_cb = stacked(frozen_i, self.target_layers), stacked(adapted, self.target_layers)
                cos_adapted, cos_frozen = seen(adapted_cb, frozen_cb, m_cb)
                weights = self.layer_weights()  # per chunk: each chunk's backward frees its own graph
                loss_cb = losses.rerouting_loss(cos_adapted, cos_frozen, m_cb, count_cb, weights) * scale_cb
                frozen_r, adapted_r = stacked(frozen_i, self.retain_layers), stacked(adapted, self.retain_layers)
                loss_retain = losses.retain_loss(adapted_r, frozen_r, m_retain, args.retain_distance, count_retain)
                loss_retain = loss_retain * scale_retain
                loss = c_cb * loss_cb + c_retain * loss_retain
                view = (cos_adapted, cos_frozen) if args.representation != "raw" else None
                _accumulate(
                    stats, loss_cb, loss_retain, adapted_cb, frozen_cb, view, adapted_r, frozen_r, m_cb, m_retain
                )
                if backward is None:
                    total = total + loss
                else:
                    backward(loss)
                    total = total + loss.detach()
                del adapted, adapted_cb, adapted_r, cos_adapted, loss
        if not torch.isfinite(total):  # once per step (one sync); the optimizer has not stepped yet
            checkpoint = self.checkpoint_note()
            raise TrainingDiverged(
                f"loss became {float(total)} at step {step} (rerouting {float(stats['loss_rerouting'])}, retain "
                f"{float(stats['loss_retain'])}); training stopped, {checkpoint}. Lower learning_rate "
                "or alpha, or use float32."
            )
        stats["chunks"] = torch.tensor(float(len(chunks)))
        if self.layer_logits is not None:
            for layer, w in zip(self.target_layers, self.layer_weights().detach()):
                stats[f"layer_weight_{layer}"] = w.float()
        # the logged component losses are this batch's own means, whatever the normalisation above
        for key, count, scale, local in (
            ("loss_rerouting", count_cb, scale_cb, local_cb),
            ("loss_retain", count_retain, scale_retain, local_retain),
        ):
            stats[key] = stats[key] * (count / scale / local.clamp_min(1.0)).to(stats[key].device)
        self._record(stats, c_cb, c_retain)
        return total

    def _pad_id(self) -> int:
        pad = getattr(self.processing_class, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def batch_center(self, frozen: list[dict[int, Tensor]], chunks: list[tuple[Tensor, ...]]) -> Tensor:
        """[L, 1, 1, H]: the frozen mean over the batch's masked circuit-breaker tokens, over every chunk and
        device (`representation=centered`), so chunks and devices centre as one whole batch would."""
        total = (
            torch.stack(
                [
                    losses.center_sums(stacked(states, self.target_layers), m_cb)
                    for states, (_, _, m_cb, *_) in zip(frozen, chunks)
                ]
            )
            .sum(dim=0)
            .float()
        )
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return losses.center_from_sums(total, frozen[0][self.target_layers[0]].dtype)

    def cosine_view(self, center: Tensor | None = None) -> Seen:
        """The representation the rerouting cosine sees (`representation`), as a function of (adapted, frozen,
        mask): the loss and the adversaries use this one. `center`: the batch's mean (`batch_center`)."""
        mode, dims = self.args.representation, self.outlier_dims or ()
        return lambda adapted, frozen, mask: losses.for_cosine(adapted, frozen, mask, mode, dims, center)

    def _find_outlier_dims(self, frozen: list[dict[int, Tensor]], chunks: list[tuple[Tensor, ...]]) -> None:
        """`representation=no_outliers`: the dimensions of largest frozen energy; rank 0's choice on every device."""
        energy = sum(
            losses.dimension_energy(stacked(states, self.target_layers), m_cb)
            for states, (_, _, m_cb, *_) in zip(frozen, chunks)
        )
        dims = losses.top_dimensions(energy, self.args.num_outlier_dims)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            dims = broadcast_object_list([dims], from_process=0)[0]
        self.outlier_dims = dims
        logger.info("rerouting cosine excludes outlier dimensions %s", self.outlier_dims)

    def _record(self, stats: dict[str, Tensor], c_cb: float, c_retain: float) -> None:
        """Turn the step's summed statistics into the logged metrics (one transfer from the device)."""
        keys = sorted(stats)
        values = dict(zip(keys, torch.stack([stats[k] for k in keys]).tolist()))
        n_cb = values["n_cb"]

        def mean(key: str) -> float:
            return values[key] / n_cb if n_cb else float("nan")

        metrics = {
            "loss_rerouting": values["loss_rerouting"],
            "loss_retain": values["loss_retain"],
            "coef_rerouting": c_cb,
            "coef_retain": c_retain,
            "cos_rerouting": mean("cos"),
            "cos_rerouting_pos_frac": mean("cos_pos"),
            "cos_retain": values["cos_retain"] / max(values["n_retain"], 1.0),
            "norm_rerouting_adapted": mean("norm_adapted"),
            "norm_rerouting_frozen": mean("norm_frozen"),
        }
        metrics["chunks"] = values["chunks"]  # row chunks the step ran in (max_chunk_tokens)
        metrics.update({k: v for k, v in values.items() if k.startswith("layer_weight_")})
        if self.args.representation != "raw":  # the cosine the loss sees, beside the raw one (issue 10)
            metrics["cos_rerouting_seen"] = values["cos_seen"] / max(n_cb, 1.0)
        for key, value in metrics.items():
            self.step_metrics[key].append(value)

    # --- logging ---------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged circuit-breaker metrics since the last log (`StallCheck` then reads them)."""
        if self.step_metrics and "loss" in logs:
            keys = sorted(self.step_metrics)
            means = torch.tensor(
                [sum(self.step_metrics[k]) / len(self.step_metrics[k]) for k in keys], dtype=torch.float64
            )
            if self.accelerator.num_processes > 1:  # every rank calls log() at the same step
                means = self.accelerator.reduce(means.to(self.accelerator.device), reduction="mean").cpu()
            for key, value in zip(keys, means.tolist()):
                logs[key] = round(value, 6)
            self.step_metrics.clear()
        super().log(logs, start_time)

    def rerouting_summary(self) -> dict[str, Any]:
        """Cosine on rerouted tokens at the first and last log, retain cosine, and whether rerouting happened."""
        history = self.stall_check.history or cosine_history(self.state)
        if not history:
            return {"rerouted": None}
        start, end = history[0], history[-1]
        seen = [row["cos_rerouting_seen"] for row in self.state.log_history if "cos_rerouting_seen" in row]
        weights = self.layer_weights()
        return {
            **({"cos_rerouting_seen_start": seen[0], "cos_rerouting_seen_end": seen[-1]} if seen else {}),
            "cos_rerouting_start": start[1],
            "cos_rerouting_end": end[1],
            "cos_retain_end": end[2],
            "rerouted": bool(1.0 - end[1] >= self.args.stall_margin),
            "stall_warning": self.stall_check.warned,
            **(
                {
                    "layer_weights": {
                        str(layer): round(float(w), 6) for layer, w in zip(self.target_layers, weights.detach())
                    }
                }
                if weights is not None
                else {}
            ),
        }


@torch.no_grad()
def _accumulate(
    stats: dict[str, Tensor],
    loss_cb: Tensor,
    loss_retain: Tensor,
    adapted_cb: Tensor,
    frozen_cb: Tensor,
    seen: tuple[Tensor, Tensor] | None,
    adapted_r: Tensor,
    frozen_r: Tensor,
    cb_mask: Tensor,
    retain_mask: Tensor,
) -> None:
    """Add a chunk's sums (of cosines, norms, masked pairs) to the step's, so metrics are batch means.
    `seen`: the (adapted, frozen) representation the rerouting cosine sees, when it is not the raw one."""
    cosine = torch.nn.functional.cosine_similarity
    w = cb_mask.float().unsqueeze(0).expand(adapted_cb.shape[:3])
    cos = cosine(adapted_cb.float(), frozen_cb.float(), dim=-1)
    w_r = retain_mask.float().unsqueeze(0).expand(adapted_r.shape[:3])
    cos_r = cosine(adapted_r.float(), frozen_r.float(), dim=-1)
    parts = {
        "loss_rerouting": loss_cb.float(),
        "loss_retain": loss_retain.float(),
        "n_cb": w.sum(),
        "cos": (cos * w).sum(),
        "cos_pos": ((cos > 0).float() * w).sum(),
        "norm_adapted": (adapted_cb.float().norm(dim=-1) * w).sum(),
        "norm_frozen": (frozen_cb.float().norm(dim=-1) * w).sum(),
        "n_retain": w_r.sum(),
        "cos_retain": (cos_r * w_r).sum(),
    }
    if seen is not None:
        parts["cos_seen"] = (cosine(seen[0].float(), seen[1].float(), dim=-1) * w).sum()
    for key, value in parts.items():
        stats[key] = stats[key].to(value.device) + value.detach()
