"""An OpenAI-compatible chat-completions server for a base, adapter or merged model, with an optional
probe guard that halts harmful generations (issue 9).

`POST /v1/chat/completions` (plain or `stream: true` as server-sent events) and `GET /v1/models`.
One model serves one generation at a time (a lock: `generate` is not re-entrant and the guard hooks
the model); at most `max_queue` requests wait or run, more get HTTP 429 at once; each generation stops
after `max_time` seconds. When the probe fires, the answer is replaced by `refusal` and
`finish_reason` is `content_filter`; while streaming, what was already sent stays sent (a few tokens,
the probe judges each token as it is produced) and a last chunk carries the refusal.

Limits and refusals (issue 30; docs/probes.md): request bodies over `max_body_bytes` get 413 before they
are parsed, prompts over `max_prompt_tokens` 400 before they reach the model; a POST that is not JSON 415;
with an API key set, a request without it 401; message content holding a special token of the tokenizer
(turn forging), another model's name, `n` != 1, `stop`, `logprobs` and a temperature outside [0, 2] 400.
Every error body is OpenAI's `{"error": {"message", "type", "param", "code"}}`. A plain request whose
client went away stops generating at the next token, as a stream does.
"""
# No `from __future__ import annotations` here: FastAPI reads the request model from the endpoint's
# annotation, which must be the class itself (defined inside `create_app`), not a string.

import hmac
import json
import math
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

from ..data.render import special_token_texts, special_tokens_in
from ..generation import render_prompts, stop_token_ids
from .probes import Probe, ProbeMonitor, probe_device

