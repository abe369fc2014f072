"""Edge requests before they are served: request bodies decoded (every API's routes, each error a
400 that says what is wrong), the model-type check every route makes, and the translation of
requests that are not plain chat/completions: Responses API input → chat messages, embeddings input
→ token ids."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from turbine.errors import InvalidRequest
from turbine.frontend.pipeline import ModelPipeline
from turbine.protocol.openai import ChatMessage, ResponsesRequest
from turbine.protocol.request import PreprocessedRequest, knobs_used

T = TypeVar("T")


def decode_body(decoder: Callable[[bytes], T], body: bytes) -> T:
    """A request body through its msgspec decoder; a body that is empty, not JSON, not UTF-8 or of
    the wrong shape is an InvalidRequest (naming the field where msgspec does)."""
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


def require_type(pipeline: ModelPipeline, kind: str) -> None:
    """A model serves only the request kinds its card lists (`--model-type` of its workers)."""
    types = pipeline.card.model_types
    if kind not in types:
        what = {"chat": "chat", "completions": "completions", "embedding": "embeddings"}[kind]
        raise InvalidRequest(
            f"model '{pipeline.name}' does not serve {what} (it serves: {', '.join(types)})", param="model"
        )


def require_sampling_knobs(pipeline: ModelPipeline, request: PreprocessedRequest) -> None:
    """Penalties, biases and token restrictions are applied by the engine or refused: the card
    lists those its engine honours (turbine.protocol.request.SAMPLING_KNOBS)."""
    for knob in knobs_used(request.sampling):
        if knob not in pipeline.card.capabilities:
            raise InvalidRequest(
                f"Unsupported parameter: '{knob}' is not supported by model '{pipeline.name}': its "
                "engine cannot apply it.",
                param=knob,
                code="unsupported_parameter",
            )


_RESPONSES_TEXT_PARTS = ("input_text", "output_text", "text")


def responses_messages(req: ResponsesRequest) -> list[ChatMessage]:
    """`instructions` and `input` of a Responses request → chat messages."""
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    items = req.input
    if isinstance(items, str):
        if not items:
            raise InvalidRequest("'input' must not be empty", param="input")
        return [*messages, ChatMessage(role="user", content=items)]
    if not items:
        raise InvalidRequest("'input' is required: a string or a list of message items", param="input")
    for i, item in enumerate(items):
        role, content = item.get("role"), item.get("content")
        if item.get("type", "message") != "message" or role not in (
            "user",
            "assistant",
            "system",
            "developer",
        ):
            raise InvalidRequest(
                f"input[{i}] must be a message item with role user, assistant, system or developer",
                param=f"input[{i}]",
            )
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            kinds = [p.get("type") for p in content if isinstance(p, dict)]
            if len(texts) != len(content) or any(
                not isinstance(t, str) or k not in _RESPONSES_TEXT_PARTS
                for t, k in zip(texts, kinds, strict=True)
            ):
                raise InvalidRequest(
                    f"input[{i}].content parts must be {{'type': 'input_text', 'text': ...}}",
                    param=f"input[{i}].content",
                )
            content = "".join(t for t in texts if isinstance(t, str))
        if not isinstance(content, str):
            raise InvalidRequest(
                f"input[{i}].content must be a string or a list of input_text parts",
                param=f"input[{i}].content",
            )
        messages.append(ChatMessage(role="system" if role == "developer" else str(role), content=content))
    return messages


MAX_EMBEDDING_INPUTS = 2048


async def embedding_inputs(pipeline: ModelPipeline, inputs: str | list[Any] | None) -> list[list[int]]:
    """An embeddings request's `input` → one token id list per input, each checked."""
    bad = InvalidRequest(
        "'input' must be a non-empty string, list of strings, list of token ids, or list of token id lists",
        param="input",
    )
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise bad
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
    tokenizer = pipeline.preprocessor.tokenizer
    if all(isinstance(x, str) for x in inputs):
        if any(not x for x in inputs):
            raise bad
        ctx = pipeline.preprocessor.context_length
        for x in inputs:
            # Refused before tokenizing when its size alone proves it too long (see min_tokens).
            if (least := tokenizer.min_tokens(x)) > ctx:
                raise InvalidRequest(
                    f"an input has at least {least} tokens; the model's context is {ctx}", param="input"
                )
        batch = await asyncio.to_thread(tokenizer.encode_batch, inputs)
    elif all(type(x) is int for x in inputs):
        batch = [list(inputs)]
    elif all(isinstance(x, list) and x and all(type(t) is int for t in x) for x in inputs):
        batch = [list(x) for x in inputs]
    else:
        raise bad
    vocab, ctx = tokenizer.vocab_size, pipeline.preprocessor.context_length
    for ids in batch:
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"input token ids must be within [0, {vocab})", param="input")
        if len(ids) > ctx:
            raise InvalidRequest(
                f"an input has {len(ids)} tokens; the model's context is {ctx}", param="input"
            )
    return batch
