"""OpenAI request shapes at the edge, decoded and type-checked by msgspec (no pydantic on the hot path).

Unknown fields are ignored, as OpenAI-compatible servers do; known fields are type-checked, and a
type error names the field (`$.temperature`) so the 400 can say which parameter is wrong. Range
checks live in the preprocessor, which knows the model's limits.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str
    # A string, or a list of content parts ({"type": "text", "text": ...}).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Sampling(msgspec.Struct, frozen=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style extra fields.
    min_p: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    # Sample among the k most likely tokens only (vLLM's extra; -1 or 0: no limit).
    top_k: int | None = None


class ChatCompletionRequest(_Sampling, frozen=True):
    messages: list[ChatMessage] = msgspec.field(default_factory=list)
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}.
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's name for extra template variables.
    chat_template_kwargs: dict[str, Any] | None = None
    # Chat's logprobs: a flag, plus how many alternatives per token (needs logprobs=true).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # {"type": "text" | "json_object" | "json_schema", ...}: structured output, which only engines
    # whose card says `supports_response_format` can enforce (others answer 400, never ignore it).
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling, frozen=True):
    # Text, token ids, or a one-element list of either (a batch of one).
    prompt: str | list[Any] | None = None
    echo: bool = False
    # Legacy completions' logprobs: the number of alternatives per token (None = no logprobs).
    logprobs: int | None = None


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    return _chat_decoder.decode(body)


def decode_completion_request(body: bytes) -> CompletionRequest:
    return _completion_decoder.decode(body)


class ResponsesRequest(msgspec.Struct, frozen=True):
    """OpenAI Responses API (non-stateful): translated onto a chat request by the frontend."""

    model: str
    # A string (one user message), or a list of message items
    # `{"role": ..., "content": str | [{"type": "input_text", "text": ...}]}`.
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    user: str | None = None
    # {"format": {"type": "text" | "json_object" | "json_schema", ...}}: as chat's response_format.
    text: dict[str, Any] | None = None


class EmbeddingRequest(msgspec.Struct, frozen=True):
    model: str
    # A string, a list of strings, a list of token ids, or a list of token id lists.
    input: str | list[Any] | None = None
    encoding_format: str = "float"
    user: str | None = None


_responses_decoder = msgspec.json.Decoder(ResponsesRequest)
_embedding_decoder = msgspec.json.Decoder(EmbeddingRequest)


def decode_responses_request(body: bytes) -> ResponsesRequest:
    return _responses_decoder.decode(body)


def decode_embedding_request(body: bytes) -> EmbeddingRequest:
    return _embedding_decoder.decode(body)