DEFAULT_REFUSAL = "I can't help with that."
DEFAULT_MAX_BODY_BYTES = 1_048_576
"""1 MiB: a 4096-token prompt is some 16-50 kB of JSON."""
DEFAULT_MAX_PROMPT_TOKENS = 4096


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400), with the message the client gets."""


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
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    ) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.probe = probe_device(probe, model) if probe is not None else None
        self.refusal, self.max_time, self.max_new_tokens = refusal, max_time, max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.lock = threading.Lock()
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.special_tokens = special_token_texts(tokenizer)

    def check(self, messages: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The prompt's input ids, or BadRequest: a special token typed in a message (it would become a real
        control token: a forged turn), or a prompt longer than `max_prompt_tokens` (the prompt pass cannot
        be interrupted, so its length is what bounds it)."""
        forged = special_tokens_in(messages, self.special_tokens)
        if forged:
            raise BadRequest(
                f"{forged}; special tokens cannot be sent as text (they would act as control tokens and could "
                "forge a turn)"
            )
        text = render_prompts(self.tokenizer, [messages])[0]
        inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        n = int(inputs["input_ids"].shape[1])
        if n > self.max_prompt_tokens:
            raise BadRequest(
                f"the prompt is {n} tokens, more than this server's limit of {self.max_prompt_tokens} "
                "(serve --max_prompt_tokens)"
            )
        return dict(inputs)

    def _prepare(
        self, messages: list[dict[str, Any]], max_tokens: int | None, temperature: float
    ) -> tuple[dict[str, torch.Tensor], GenerationConfig, ProbeMonitor | None, StoppingCriteriaList]:
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in self.check(messages).items()}
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
            return_dict_in_generate=True,  # the cache: the monitor judges the last token with one more step
        )
        monitor = ProbeMonitor(self.model, self.probe) if self.probe is not None else None
        criteria = StoppingCriteriaList([MaxTimeCriteria(self.max_time), *([monitor] if monitor else [])])
        return dict(inputs), config, monitor, criteria

    def _finish(self, new_ids: torch.Tensor, config: GenerationConfig, monitor: ProbeMonitor | None) -> str:
        if monitor is not None and monitor.fired is not None and bool(monitor.fired[0]):
            return "content_filter"
        ended = len(new_ids) > 0 and int(new_ids[-1]) in self.stop_ids
        return "stop" if ended else "length"  # out of tokens or of time (max_time)

    def _generate(
        self,
        inputs: dict[str, torch.Tensor],
        config: GenerationConfig,
        monitor: ProbeMonitor | None,
        criteria: StoppingCriteriaList,
        cancelled: threading.Event,
        streamer: Any = None,
    ) -> torch.Tensor:
        """Run `generate` (the caller holds the lock) and let the monitor judge the last token; the sequences."""
        criteria[0].initial_timestamp = time.time()  # max_time counts from here, not from the queue
        with torch.no_grad(), monitor.attached() if monitor is not None else nullcontext():
            out = self.model.generate(**inputs, generation_config=config, stopping_criteria=criteria, streamer=streamer)
            if monitor is not None and not cancelled.is_set():
                monitor.finish(out.sequences, getattr(out, "past_key_values", None))
        return out.sequences

    def complete(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int | None = None,
        temperature: float = 0.0,
        cancelled: threading.Event | None = None,
    ) -> Completion:
        """One answer. Setting `cancelled` (a client that went away) stops it at the next token, or before it
        starts when it is still waiting for the model (then finish_reason is `cancelled`)."""
        cancelled = cancelled if cancelled is not None else threading.Event()
        inputs, config, monitor, criteria = self._prepare(messages, max_tokens, temperature)
        criteria.append(_Cancelled(cancelled))
        with self.lock:
            if cancelled.is_set():
                return Completion("", "cancelled", int(inputs["input_ids"].shape[1]), 0)
            out = self._generate(inputs, config, monitor, criteria, cancelled)
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
                    out = self._generate(inputs, config, monitor, criteria, handle.cancelled, streamer)
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


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _send_error(send: Any, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Gate:
    """ASGI middleware before any parsing: the API key (401), a JSON content type on POST (415) and the body
    size (413: from Content-Length at once, else counted while the body is read, never buffered past it)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"].startswith("/v1/"):
            expected = f"Bearer {self.api_key}".encode()
            if not hmac.compare_digest(headers.get("authorization", "").encode(), expected):
                message = "missing or wrong API key: send the header 'Authorization: Bearer KEY'"
                return await _send_error(send, 401, message, "invalid_api_key")
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
            message = f"the request body must be JSON (Content-Type: application/json), not {kind or 'unset'!r}"
            return await _send_error(send, 415, message, "unsupported_media_type")
        too_big = f"the request body is larger than this server's limit of {self.max_body_bytes} bytes"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _send_error(send, 413, too_big + " (serve --max_body_bytes)", "request_too_large")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await _send_error(send, 413, too_big + " (serve --max_body_bytes)", "request_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the real channel: a disconnect is seen

        return await self.app(scope, replay, send)


def create_app(
    generator: GuardedGenerator,
    model_name: str,
    max_queue: int = 8,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_key: str | None = None,
) -> Any:
    """The FastAPI application (run it with uvicorn)."""
    import anyio
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field

    class Message(BaseModel):
        role: str
        content: str

    class ChatRequest(BaseModel):
        model: str | None = None
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(default=None, ge=1)
        temperature: float | None = None  # checked by hand: NaN must give 400, not a 500
        stream: bool = False
        n: int | None = None
        stop: str | list[str] | None = None
        logprobs: bool | None = None
        top_logprobs: int | None = None

    def refusal_of(request: ChatRequest) -> str | None:
        """Why the server cannot do what the request asks (rather than silently ignoring it), or None."""
        if request.model is not None and request.model != model_name:
            return f"model {request.model!r} is not served here; this server serves {model_name!r} (GET /v1/models)"
        if request.n not in (None, 1):
            return f"n must be 1 (one answer per request), got {request.n}"
        if request.stop:
            return "stop sequences are not supported; the answer ends at the model's end of turn or max_tokens"
        if request.logprobs or request.top_logprobs:
            return "logprobs and top_logprobs are not supported"
        t = request.temperature
        if t is not None and not (math.isfinite(t) and 0.0 <= t <= 2.0):
            return f"temperature must be a number from 0 to 2, got {t}"
        return None

    app = FastAPI(title="circuit-breakers", description="OpenAI-compatible chat completions with a probe guard")
    slots = threading.BoundedSemaphore(max_queue)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Any, err: HTTPException) -> Any:
        return JSONResponse(error_body(str(err.detail)), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Any, err: RequestValidationError) -> Any:
        # built from locations and messages only: echoing the input (NaN, a huge value) is what gave a 500
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in err.errors()]
        return JSONResponse(error_body("invalid request: " + "; ".join(parts)), status_code=422)

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Any, err: BadRequest) -> Any:
        return JSONResponse(error_body(str(err)), status_code=400)

    def admit() -> None:
        if not slots.acquire(blocking=False):
            raise HTTPException(status_code=429, detail=f"server busy: {max_queue} requests already waiting or running")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "circuit-breakers"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest, raw: Request) -> Any:
        why = refusal_of(request)
        if why is not None:
            raise BadRequest(why)
        temperature = request.temperature or 0.0
        messages = [m.model_dump() for m in request.messages]
        await anyio.to_thread.run_sync(generator.check, messages)  # 400 before a slot or the model is taken
        admit()
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not request.stream:
            cancelled = threading.Event()

            async def watch() -> None:  # a client that went away: stop generating for it
                while not await raw.is_disconnected():
                    await anyio.sleep(0.1)
                cancelled.set()

            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(watch)
                    try:
                        done = await anyio.to_thread.run_sync(
                            generator.complete, messages, request.max_tokens, temperature, cancelled
                        )
                    finally:
                        group.cancel_scope.cancel()
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
            handle = generator.start_stream(messages, request.max_tokens, temperature)
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

    return _Gate(app, api_key, max_body_bytes)


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
    generator: GuardedGenerator,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_queue: int = 8,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_key: str | None = None,
) -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    app = create_app(generator, model_name, max_queue, max_body_bytes, api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")


def load_served_model(
    model_name: str, adapter: str | None = None, dtype: str = "auto", device: str = "auto"
) -> tuple[Any, Any]:
    """(model, tokenizer) to serve: a base or merged model by name on `device`, with a LoRA `adapter` folder
    on top if given (peft puts the adapter where the model is)."""
    from ..models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name, dtype, device=device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model, tokenizer
