"""Anthropic Messages requests → the chat request the OpenAI path already serves.

The mapping (what a model's chat template sees):
- `system` (a string or text blocks) → one leading `system` message;
- a `user` message's `tool_result` blocks → `tool` messages (`tool_call_id` = `tool_use_id`), in
  order, followed by a `user` message with its text blocks, if any;
- an `assistant` message's `tool_use` blocks → its `tool_calls` (`{"id", "type": "function",
  "function": {"name", "arguments": <input object>}}`: arguments stay an object, as Hugging Face chat
  templates expect), its text blocks → its content, its `thinking` blocks are dropped;
- `tools` → `{"type": "function", "function": {"name", "description", "parameters": input_schema}}`;
- a final `assistant` message is a prefill: the answer continues its text (it is appended to the
  rendered prompt after the generation prompt, not rendered as a finished turn).
Anything the API defines that this server cannot honour (images, documents, server tools) is a 400,
never silently dropped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from turbine.errors import InvalidRequest
from turbine.protocol.anthropic import AnthropicMessage, CountTokensRequest, MessagesRequest
from turbine.protocol.openai import ChatCompletionRequest, ChatMessage

ROLES = ("user", "assistant")
TOOL_CHOICE_TYPES = ("auto", "any", "tool", "none")


class Translated(NamedTuple):
    chat: ChatCompletionRequest
    # Text of a final assistant message (prefill) that the answer continues; "" when there is none.
    assistant_prefix: str


def _text_block(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}.text: a text block needs a string 'text'", param=f"{where}.text")
    return text


def _system_text(system: str | list[dict[str, Any]] | None) -> str | None:
    if system is None or isinstance(system, str):
        return system or None
    texts = []
    for i, block in enumerate(system):
        if block.get("type") != "text":
            raise InvalidRequest(
                f"system.{i}.type: system blocks must be text blocks", param=f"system.{i}.type"
            )
        texts.append(_text_block(block, f"system.{i}"))
    return "\n".join(texts) or None


def _tool_result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise InvalidRequest(
                    f"{where}.content.{j}: only text blocks are supported in tool results",
                    param=f"{where}.content.{j}",
                )
            texts.append(_text_block(block, f"{where}.content.{j}"))
        return "\n".join(texts)
    raise InvalidRequest(
        f"{where}.content must be a string or a list of text blocks", param=f"{where}.content"
    )


def _user_messages(blocks: list[dict[str, Any]], where: str) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text_block(block, at))
        elif kind == "tool_result":
            tool_use_id = block.get("tool_use_id")
            if not isinstance(tool_use_id, str) or not tool_use_id:
                raise InvalidRequest(f"{at}.tool_use_id: a tool_result needs the tool_use_id", param=at)
            text = _tool_result_text(block.get("content"), at)
            if block.get("is_error"):
                text = f"Error: {text}"
            out.append(ChatMessage(role="tool", content=text, tool_call_id=tool_use_id))
        else:
            raise InvalidRequest(
                f"{at}.type: {kind!r} blocks are not supported in user messages here (text, tool_result)",
                param=f"{at}.type",
            )
    if texts or not out:
        out.append(ChatMessage(role="user", content="\n".join(texts)))
    return out


def _assistant_message(blocks: list[dict[str, Any]], where: str) -> ChatMessage:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text_block(block, at))
        elif kind == "tool_use":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, dict):
                raise InvalidRequest(
                    f"{at}: a tool_use block needs a string 'id' and 'name' and an object 'input'", param=at
                )
            calls.append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            )
        elif kind in ("thinking", "redacted_thinking"):
            # Clients send an answer's thinking back with its tool calls (Anthropic's API asks them
            # to). It is dropped: reasoning models' templates leave earlier turns' reasoning out.
            continue
        else:
            raise InvalidRequest(
                f"{at}.type: {kind!r} blocks are not supported in assistant messages here "
                "(text, tool_use, thinking)",
                param=f"{at}.type",
            )
    return ChatMessage(role="assistant", content="".join(texts), tool_calls=calls or None)


def _chat_messages(messages: list[AnthropicMessage]) -> tuple[list[ChatMessage], str]:
    if not messages:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    out: list[ChatMessage] = []
    prefix = ""
    last = len(messages) - 1
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if message.role not in ROLES:
            raise InvalidRequest(
                f"{where}.role: Input should be 'user' or 'assistant', got {message.role!r}",
                param=f"{where}.role",
            )
        content = message.content
        if message.role == "user":
            out += (
                [ChatMessage(role="user", content=content)]
                if isinstance(content, str)
                else _user_messages(content, where)
            )
            continue
        assistant = (
            ChatMessage(role="assistant", content=content)
            if isinstance(content, str)
            else _assistant_message(content, where)
        )
        if i == last and not assistant.tool_calls:
            # A prefill: the answer goes on from here. Trailing whitespace is stripped (Anthropic's
            # API refuses it): tokenizers attach a space to the next word, so a prompt ending in one
            # would leave the model off its usual token boundaries.
            prefix = str(assistant.content or "").rstrip()
            continue
        out.append(assistant)
    return out, prefix


def _tools(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]] | None:
    choice = req.tool_choice
    kind = None if choice is None else choice.get("type")
    if choice is not None and kind not in TOOL_CHOICE_TYPES:
        raise InvalidRequest(
            f"tool_choice.type must be one of {', '.join(TOOL_CHOICE_TYPES)}", param="tool_choice.type"
        )
    if not req.tools:
        if kind in ("any", "tool"):
            raise InvalidRequest("tool_choice requires tools", param="tool_choice")
        return None
    tools: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(req.tools):
        name, schema = tool.get("name"), tool.get("input_schema")
        if tool.get("type", "custom") != "custom" or not isinstance(name, str) or not name:
            raise InvalidRequest(
                f"tools.{i}: only client tools with a 'name' and 'input_schema' are supported",
                param=f"tools.{i}",
            )
        if not isinstance(schema, dict):
            raise InvalidRequest(
                f"tools.{i}.input_schema: an object (JSON schema) is required", param=f"tools.{i}"
            )
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
        names.add(name)
    if kind == "tool" and choice is not None and choice.get("name") not in names:
        raise InvalidRequest("tool_choice.name must name one of the tools", param="tool_choice.name")
    # `none` forbids tool use: the template is not shown the tools (as Dynamo's
    # --exclude-tools-when-tool-choice-none does for chat completions).
    return None if kind == "none" else tools


def to_chat(req: MessagesRequest | CountTokensRequest) -> Translated:
    """The chat request (and prefill) equivalent to `req`; raises `InvalidRequest` naming the field."""
    messages, prefix = _chat_messages(req.messages)
    system = _system_text(req.system)
    if system is not None:
        messages.insert(0, ChatMessage(role="system", content=system))
    tools = _tools(req)
    if not isinstance(req, MessagesRequest):
        return Translated(ChatCompletionRequest(model=req.model, messages=messages, tools=tools), prefix)
    if req.max_tokens < 1:
        raise InvalidRequest("max_tokens: must be at least 1", param="max_tokens")
    if req.temperature is not None and not 0.0 <= req.temperature <= 1.0:
        raise InvalidRequest("temperature: must be within [0, 1]", param="temperature")
    if req.top_k is not None and req.top_k < 1:
        raise InvalidRequest("top_k: must be at least 1", param="top_k")
    stops = req.stop_sequences or None
    if stops is not None and any(not s for s in stops):
        raise InvalidRequest("stop_sequences: each must be a non-empty string", param="stop_sequences")
    user = req.metadata.get("user_id") if req.metadata else None
    chat = ChatCompletionRequest(
        model=req.model,
        messages=messages,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        stop=stops,
        stream=req.stream,
        user=user if isinstance(user, str) else None,
        tools=tools,
        tool_choice=_tool_choice(req.tool_choice) if tools else None,
        parallel_tool_calls=False
        if (req.tool_choice or {}).get("disable_parallel_tool_use") is True
        else None,
        response_format=_response_format(req.output_config),
    )
    return Translated(chat, prefix)


def _tool_choice(choice: dict[str, Any] | None) -> str | dict[str, Any] | None:
    """Anthropic's `tool_choice` as chat's: `any` → "required", `tool` → the named function (both
    enforced by engines that constrain their output, refused by the others)."""
    kind = None if choice is None else choice.get("type")
    if choice is None or kind in (None, "auto"):
        return None
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return None


def _response_format(output_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """`output_config.format` (`{"type": "json_schema", "schema": {...}}`) as chat's response_format."""
    fmt = (output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise InvalidRequest("output_config.format.type: must be 'json_schema'", param="output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.get("schema")}}
