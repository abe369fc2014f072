"""The OpenAI-compatible HTTP edge (aiohttp): routes, error shapes, SSE streaming.

Handlers decode bodies with msgspec and encode with orjson; nothing on this path validates through
pydantic. Every error leaves as OpenAI's `{"error": {...}}` with the status from the error tree.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from turbine.errors import (
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    TurbineError,
)
from turbine.frontend.choices import collect, merge, usage_of
from turbine.frontend.edge_requests import (
    decode_body,
    embedding_inputs,
    require_sampling_knobs,
    require_type,
    responses_messages,
)
from turbine.frontend.guided import constrain, responses_format
from turbine.frontend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from turbine.frontend.metrics import FrontendMetrics, RequestMetrics
from turbine.frontend.models import ModelRegistry
from turbine.frontend.openai_format import (
    Choice,
    ChunkFormatter,
    ResponsesStreamFormatter,
    chat_completion,
    embedding_list,
    new_id,
    text_completion,
)
from turbine.frontend.openapi import serve_openapi
from turbine.frontend.pipeline import Generation, ModelPipeline
from turbine.frontend.sse import send_events
from turbine.postprocess.postprocessor import TextDelta
from turbine.preprocess.preprocessor import Prepared
from turbine.protocol.openai import (
    ChatCompletionRequest,
    decode_chat_request,
    decode_completion_request,
    decode_embedding_request,
    decode_responses_request,
)
from turbine.router.front import NO_HINTS, RouteHints, route_hints
from turbine.runtime.lifecycle import InFlight

log = logging.getLogger(__name__)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Set by `pipeline_for` (which routes of other APIs on this app use too): requests counted per model.
_MODEL_KEY = web.RequestKey("turbine.model", str)


def error_response(exc: TurbineError) -> web.Response:
    headers = {"Retry-After": "1"} if exc.http_status == 503 else None
    return web.Response(
        body=orjson.dumps(exc.to_openai()),
        status=exc.http_status,
        content_type="application/json",
        headers=headers,
    )


ErrorWriter = Callable[[TurbineError], web.Response]


class Started(NamedTuple):
    """A request whose choices have each produced their first delta, ready to be answered."""

    gens: list[Generation]
    firsts: list[TextDelta]
    prepared: Prepared
    model: str
    created: int
    headers: dict[str, str]  # which worker serves it (the first choice's)

    @property
    def request_id(self) -> str:
        return self.prepared.request.request_id

    def usage(self) -> dict[str, Any]:
        return usage_of(self.gens, self.prepared.n)

    async def choices(self) -> list[Choice]:
        """Every choice, whole. (One choice, the usual case, is collected in this task: gather would
        start a task.)"""
        if len(self.gens) == 1:
            return [await collect(self.gens[0], self.firsts[0])]
        return list(
            await asyncio.gather(*(collect(g, f) for g, f in zip(self.gens, self.firsts, strict=True)))
        )


# Answers a started request in one API's shape: a JSON body, or its events.
Answer = Callable[[web.Request, Started], Awaitable[web.StreamResponse]]


async def _handle_errors(
    request: web.Request, handler: _Handler, write: ErrorWriter = error_response
) -> web.StreamResponse:
    try:
        return await handler(request)
    except TurbineError as exc:
        return write(exc)
    except web.HTTPException as exc:
        if exc.status == 413:
            return write(PayloadTooLarge(f"request body too large: {exc.text}"))
        if exc.status == 404:
            return write(NotFound(f"no route for {request.method} {request.path}"))
        if exc.status == 405:
            return write(MethodNotAllowed(f"method {request.method} not allowed on {request.path}"))
        if exc.status < 500:
            return write(InvalidRequest(exc.reason))
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return write(TurbineError("internal error; see the frontend's log"))


class OpenAIService:
    """Routes of the OpenAI API plus health, over one ModelRegistry."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_body_bytes: int,
        metrics_prefix: str = "turbine",
        reasoning_field_name: str = "reasoning_content",
    ) -> None:
        self._registry = registry
        self._reasoning_field = reasoning_field_name
        self._max_body_bytes = max_body_bytes
        self.metrics = FrontendMetrics(
            metrics_prefix,
            lambda: {p.name: len(p.instance_ids) for p in registry.models()},
            registry.router_loads,
            registry.router_queues,
            registry.health,
        )
        self.requests = InFlight()
        """Requests in flight: the drain waits for them."""
        # Path prefix → how errors under it are written, for other APIs on this app (Anthropic's
        # routes answer every error, a 404 or 405 from routing included, in their own shape).
        self.error_writers: dict[str, ErrorWriter] = {}

    @contextlib.asynccontextmanager
    async def generation(
        self, pipeline: ModelPipeline, prepared: Prepared
    ) -> AsyncIterator[tuple[Generation, RequestMetrics]]:
        """One generation for a route of another API on this app (Anthropic's): counted in flight
        (the drain waits for it) and in the metrics, and closed on exit. Chat output goes through
        the model's reasoning and tool-call parsers, as on /v1/chat/completions."""
        self.requests.enter()
        served = self.metrics.serving(pipeline.name)
        [gen] = pipeline.generate_choices(prepared)
        try:
            yield gen, served
        finally:
            self.requests.leave()
            await gen.aclose()
            served.finish([gen])

    def app(self) -> web.Application:
        metrics = self.metrics

        @web.middleware
        async def errors_and_counts(request: web.Request, handler: _Handler) -> web.StreamResponse:
            write = next(
                (w for prefix, w in self.error_writers.items() if request.path.startswith(prefix)),
                error_response,
            )
            response = await _handle_errors(request, handler, write)
            if request.path.startswith("/v1/"):
                model = request.get(_MODEL_KEY, "")
                # The route's pattern, not the path: a label per requested URL would grow forever.
                resource = request.match_info.route.resource
                endpoint = resource.canonical if resource is not None else "unmatched"
                metrics.count(model, endpoint, str(response.status), rejected=response.status == 503)
            return response

        app = web.Application(middlewares=[errors_and_counts], client_max_size=self._max_body_bytes)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model:.+}", self._get_model)
        app.router.add_get("/health", self._health)
        app.router.add_get("/live", self._live)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/openapi.json", serve_openapi)
        return app

    # --------------------------------------------------------------------------------- routes

    def pipeline_for(self, request: web.Request, model: str, kind: str) -> ModelPipeline:
        """The pipeline of a request's model (counted per model in the metrics), which must serve
        `kind` requests."""
        request[_MODEL_KEY] = model
        pipeline = self._registry.get(model)
        require_type(pipeline, kind)
        return pipeline

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        req = decode_body(decode_chat_request, await request.read())
        pipeline = self.pipeline_for(request, req.model, "chat")
        hints = route_hints(request.headers, req.user)
        prepared = constrain(pipeline, req, await pipeline.preprocessor.chat(req, new_id("chatcmpl")))
        require_sampling_knobs(pipeline, prepared.request)
        return await self._serve(request, pipeline, prepared, self._answer_chat, hints)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        req = decode_body(decode_completion_request, await request.read())
        pipeline = self.pipeline_for(request, req.model, "completions")
        hints = route_hints(request.headers, req.user)
        prepared = constrain(pipeline, req, await pipeline.preprocessor.completion(req, new_id("cmpl")))
        require_sampling_knobs(pipeline, prepared.request)
        return await self._serve(request, pipeline, prepared, self._answer_completion, hints)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API (non-stateful), served as a chat completion with one choice."""
        req = decode_body(decode_responses_request, await request.read())
        pipeline = self.pipeline_for(request, req.model, "chat")
        text_format = req.text.get("format") if isinstance(req.text, dict) else None
        if req.max_output_tokens is not None and req.max_output_tokens < 1:
            raise InvalidRequest("max_output_tokens must be at least 1", param="max_output_tokens")
        chat = ChatCompletionRequest(
            model=req.model,
            messages=responses_messages(req),
            max_tokens=req.max_output_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stream=req.stream,
            user=req.user,
            response_format=responses_format(text_format),
        )
        hints = route_hints(request.headers, req.user)
        prepared = await pipeline.preprocessor.chat(chat, new_id("resp"))
        prepared = constrain(pipeline, chat, prepared, format_param="text.format")
        return await self._serve(request, pipeline, prepared, self._answer_response, hints)

    async def _embeddings(self, request: web.Request) -> web.Response:
        req = decode_body(decode_embedding_request, await request.read())
        pipeline = self.pipeline_for(request, req.model, "embedding")
        if req.encoding_format not in ("float", "base64"):
            raise InvalidRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
        batch = await embedding_inputs(pipeline, req.input)
        vectors = await pipeline.embed(batch, route_hints(request.headers, req.user))
        out: list[bytes | list[float]] = list(vectors)
        if req.encoding_format == "base64":
            out = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)) for v in vectors]
        body = embedding_list(model=pipeline.name, vectors=out, prompt_tokens=sum(map(len, batch)))
        return web.Response(body=body, content_type="application/json")

    async def _list_models(self, request: web.Request) -> web.Response:
        data = [_model_object(p) for p in self._registry.models()]
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
        )

    async def _get_model(self, request: web.Request) -> web.Response:
        pipeline = self._registry.get(request.match_info["model"])
        if not pipeline.instance_ids:
            raise ModelNotFound(pipeline.name)
        return web.Response(body=orjson.dumps(_model_object(pipeline)), content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        models = self._registry.models()
        body: dict[str, object] = {
            "status": "healthy" if models else "no_workers",
            "models": {p.name: len(p.instance_ids) for p in models},
        }
        # --router-min-initial-workers: not ready (503) until each model has had that many workers.
        waiting = self._registry.min_initial_workers and (
            not models or any(not p.routing.ready for p in models)
        )
        if waiting:
            body["status"] = "waiting_for_workers"
        # Not ready (503) until some worker serves a model, e.g. while a worker still loads weights.
        status = 503 if waiting or not models else 200
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")

    def metrics_app(self) -> web.Application:
        """Only /metrics, for a separate metrics port (`--grpc-metrics-port`)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"live"}', content_type="application/json")

    # ------------------------------------------------------------------------------ serving

    async def _serve(
        self,
        request: web.Request,
        pipeline: ModelPipeline,
        prepared: Prepared,
        answer: Answer,
        hints: RouteHints = NO_HINTS,
    ) -> web.StreamResponse:
        self.requests.enter()
        model = pipeline.name
        served = self.metrics.serving(model)
        gens = pipeline.generate_choices(prepared, hints)
        try:
            # Wait for every choice's first delta before answering, so that a request no worker
            # can take still becomes an HTTP error status rather than an in-band stream error.
            # (One choice, the usual case, is awaited in this task: gather would start a task.)
            if len(gens) == 1:
                firsts = [await gens[0].first()]
            else:
                firsts = list(await asyncio.gather(*(g.first() for g in gens)))
            served.first_token(gens)
            headers = {}
            decision = gens[0].decision
            if decision is not None:
                headers["x-turbine-worker"] = f"{decision.instance_id:x}"
                headers["x-turbine-overlap-blocks"] = str(decision.overlap_blocks)
            return await answer(request, Started(gens, firsts, prepared, model, int(time.time()), headers))
        finally:
            self.requests.leave()
            for gen in gens:
                await gen.aclose()
            served.finish(gens)

    async def _answer_chat(self, request: web.Request, started: Started) -> web.StreamResponse:
        """/v1/chat/completions: a `chat.completion`, or its `chat.completion.chunk` events."""
        if started.prepared.stream:
            return await self._stream(request, started, self._chunks(started, chat=True))
        return await _completion(
            started, functools.partial(chat_completion, reasoning_field=self._reasoning_field)
        )

    async def _answer_completion(self, request: web.Request, started: Started) -> web.StreamResponse:
        """/v1/completions: a `text_completion`, or its chunks."""
        if started.prepared.stream:
            return await self._stream(request, started, self._chunks(started, chat=False))
        return await _completion(started, text_completion)

    async def _answer_response(self, request: web.Request, started: Started) -> web.StreamResponse:
        """/v1/responses: a `response` object, or its typed events (one choice)."""
        fmt = ResponsesStreamFormatter(
            response_id=started.request_id,
            message_id=new_id("msg"),
            model=started.model,
            created=started.created,
        )
        if started.prepared.stream:
            events = _response_events(fmt, started.gens[0], started.firsts[0])
            return await send_events(
                request, events, lambda exc: fmt.error(exc.to_openai()), started.request_id, started.headers
            )
        [choice] = await started.choices()
        body = orjson.dumps(fmt.response(choice.text, choice.finish, started.usage()))
        return web.Response(body=body, content_type="application/json", headers=started.headers)

    def _chunks(self, started: Started, *, chat: bool) -> ChunkFormatter:
        return ChunkFormatter(
            chat=chat,
            request_id=started.request_id,
            model=started.model,
            created=started.created,
            include_usage=started.prepared.include_usage,
            reasoning_field=self._reasoning_field,
        )

    async def _stream(
        self, request: web.Request, started: Started, fmt: ChunkFormatter
    ) -> web.StreamResponse:
        """Chat or text completion chunks as server-sent events, then `data: [DONE]`; a failure
        after the headers ends the stream with an error chunk, as OpenAI's does."""
        return await send_events(
            request,
            _chunk_events(fmt, started),
            lambda exc: ChunkFormatter.error(exc.to_openai()) + ChunkFormatter.DONE,
            started.request_id,
            started.headers,
        )


