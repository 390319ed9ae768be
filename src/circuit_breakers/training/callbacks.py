"""Trainer callbacks: the stall check (rerouting that never starts, or that the adversary undoes) and the
step end (gradients outside the model, stop signals); with TrainingDiverged, the other way a run goes wrong."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from torch import Tensor
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger("circuit_breakers")

CosineRow = tuple[int, float, float]
"""(step, rerouting cosine, retain cosine) of one log."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; training stopped and the last good checkpoint is kept."""


def cosine_history(state: TrainerState) -> list[CosineRow]:
    """The logged cosines of a run so far, from its log history (also those logged before a resume)."""
    rows = [row for row in state.log_history if "cos_rerouting" in row]
    return [(row["step"], row["cos_rerouting"], row["cos_retain"]) for row in rows]


class StallCheck(TrainerCallback):
    """Warns once when, `stall_check_steps` into training, the rerouting cosine is still within
    `stall_margin` of 1: rerouting has not started (or, under RR + LAT, the adversary undoes it every step).
    Such a run trains on without effect; the warning names the levers. Keeps the logged cosines."""

    def __init__(self) -> None:
        self.history: list[CosineRow] = []
        self.warned = False

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "cos_rerouting" not in logs:
            return
        if self.history:
            self.history.append((state.global_step, logs["cos_rerouting"], logs["cos_retain"]))
        else:  # the first log of this process (after a resume: with those before the checkpoint)
            self.history = cosine_history(state)
        self.check(args, state)

    def check(self, args: Any, state: TrainerState) -> None:
        """Warn (on the main process) if rerouting has stalled; every process marks the warning given."""
        n = args.stall_check_steps
        if not n or self.warned or not self.history:
            return
        step, cos_now, _ = self.history[-1]
        if step < n:
            return
        start = self.history[0][1]
        if 1.0 - cos_now < args.stall_margin:  # against adapted == frozen: a continued adapter starts rerouted
            self.warned = True
            if not state.is_world_process_zero:
                return
            if args.lat_epsilon > 0:  # the logged cosine is on the adversary's shifted rows
                logger.warning(
                    "rerouting does not hold under the adversary (RR + LAT): cosine on the shifted circuit-breaker "
                    "rows %.4f -> %.4f after %d steps. Either rerouting never started, or the adversary undoes it "
                    "every step; trained on, such a run can lose the circuit breaker instead of hardening it (on "
                    "the embedded model, docs/results/2026-11-29-rr-lat-hardening.md). Levers: a smaller "
                    "lat_step_size or lat_steps, lat_layer 0, a lower retain_weight, or continue an adapter that "
                    "already reroutes (init_adapter).",
                    start,
                    cos_now,
                    step,
                )
                return
            logger.warning(
                "rerouting has not started: cosine on rerouted tokens %.4f -> %.4f after %d steps. At the start "
                "adapted == frozen, where the cosine's gradient is zero; zero-initialised lora_B keeps it there "
                "(common with small or float32 models). Levers: lora_init=random, reroute_warmup_steps, "
                "representation=centered or no_outliers, a higher learning_rate or alpha.",
                start,
                cos_now,
                step,
            )


class StepOwner(Protocol):
    """What `StepEnd` needs of its trainer."""

    stopped_by: int | None

    def outside_parameters(self) -> list[Tensor]: ...

    def agreed_stop_signal(self) -> int | None: ...


class StepEnd(TrainerCallback):
    """At the end of each optimizer step: clear the gradients of parameters trained beside the model (Trainer
    zeroes only the model's); if a stop signal arrived, checkpoint this step and stop."""

    def __init__(self, owner: StepOwner) -> None:
        self.owner = owner

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        for param in self.owner.outside_parameters():
            param.grad = None
        signum = self.owner.agreed_stop_signal()
        if signum is not None:
            self.owner.stopped_by = signum
            control.should_save = True
            control.should_training_stop = True
        return control
