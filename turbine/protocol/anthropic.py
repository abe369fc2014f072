"""Anthropic Messages API request shapes at the edge, decoded and type-checked by msgspec.

Unknown fields are ignored (as for the OpenAI shapes); content blocks stay plain dicts because their
kinds are many and checked one by one when translated (turbine/frontend/anthropic_translate.py), so a
bad block gets a message that names it.
"""

from __future__ import annotations

from typing import Any

import msgspec


class AnthropicMessage(msgspec.Struct, frozen=True):
    role: str
    # A string, or a list of content blocks ({"type": "text" | "tool_use" | "tool_result", ...}).
    content: str | list[dict[str, Any]]


class _Conversation(msgspec.Struct, frozen=True):
    model: str
    messages: list[AnthropicMessage]
    # A string, or a list of {"type": "text", "text": ...} blocks.
    system: str | list[dict[str, Any]] | None = None
    # Client tools: {"name", "description", "input_schema"}.
    tools: list[dict[str, Any]] | None = None
    # {"type": "auto" | "any" | "tool" | "none", "name": ...}.
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(_Conversation, frozen=True, kw_only=True):
    """POST /v1/messages. `max_tokens` is required, as in Anthropic's API."""

    max_tokens: int
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    # {"user_id": ...}
    metadata: dict[str, Any] | None = None
    # {"format": {"type": "json_schema", "schema": ...}, "effort": ...}: structured output is refused
    # for engines that cannot enforce it (as OpenAI's response_format is).
    output_config: dict[str, Any] | None = None


class CountTokensRequest(_Conversation, frozen=True):
    """POST /v1/messages/count_tokens: the conversation part of a MessagesRequest."""


_messages_decoder = msgspec.json.Decoder(MessagesRequest)
_count_decoder = msgspec.json.Decoder(CountTokensRequest)


def decode_messages_request(body: bytes) -> MessagesRequest:
    return _messages_decoder.decode(body)


def decode_count_tokens_request(body: bytes) -> CountTokensRequest:
    return _count_decoder.decode(body)
