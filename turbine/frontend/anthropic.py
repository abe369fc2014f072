"""Anthropic's Messages API on the frontend's HTTP app (`--enable-anthropic-api`).

`POST /v1/messages` (stream or not) and `POST /v1/messages/count_tokens`. A request is translated
onto a chat request (`anthropic_translate.py`) and served by the same preprocess → route →
postprocess path as /v1/chat/completions, through the same reasoning and tool-call parsers (the
model card's, or the frontend's overrides); only the shapes differ (`anthropic_format.py`): parsed
reasoning leaves as `thinking` blocks, parsed calls as `tool_use` blocks. Errors
leave in Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`) with the status of
the error tree; after a stream has started, as an `error` event.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable

import orjson
from aiohttp import web

from turbine.errors import TurbineError
from turbine.frontend.anthropic_format import (
    StreamFormatter,
    ToolUse,
    error_body,
    message_object,
    new_message_id,
    stop_reason,
    tool_use,
)
from turbine.frontend.anthropic_translate import to_chat
from turbine.frontend.choices import collect
from turbine.frontend.edge_requests import decode_body
from turbine.frontend.guided import constrain
from turbine.frontend.http import OpenAIService
from turbine.frontend.models import ModelRegistry
from turbine.frontend.pipeline import Generation
from turbine.frontend.sse import send_events
from turbine.postprocess.parsers.output import ToolCallDelta
from turbine.postprocess.postprocessor import TextDelta
from turbine.protocol.anthropic import decode_count_tokens_request, decode_messages_request


def _tool_uses(calls: Iterable[ToolCallDelta]) -> list[ToolUse]:
    # Anthropic's own ids (`toolu_…`) rather than the parser's OpenAI-style `call_…` ones.
    return [tool_use(call.name, call.arguments) for call in calls]


def error_response(exc: TurbineError) -> web.Response:
    headers = {"Retry-After": "1"} if exc.http_status == 503 else None
    return web.Response(
        body=error_body(exc), status=exc.http_status, content_type="application/json", headers=headers
    )


class AnthropicService:
    """The Messages API routes, over the OpenAI service's registry, drain accounting and metrics."""

    def __init__(self, registry: ModelRegistry, service: OpenAIService) -> None:
        self._registry = registry
        self._service = service

    def add_routes(self, app: web.Application) -> None:
        # The app's error middleware writes every error under this prefix in Anthropic's shape.
        self._service.error_writers["/v1/messages"] = error_response
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)

    async def _count_tokens(self, request: web.Request) -> web.Response:
        req = decode_body(decode_count_tokens_request, await request.read())
        pipeline = self._service.pipeline_for(request, req.model, "chat")
        translated = to_chat(req)
        ids = await pipeline.preprocessor.chat_token_ids(translated.chat, translated.assistant_prefix)
        return web.Response(body=orjson.dumps({"input_tokens": len(ids)}), content_type="application/json")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        req = decode_body(decode_messages_request, await request.read())
        pipeline = self._service.pipeline_for(request, req.model, "chat")
        translated = to_chat(req)
        message_id = new_message_id()
        prepared = await pipeline.preprocessor.chat(
            translated.chat, message_id, assistant_prefix=translated.assistant_prefix
        )
        prepared = constrain(pipeline, translated.chat, prepared, format_param="output_config.format")
        async with self._service.generation(pipeline, prepared) as (gen, served):
            # The first delta before any answer, so that a request no worker can take still gets an
            # HTTP error status rather than an in-band error event.
            first = await gen.first()
            served.first_token([gen])
            if req.stream:
                fmt = StreamFormatter(message_id=message_id, model=pipeline.name)
                return await send_events(request, _events(fmt, gen, first), fmt.error, message_id)
            choice = await collect(gen, first)
            tools = _tool_uses(choice.tool_calls)
            matched = gen.post.matched_stop
            body = message_object(
                message_id=message_id,
                model=pipeline.name,
                text=choice.text,
                thinking=choice.reasoning,
                tool_uses=tools,
                stop=stop_reason(choice.finish, matched, tools),
                stop_sequence=matched,
                input_tokens=gen.prompt_tokens,
                output_tokens=gen.completion_tokens,
            )
            return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _events(fmt: StreamFormatter, gen: Generation, first: TextDelta) -> AsyncGenerator[bytes, None]:
    called = False

    def events(delta: TextDelta) -> bytes:
        # Within one delta the parsers keep the model's order: reasoning, then text, then calls.
        nonlocal called
        tools = _tool_uses(delta.tool_calls)
        called = called or bool(tools)
        return fmt.thinking(delta.reasoning) + fmt.text(delta.text) + b"".join(fmt.tool(t) for t in tools)

    yield fmt.start(gen.prompt_tokens) + events(first)
    finish = first.finish_reason
    if finish is None:
        async for delta in gen:
            finish = delta.finish_reason
            yield events(delta)
    assert finish is not None
    matched = gen.post.matched_stop
    stop = "tool_use" if called else stop_reason(finish.value, matched)
    yield fmt.finish(stop, matched, gen.completion_tokens)
