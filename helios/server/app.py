"""The OpenAI-compatible HTTP API over an AsyncLLM (FastAPI): /v1/completions, /v1/chat/completions (streaming as
server-sent events ending in `data: [DONE]`, or whole), /v1/models, /health, /metrics.

Bad requests get 400 with an OpenAI-style error body; an engine failure on one request gets 500 (mid-stream: an
error event) and the server goes on. A client that disconnects aborts its requests."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from helios import __version__
from helios.async_llm import AsyncLLM, EngineDeadError, RequestFailedError, RequestStream
from helios.engine.outputs import CompletionOutput, RequestOutput
from helios.server.energy import EnergyMeter, energy_meter
from helios.server.metrics import ServerMetrics
from helios.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields, bad_value

_DONE = object()


class ClientDisconnected(Exception):
    pass


def build_app(llm: AsyncLLM, served_model_names: list[str] | None = None,
              energy: EnergyMeter | None | str = "auto") -> FastAPI:
    """The app serving `llm` under `served_model_names` (default: the model's name; requests may name any of them
    or none). energy: an EnergyMeter, None, or "auto" (NVML when the engine runs on a CUDA GPU)."""
    names = served_model_names or [llm.engine.source.name]
    if energy == "auto":
        energy = energy_meter(llm.stats().get("device", "cpu"))
    metrics = ServerMetrics(llm, energy)
    api = OpenAIServing(llm, names, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(llm.shutdown)  # what is still running is aborted (the server waited for it)

    app = FastAPI(title="helios-serve", version=__version__, lifespan=lifespan)
    app.state.llm, app.state.metrics = llm, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        if error.status == 400:
            metrics.requests.labels("invalid").inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        metrics.requests.labels("invalid").inc()
        first = error.errors()[0] if error.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg', ''))}", None
        elif not loc:
            message, param = "the body must be a JSON object (Content-Type: application/json)", None
        else:
            param = loc[0] if loc else None
            where = ".".join(loc) or "body"
            message = f"{where}: {first.get('msg', 'invalid value')}"
        return JSONResponse(APIError(message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(error.detail), error.status_code, kind).body(), status_code=error.status_code)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, error: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it: nginx's code for a client that closed the request

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        return JSONResponse(APIError(f"internal error: {error}", 500, "server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        if not llm.alive:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "helios",
             "max_model_len": llm.max_model_len} for name in names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await api.completions(body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await api.chat_completions(body, raw)

    return app


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI responses and chunks."""

    def __init__(self, llm: AsyncLLM, names: list[str], metrics: ServerMetrics):
        self.llm, self.names, self.metrics = llm, names, metrics

    # ---- endpoints --------------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, raw: Request):
        body.check()
        model = self._model(body)
        params = body.sampling_params(body.max_tokens)
        streams = self._submit(body.prompts(), params, "prompt")
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            chunks = self._completion_chunks(body, streams, response_id, created, model)
            return StreamingResponse(_sse(chunks), media_type="text/event-stream")
        outputs = await self._collect(streams, raw)
        choices = []
        for i, (stream, output) in enumerate(zip(streams, outputs, strict=True)):
            for c in output.outputs:
                choice = {"index": i * body.n + c.index, "text": c.text, "logprobs": None,
                          "finish_reason": c.finish_reason}
                self._telemetry(body, choice, stream, c, 0)
                choices.append(choice)
        return {"id": response_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": _usage(outputs)}

    async def chat_completions(self, body: ChatCompletionRequest, raw: Request):
        body.check()
        model = self._model(body)
        params = body.sampling_params(body.token_limit)
        try:
            prompt = self.llm.llm.chat_prompt(body.conversation(), **(body.chat_template_kwargs or {}))
        except (ValueError, TypeError) as e:
            raise bad_value(e, "messages") from e
        streams = self._submit([prompt], params, "messages")
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            chunks = self._chat_chunks(body, streams[0], response_id, created, model)
            return StreamingResponse(_sse(chunks), media_type="text/event-stream")
        (output,) = await self._collect(streams, raw)
        choices = []
        for c in output.outputs:
            choice = {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                      "finish_reason": c.finish_reason}
            self._telemetry(body, choice, streams[0], c, 0)
            choices.append(choice)
        return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": _usage([output])}

    # ---- requests ---------------------------------------------------------------------------------------------
    def _model(self, body: SamplingFields) -> str:
        if body.model is None:
            return self.names[0]
        if body.model not in self.names:
            raise APIError(f"model {body.model!r} is not served here; /v1/models lists {self.names}", param="model",
                           code="model_not_found")
        return body.model

    def _submit(self, prompts: list, params, param: str) -> list[RequestStream]:
        """Queues every prompt (all or none: a bad one aborts those already queued)."""
        streams: list[RequestStream] = []
        try:
            for prompt in prompts:
                streams.append(self.llm.submit(prompt, params))
        except (ValueError, TypeError) as e:
            _abort(streams)
            raise bad_value(e, param) from e
        except EngineDeadError as e:
            _abort(streams)
            raise APIError(str(e), 503, "server_error") from e
        return streams

    async def _follow(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """The stream's outputs; records the request's outcome in the metrics when it ends, however it ends."""
        last, status = None, "abort"
        try:
            async for last in stream:
                yield last
            status = None
        except RequestFailedError:
            status = "error"
            raise
        finally:
            stream.abort()
            self._record(stream, last, status)

    def _record(self, stream: RequestStream, last: RequestOutput | None, status: str | None) -> None:
        if not stream.recorded:
            stream.recorded = True
            self.metrics.finished(last, stream.times, status)

    async def _merged(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from every stream as outputs arrive; a failure in one ends them all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for output in self._follow(stream):
                    queue.put_nowait((i, output))
            except RequestFailedError as e:
                queue.put_nowait((i, e))
            finally:
                queue.put_nowait((i, _DONE))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()

    async def _collect(self, streams: list[RequestStream], raw: Request) -> list[RequestOutput]:
        """Every stream's final output; a client that disconnects first aborts them all."""
        async def final() -> list[RequestOutput]:
            outputs: list = [None] * len(streams)
            async for i, output in self._merged(streams):
                outputs[i] = output
            return outputs

        try:
            return await _unless_disconnected(raw, final())
        except RequestFailedError as e:
            raise APIError(str(e), 500, "server_error") from e
        except ClientDisconnected:
            for stream in streams:  # counted now: a stream whose reader was cancelled before it began is not
                if not stream.finished:
                    self._record(stream, None, "abort")
            _abort(streams)
            raise

    # ---- streaming --------------------------------------------------------------------------------------------
    async def _completion_chunks(self, body: CompletionRequest, streams, response_id, created, model):
        head = {"id": response_id, "object": "text_completion", "created": created, "model": model}
        progress = _Progress()
        finished: list[RequestOutput] = []
        async for i, output in self._merged(streams):
            choices = []
            for c, text, start in progress.news(output, offset=i * body.n):
                choice = {"index": i * body.n + c.index, "text": text, "logprobs": None,
                          "finish_reason": c.finish_reason}
                self._telemetry(body, choice, streams[i], c, start)
                choices.append(choice)
            if choices:
                yield {**head, "choices": choices}
            if output.finished:
                finished.append(output)
        if body.include_usage:
            yield {**head, "choices": [], "usage": _usage(finished)}

    async def _chat_chunks(self, body: ChatCompletionRequest, stream: RequestStream, response_id, created, model):
        head = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model}
        yield {**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for j in range(body.n)]}
        progress = _Progress()
        last = None
        async for _, last in self._merged([stream]):
            choices = []
            for c, text, start in progress.news(last):
                choice = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": None,
                          "finish_reason": c.finish_reason}
                self._telemetry(body, choice, stream, c, start)
                choices.append(choice)
            if choices:
                yield {**head, "choices": choices}
        if body.include_usage and last is not None:
            yield {**head, "choices": [], "usage": _usage([last])}

    def _telemetry(self, body: SamplingFields, choice: dict, stream: RequestStream, c: CompletionOutput,
                   start: int) -> None:
        """With exit_telemetry: the exit layer and confidence of each token from `start` on, the model and depth."""
        if body.exit_telemetry:
            stats = self.llm.stats()
            depth = (stats.get("control") or {}).get("depth") or stats.get("loaded_layers")
            choice["helios"] = {"exit_layers": c.exit_layers[start:], "confidences": c.confidences[start:],
                                "model": stream.model(c.index), "depth": depth}


class _Progress:
    """What a stream has sent of each choice, so each chunk carries only what is new."""

    def __init__(self):
        self.sent: dict[int, tuple[int, int] | None] = {}  # choice -> (characters, tokens) sent; None: finished

    def news(self, output: RequestOutput, offset: int = 0):
        """(completion, new text, index of its first new token) for each choice with new text or a finish."""
        for c in output.outputs:
            key = offset + c.index
            if key in self.sent and self.sent[key] is None:
                continue
            chars, tokens = self.sent.get(key) or (0, 0)
            if len(c.text) == chars and c.finish_reason is None:
                continue
            self.sent[key] = None if c.finish_reason is not None else (len(c.text), len(c.token_ids))
            yield c, c.text[chars:], tokens


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events: one `data: {json}` per chunk, an error event if the engine fails, then `data: [DONE]`."""
    try:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except RequestFailedError as e:
            yield f"data: {json.dumps(APIError(str(e), 500, 'server_error').body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()  # a disconnected client: its requests are aborted now, not when collected


async def _unless_disconnected(raw: Request, work):
    """Runs `work` unless the client disconnects first (then ClientDisconnected, and `work` is cancelled)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise ClientDisconnected()


def _usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _abort(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.abort()
