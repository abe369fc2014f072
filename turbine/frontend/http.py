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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
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
    ChunkFormatter,
    ResponsesStreamFormatter,
    chat_completion,
    embedding_list,
    new_id,
    response_object,
    text_completion,
)
from turbine.frontend.openapi import serve_openapi
from turbine.frontend.pipeline import Generation, ModelPipeline
from turbine.frontend.routing import NO_HINTS, RouteHints, route_hints
from turbine.postprocess.postprocessor import TextDelta
from turbine.preprocess.preprocessor import Prepared
from turbine.protocol.openai import (
    ChatCompletionRequest,
    decode_chat_request,
    decode_completion_request,
    decode_embedding_request,
    decode_responses_request,
)
from turbine.runtime.lifecycle import InFlight

log = logging.getLogger(__name__)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_MODEL_KEY = web.RequestKey("turbine.model", str)
# Routes of other APIs on this app set it too, so their requests are counted per model.
MODEL_KEY = _MODEL_KEY


def error_response(exc: TurbineError) -> web.Response:
    headers = {"Retry-After": "1"} if exc.http_status == 503 else None
    return web.Response(
        body=orjson.dumps(exc.to_openai()),
        status=exc.http_status,
        content_type="application/json",
        headers=headers,
    )


ErrorWriter = Callable[[TurbineError], web.Response]


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


def _decode(decoder: Callable[[bytes], Any], body: bytes) -> Any:
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return decoder(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        param = message.rsplit("`$.", 1)[1].rstrip("`") if "`$." in message else None
        raise InvalidRequest(f"invalid request: {message}", param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        # msgspec raises this (not a DecodeError) for strings whose bytes are not UTF-8, with the
        # offset inside that string; the client needs the offset in the body.
        raise InvalidRequest(
            f"request body is not valid UTF-8 JSON: {exc.reason} at byte {_utf8_error_offset(body, exc)}"
        ) from None


def _utf8_error_offset(body: bytes, exc: UnicodeDecodeError) -> int:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as whole:
        return whole.start
    return exc.start


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

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        req = _decode(decode_chat_request, await request.read())
        request[_MODEL_KEY] = req.model
        pipeline = self._registry.get(req.model)
        require_type(pipeline, "chat")
        hints = route_hints(request.headers, req.user)
        prepared = constrain(pipeline, req, await pipeline.preprocessor.chat(req, new_id("chatcmpl")))
        require_sampling_knobs(pipeline, prepared.request)
        return await self._serve(request, pipeline, prepared, chat=True, hints=hints)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        req = _decode(decode_completion_request, await request.read())
        request[_MODEL_KEY] = req.model
        pipeline = self._registry.get(req.model)
        require_type(pipeline, "completions")
        hints = route_hints(request.headers, req.user)
        prepared = constrain(pipeline, req, await pipeline.preprocessor.completion(req, new_id("cmpl")))
        require_sampling_knobs(pipeline, prepared.request)
        return await self._serve(request, pipeline, prepared, chat=False, hints=hints)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API (non-stateful), served as a chat completion with one choice."""
        req = _decode(decode_responses_request, await request.read())
        request[_MODEL_KEY] = req.model
        pipeline = self._registry.get(req.model)
        require_type(pipeline, "chat")
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
        return await self._serve(request, pipeline, prepared, chat=True, responses=True, hints=hints)

    async def _embeddings(self, request: web.Request) -> web.Response:
        req = _decode(decode_embedding_request, await request.read())
        request[_MODEL_KEY] = req.model
        pipeline = self._registry.get(req.model)
        require_type(pipeline, "embedding")
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
        *,
        chat: bool,
        responses: bool = False,
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
            created = int(time.time())
            if prepared.stream and responses:
                return await self._stream_response(
                    request, gens[0], firsts[0], prepared, model, created, headers
                )
            if prepared.stream:
                return await self._stream(request, gens, firsts, prepared, model, created, chat, headers)
            if len(gens) == 1:
                choices = [await collect(gens[0], firsts[0])]
            else:
                choices = await asyncio.gather(*(collect(g, f) for g, f in zip(gens, firsts, strict=True)))
            if responses:
                text, finish = choices[0].text, choices[0].finish
                obj = response_object(
                    response_id=prepared.request.request_id,
                    message_id=new_id("msg"),
                    model=model,
                    created=created,
                    text=text,
                    finish=finish,
                    usage=usage_of(gens, prepared.n),
                )
                return web.Response(body=orjson.dumps(obj), content_type="application/json", headers=headers)
            build = (
                functools.partial(chat_completion, reasoning_field=self._reasoning_field)
                if chat
                else text_completion
            )
            body = build(
                request_id=prepared.request.request_id,
                model=model,
                created=created,
                choices=list(choices),
                usage=usage_of(gens, prepared.n),
            )
            return web.Response(body=body, content_type="application/json", headers=headers)
        finally:
            self.requests.leave()
            for gen in gens:
                await gen.aclose()
            served.finish(gens)

    async def _stream(
        self,
        request: web.Request,
        gens: list[Generation],
        firsts: list[TextDelta],
        prepared: Prepared,
        model: str,
        created: int,
        chat: bool,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
        )
        await resp.prepare(request)
        fmt = ChunkFormatter(
            chat=chat,
            request_id=prepared.request.request_id,
            model=model,
            created=created,
            include_usage=prepared.include_usage,
            reasoning_field=self._reasoning_field,
        )
        out = bytearray()
        for index, first in enumerate(firsts):
            if chat:
                out += fmt.role(index)
            out += fmt.delta(first, index)
        await resp.write(bytes(out))
        try:
            if len(gens) == 1:
                if firsts[0].finish_reason is None:
                    async for delta in gens[0]:
                        await resp.write(fmt.delta(delta))
            else:
                async for index, delta in merge(gens, firsts):
                    await resp.write(fmt.delta(delta, index))
            tail = fmt.usage(usage_of(gens, prepared.n)) if prepared.include_usage else b""
            await resp.write(tail + ChunkFormatter.DONE)
        except TurbineError as exc:
            # Headers are gone: report the failure in-band, as OpenAI does, and end the stream.
            log.warning("stream %s failed: %s", prepared.request.request_id, exc.message)
            await resp.write(ChunkFormatter.error(exc.to_openai()) + ChunkFormatter.DONE)
        await resp.write_eof()
        return resp

    async def _stream_response(
        self,
        request: web.Request,
        gen: Generation,
        first: TextDelta,
        prepared: Prepared,
        model: str,
        created: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """A Responses API stream: typed SSE events (`event:` lines), numbered by sequence_number."""
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
        )
        await resp.prepare(request)
        fmt = ResponsesStreamFormatter(
            response_id=prepared.request.request_id, message_id=new_id("msg"), model=model, created=created
        )
        parts = [first.text]
        finish = first.finish_reason
        await resp.write(fmt.start() + fmt.delta(first.text))
        try:
            if finish is None:
                async for delta in gen:
                    parts.append(delta.text)
                    finish = delta.finish_reason
                    await resp.write(fmt.delta(delta.text))
            assert finish is not None
            await resp.write(fmt.finish("".join(parts), finish.value, usage_of([gen])))
        except TurbineError as exc:
            log.warning("stream %s failed: %s", prepared.request.request_id, exc.message)
            await resp.write(fmt.error(exc.to_openai()))
        await resp.write_eof()
        return resp


def _model_object(pipeline: ModelPipeline) -> dict[str, Any]:
    return {"id": pipeline.name, "object": "model", "created": pipeline.created, "owned_by": "turbine"}
