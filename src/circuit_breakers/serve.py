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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, MaxTimeCriteria, StoppingCriteriaList, TextIteratorStreamer

from .evaluation.generation import render_prompts, stop_token_ids
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

    def __init__(self, model: Any, tokenizer: Any, probe: Probe | None = None, refusal: str = DEFAULT_REFUSAL,
                 max_time: float = 60.0, max_new_tokens: int = 512) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.probe = probe_device(probe, model) if probe is not None else None
        self.refusal, self.max_time, self.max_new_tokens = refusal, max_time, max_new_tokens
        self.lock = threading.Lock()
        self.stop_ids = stop_token_ids(model, tokenizer)

    def _prepare(self, messages: list[dict[str, Any]], max_tokens: int | None, temperature: float
                 ) -> tuple[dict[str, torch.Tensor], GenerationConfig, ProbeMonitor | None, StoppingCriteriaList]:
        text = render_prompts(self.tokenizer, [messages])[0]
        device = next(self.model.parameters()).device
        inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        sample = temperature > 0
        config = GenerationConfig(max_new_tokens=min(max_tokens or self.max_new_tokens, self.max_new_tokens),
                                  do_sample=sample, temperature=temperature if sample else None, top_p=None,
                                  top_k=None, pad_token_id=pad, eos_token_id=self.stop_ids)
        monitor = ProbeMonitor(self.model, self.probe) if self.probe is not None else None
        criteria = StoppingCriteriaList([MaxTimeCriteria(self.max_time), *([monitor] if monitor else [])])
        return dict(inputs), config, monitor, criteria

    def _finish(self, new_ids: torch.Tensor, config: GenerationConfig, monitor: ProbeMonitor | None) -> str:
        if monitor is not None and monitor.fired is not None and bool(monitor.fired[0]):
            return "content_filter"
        ended = len(new_ids) > 0 and int(new_ids[-1]) in self.stop_ids
        return "stop" if ended else "length"  # out of tokens or of time (max_time)

    def complete(self, messages: list[dict[str, Any]], max_tokens: int | None = None, temperature: float = 0.0) -> Completion:
        inputs, config, monitor, criteria = self._prepare(messages, max_tokens, temperature)
        with self.lock, torch.no_grad():
            if monitor is not None:
                with monitor.attached():
                    out = self.model.generate(**inputs, generation_config=config, stopping_criteria=criteria)
            else:
                out = self.model.generate(**inputs, generation_config=config, stopping_criteria=criteria)
        new = out[0, inputs["input_ids"].shape[1]:]  # one row: no padding after it stopped
        reason = self._finish(new, config, monitor)
        text = self.refusal if reason == "content_filter" else self.tokenizer.decode(new, skip_special_tokens=True)
        score = float(monitor.scores[0]) if monitor is not None and monitor.scores is not None else None
        return Completion(text, reason, int(inputs["input_ids"].shape[1]), int(len(new)), score)

    def stream(self, messages: list[dict[str, Any]], max_tokens: int | None = None, temperature: float = 0.0
               ) -> Iterator[tuple[str, str | None]]:
        """(text piece, None) as tokens arrive, then ("" or the refusal, finish_reason)."""
        inputs, config, monitor, criteria = self._prepare(messages, max_tokens, temperature)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=self.max_time + 30)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.no_grad():
                    if monitor is not None:
                        with monitor.attached():
                            result["out"] = self.model.generate(**inputs, generation_config=config,
                                                                stopping_criteria=criteria, streamer=streamer)
                    else:
                        result["out"] = self.model.generate(**inputs, generation_config=config,
                                                            stopping_criteria=criteria, streamer=streamer)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = err
                streamer.end()

        with self.lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            for piece in streamer:
                if piece:
                    yield piece, None
            worker.join()
        if "error" in result:
            raise result["error"]
        new = result["out"][0, inputs["input_ids"].shape[1]:]
        reason = self._finish(new, config, monitor)
        yield (self.refusal if reason == "content_filter" else ""), reason


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
                done = await anyio.to_thread.run_sync(generator.complete, messages, request.max_tokens, request.temperature)
            finally:
                slots.release()
            return {
                "id": ident, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "finish_reason": done.finish_reason}],
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                          "total_tokens": done.prompt_tokens + done.completion_tokens},
            }

        def events() -> Iterator[str]:
            import json

            try:
                # the role comes first, as OpenAI sends it
                yield _chunk(ident, created, model_name, {"role": "assistant", "content": ""}, None, json)
                for piece, reason in generator.stream(messages, request.max_tokens, request.temperature):
                    delta = {"content": piece} if piece else {}
                    yield _chunk(ident, created, model_name, delta, reason, json)
                yield "data: [DONE]\n\n"
            finally:
                slots.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _chunk(ident: str, created: int, model: str, delta: dict[str, Any], reason: str | None, json: Any) -> str:
    body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
    return f"data: {json.dumps(body)}\n\n"


def run_server(generator: GuardedGenerator, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               max_queue: int = 8) -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(generator, model_name, max_queue), host=host, port=port, log_level="info")