async def _completion(started: Started, build: Callable[..., bytes]) -> web.Response:
    """A whole chat or text completion, its body made by `build`."""
    body = build(
        request_id=started.request_id,
        model=started.model,
        created=started.created,
        choices=await started.choices(),
        usage=started.usage(),
    )
    return web.Response(body=body, content_type="application/json", headers=started.headers)


async def _chunk_events(fmt: ChunkFormatter, started: Started) -> AsyncGenerator[bytes, None]:
    gens, firsts = started.gens, started.firsts
    # Each choice's opening (chat's role delta) and first delta go out in one write.
    yield b"".join(fmt.role(index) + fmt.delta(first, index) for index, first in enumerate(firsts))
    if len(gens) == 1:
        if firsts[0].finish_reason is None:
            async for delta in gens[0]:
                yield fmt.delta(delta)
    else:
        async for index, delta in merge(gens, firsts):
            yield fmt.delta(delta, index)
    tail = fmt.usage(started.usage()) if started.prepared.include_usage else b""
    yield tail + ChunkFormatter.DONE


async def _response_events(
    fmt: ResponsesStreamFormatter, gen: Generation, first: TextDelta
) -> AsyncGenerator[bytes, None]:
    """A Responses API stream: typed events (`event:` lines), numbered by sequence_number."""
    parts = [first.text]
    finish = first.finish_reason
    yield fmt.start() + fmt.delta(first.text)
    if finish is None:
        async for delta in gen:
            parts.append(delta.text)
            finish = delta.finish_reason
            yield fmt.delta(delta.text)
    assert finish is not None
    yield fmt.finish("".join(parts), finish.value, usage_of([gen]))


def _model_object(pipeline: ModelPipeline) -> dict[str, Any]:
    return {"id": pipeline.name, "object": "model", "created": pipeline.created, "owned_by": "turbine"}
