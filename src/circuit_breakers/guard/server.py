"""An OpenAI-compatible chat-completions server for a base, adapter or merged model, with an optional
probe guard that halts harmful generations (issue 9).

`POST /v1/chat/completions` (plain or `stream: true` as server-sent events) and `GET /v1/models`.
One model serves one generation at a time (a lock: `generate` is not re-entrant and the guard hooks
the model); at most `max_queue` requests wait or run, more get HTTP 429 at once; each generation stops
after `max_time` seconds. When the probe fires, the answer is replaced by `refusal` and
`finish_reason` is `content_filter`; while streaming, what was already sent stays sent (a few tokens,
the probe judges each token as it is produced) and a last chunk carries the refusal.
"""
# No `from __future__ import annotations` here: FastAPI reads the request model from the endpoint's
# annotation, which must be the class itself (defined inside `create_app`), not a string.

import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    MaxTimeCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from ..generation import render_prompts, stop_token_ids
from .probes import Probe, ProbeMonitor, probe_device

DEFAULT_REFUSAL = "I can't help with that."


@dataclass
class Completion:
    text: str
    finish_reason: str
    """stop, length or content_filter (the probe halted it)."""
    prompt_tokens: int
    completion_tokens: int
    probe_score: float | None = None


class GuardedGenerator:
    """Chat completions from one transformers model, optionally watched by a probe."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        probe: Probe | None = None,
        refusal: str = DEFAULT_REFUSAL,
        max_time: float = 60.0,
        max_new_tokens: int = 512,
    ) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.probe = probe_device(probe, model) if probe is not None else None
        self.refusal, self.max_time, self.max_new_tokens = refusal, max_time, max_new_tokens
        self.lock = threading.Lock()
        self.stop_ids = stop_token_ids(model, tokenizer)

    def _prepare(
        self, messages: list[dict[str, Any]], max_tokens: int | None, temperature: float
    ) -> tuple[dict[str, torch.Tensor], GenerationConfig, ProbeMonitor | None, StoppingCriteriaList]:
        text = render_prompts(self.tokenizer, [messages])[0]
        device = next(self.model.parameters()).device
        inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        sample = temperature > 0
        config = GenerationConfig(
            max_new_tokens=min(max_tokens or self.max_new_tokens, self.max_new_tokens),
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=self.stop_ids,
        )
        monitor = ProbeMonitor(self.model, self.probe) if self.probe is not None else None
        criteria = StoppingCriteriaList([MaxTimeCriteria(self.max_time), *([monitor] if monitor else [])])
        return dict(inputs), config, monitor, criteria

    def _finish(self, new_ids: torch.Tensor, config: GenerationConfig, monitor: ProbeMonitor | None) -> str:
        if monitor is not None and monitor.fired is not None and bool(monitor.fired[0]):
            return "content_filter"
        ended = len(new_ids) > 0 and int(new_ids[-1]) in self.stop_ids
        return "stop" if ended else "length"  # out of tokens or of time (max_time)

    def complete(
        self, messages: list[dict[str, Any]], max_tokens: int | None = None, temperature: float = 0.0
    ) -> Completion:
        inputs, config, monitor, criteria = self._prepare(messages, max_tokens, temperature)
        with self.lock, torch.no_grad(), monitor.attached() if monitor is not None else nullcontext():
            out = self.model.generate(**inputs, generation_config=config, stopping_criteria=criteria)
        new = out[0, inputs["input_ids"].shape[1] :]  # one row: no padding after it stopped
        reason = self._finish(new, config, monitor)
        text = self.refusal if reason == "content_filter" else self.tokenizer.decode(new, skip_special_tokens=True)
        score = float(monitor.scores[0]) if monitor is not None and monitor.scores is not None else None
        return Completion(text, reason, int(inputs["input_ids"].shape[1]), int(len(new)), score)

    def start_stream(
        self, messages: list[dict[str, Any]], max_tokens: int | None = None, temperature: float = 0.0
    ) -> "StreamHandle":
        """Start a generation in a worker thread that holds the model's lock while it runs; read text
        pieces from the handle as they come. `cancel()` (a client that went away) stops it at the next
        token, so the lock is never held for a reader that is gone."""
        inputs, config, monitor, criteria = self._prepare(messages, max_tokens, temperature)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        handle = StreamHandle(streamer)
        criteria.append(_Cancelled(handle.cancelled))

        def run() -> None:
            with self.lock:
                try:
                    if handle.cancelled.is_set():
                        return
                    with torch.no_grad(), monitor.attached() if monitor is not None else nullcontext():
                        out = self.model.generate(
                            **inputs, generation_config=config, stopping_criteria=criteria, streamer=streamer
                        )
                    new = out[0, inputs["input_ids"].shape[1] :]
                    handle.reason = self._finish(new, config, monitor)
                    handle.final = self.refusal if handle.reason == "content_filter" else ""
                except BaseException as err:  # noqa: BLE001 - handed to the reader
                    handle.error = err
                finally:
                    streamer.end()

        handle.worker = threading.Thread(target=run, daemon=True)
        handle.worker.start()
        return handle


@dataclass
class StreamHandle:
    """A running streamed generation: `next_piece()` until None, then `finish()`."""

    streamer: Any
    cancelled: threading.Event = field(default_factory=threading.Event)
    worker: threading.Thread | None = None
    reason: str = "stop"
    final: str = ""
    error: BaseException | None = None

    def next_piece(self) -> str | None:
        return next(iter(self.streamer), None)

    def finish(self) -> tuple[str, str]:
        """(the last text to send: "" or the refusal, finish_reason), once the worker is done."""
        if self.worker is not None:
            self.worker.join()
        if self.error is not None:
            raise self.error
        return self.final, self.reason

    def cancel(self) -> None:
        self.cancelled.set()


class _Cancelled(StoppingCriteria):
    """Stopping criterion: stop every row once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def create_app(generator: GuardedGenerator, model_name: str, max_queue: int = 8) -> Any:
    """The FastAPI application (run it with uvicorn)."""
    import anyio
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, Field

    class Message(BaseModel):
        role: str
        content: str

    class ChatRequest(BaseModel):
        model: str | None = None
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(default=None, ge=1)
        temperature: float = Field(default=0.0, ge=0.0)
        stream: bool = False

    app = FastAPI(title="circuit-breakers", description="OpenAI-compatible chat completions with a probe guard")
    slots = threading.BoundedSemaphore(max_queue)

    def admit() -> None:
        if not slots.acquire(blocking=False):
            raise HTTPException(status_code=429, detail=f"server busy: {max_queue} requests already waiting or running")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "circuit-breakers"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest) -> Any:
        admit()
        messages = [m.model_dump() for m in request.messages]
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not request.stream:
            try:
                done = await anyio.to_thread.run_sync(
                    generator.complete, messages, request.max_tokens, request.temperature
                )
            finally:
                slots.release()
            return {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done.text},
                        "finish_reason": done.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                    "total_tokens": done.prompt_tokens + done.completion_tokens,
                },
            }

        async def events() -> Any:
            import json

            handle = generator.start_stream(messages, request.max_tokens, request.temperature)
            try:
                # the role comes first, as OpenAI sends it
                yield _chunk(ident, created, model_name, {"role": "assistant", "content": ""}, None, json)
                while (piece := await anyio.to_thread.run_sync(handle.next_piece)) is not None:
                    if piece:
                        yield _chunk(ident, created, model_name, {"content": piece}, None, json)
                final, reason = await anyio.to_thread.run_sync(handle.finish)
                yield _chunk(ident, created, model_name, {"content": final} if final else {}, reason, json)
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away: stop generating, give the slot back
                handle.cancel()
                slots.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _chunk(ident: str, created: int, model: str, delta: dict[str, Any], reason: str | None, json: Any) -> str:
    body = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
    }
    return f"data: {json.dumps(body)}\n\n"


def run_server(
    generator: GuardedGenerator, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 8
) -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(generator, model_name, max_queue), host=host, port=port, log_level="info")


def load_served_model(model_name: str, adapter: str | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) to serve: a base or merged model by name, with a LoRA `adapter` folder on top if given."""
    from ..models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name, dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model, tokenizer
