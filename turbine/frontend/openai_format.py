"""Build OpenAI response bodies and stream chunks (exact shapes, encoded with orjson)."""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

import orjson

from turbine.postprocess.logprobs import TokenLogprob
from turbine.postprocess.parsers.output import ToolCallDelta
from turbine.postprocess.postprocessor import TextDelta


class Choice(NamedTuple):
    """One choice of a finished (non-streamed) completion."""

    text: str
    finish: str
    logprobs: list[TokenLogprob] | None
    # Chat output through the model's parsers: its reasoning and tool calls.
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


def tool_call_object(call: ToolCallDelta) -> dict[str, Any]:
    """A call in `message.tool_calls` (and the first stream chunk of a call, without arguments)."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """Chat's `choices[i].logprobs`: None when the engine gave none (or none were asked for)."""
    if entries is None:
        return None
    content = [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.bytes),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """Legacy completions' `choices[i].logprobs`; `text_offset` counts characters of the choice's text
    (from its start, in stream chunks too). Two alternatives with the same string share a key."""
    if entries is None:
        return None
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": [e.offset for e in entries],
    }


class ChunkFormatter:
    """Formats one request's SSE events; `chat` selects chat.completion.chunk vs text_completion."""

    __slots__ = ("_base", "_chat", "_head", "_include_usage", "_object", "_reasoning_field", "_tail")

    def __init__(
        self,
        *,
        chat: bool,
        request_id: str,
        model: str,
        created: int,
        include_usage: bool,
        reasoning_field: str = "reasoning_content",
    ) -> None:
        self._chat = chat
        self._reasoning_field = reasoning_field
        self._object = "chat.completion.chunk" if chat else "text_completion"
        self._include_usage = include_usage
        self._base = {
            "id": request_id,
            "object": self._object,
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        # Every event is the same object around its one choice: its bytes before and after the choice
        # are made once per request, and each token serializes only its choice (the bytes are those of
        # serializing `{**base, "choices": [choice], "usage": None}` whole).
        self._head = b"data: " + orjson.dumps(self._base)[:-1] + b',"choices":['
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def _event(self, choice: dict[str, Any]) -> bytes:
        return self._head + orjson.dumps(choice) + self._tail

    def role(self, index: int = 0) -> bytes:
        """Chat streams open with an empty assistant delta per choice, as OpenAI's do (text
        completion streams with nothing)."""
        if not self._chat:
            return b""
        return self._event(
            {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def delta(self, delta: TextDelta, index: int = 0) -> bytes:
        finish = delta.finish_reason.value if delta.finish_reason is not None else None
        lp = delta.logprobs
        if self._chat:
            logprobs = None if lp is None else chat_logprobs(lp)
            if delta.reasoning or delta.tool_calls:
                return self._parsed_delta(delta, index, logprobs, finish)
            content = {"content": delta.text} if delta.text or finish is None else {}
            return self._event(
                {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish}
            )
        logprobs = None if lp is None else completion_logprobs(lp)
        return self._event(
            {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": finish}
        )

    def _parsed_delta(
        self, delta: TextDelta, index: int, logprobs: dict[str, Any] | None, finish: str | None
    ) -> bytes:
        """A delta with reasoning or tool calls: reasoning and content in one event, then each call
        as OpenAI streams them — its id and name (empty arguments), then its arguments — and the
        finish reason on an empty last event."""
        out = bytearray()
        head: dict[str, Any] = {}
        if delta.reasoning:
            head[self._reasoning_field] = delta.reasoning
        if delta.text:
            head["content"] = delta.text
        if head or not delta.tool_calls:
            out += self._event({"index": index, "delta": head, "logprobs": logprobs, "finish_reason": None})
            logprobs = None
        for call in delta.tool_calls:
            opening = {**tool_call_object(call), "index": call.index}
            opening["function"] = {"name": call.name, "arguments": ""}
            arguments = {"index": call.index, "function": {"arguments": call.arguments}}
            for part in (opening, arguments):
                out += self._event(
                    {
                        "index": index,
                        "delta": {"tool_calls": [part]},
                        "logprobs": logprobs,
                        "finish_reason": None,
                    }
                )
                logprobs = None
        if finish is not None:
            out += self._event({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish})
        return bytes(out)

    def usage(self, usage: dict[str, Any]) -> bytes:
        body = {**self._base, "choices": [], "usage": usage}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    @staticmethod
    def error(error: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(error) + b"\n\n"

    DONE = b"data: [DONE]\n\n"


def _chat_message(choice: Choice, reasoning_field: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.reasoning:
        message[reasoning_field] = choice.reasoning
        # A reply that is all reasoning has no content (null, as vLLM's and OpenAI's).
        message["content"] = choice.text or None
    if choice.tool_calls:
        # OpenAI's content is null when the reply is only calls.
        message["content"] = choice.text or None
        message["tool_calls"] = [tool_call_object(c) for c in choice.tool_calls]
    return message


def chat_completion(
    *,
    request_id: str,
    model: str,
    created: int,
    choices: list[Choice],
    usage: dict[str, Any],
    reasoning_field: str = "reasoning_content",
) -> bytes:
    return orjson.dumps(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": i,
                    "message": _chat_message(choice, reasoning_field),
                    "logprobs": chat_logprobs(choice.logprobs),
                    "finish_reason": choice.finish,
                }
                for i, choice in enumerate(choices)
            ],
            "usage": usage,
        }
    )


def text_completion(
    *, request_id: str, model: str, created: int, choices: list[Choice], usage: dict[str, Any]
) -> bytes:
    return orjson.dumps(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": i,
                    "text": c.text,
                    "logprobs": completion_logprobs(c.logprobs),
                    "finish_reason": c.finish,
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage,
        }
    )


# ------------------------------------------------------------------------- Responses API


def _output_message(message_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}]
    return {"type": "message", "id": message_id, "status": status, "role": "assistant", "content": content}


def responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Chat usage → the Responses API's names."""
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def response_object(
    *,
    response_id: str,
    message_id: str,
    model: str,
    created: int,
    text: str | None,
    finish: str | None,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """A `response` object; `finish` None means still in progress (the stream's first events)."""
    status = "in_progress" if finish is None else "incomplete" if finish == "length" else "completed"
    output = [] if text is None else [_output_message(message_id, text, "completed")]
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
        "model": model,
        "output": output,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "usage": None if usage is None else responses_usage(usage),
    }


class ResponsesStreamFormatter:
    """The SSE events of one streamed response (one message, one output_text part), numbered."""

    __slots__ = ("_seq", "created", "message_id", "model", "response_id")

    def __init__(self, *, response_id: str, message_id: str, model: str, created: int) -> None:
        self.response_id = response_id
        self.message_id = message_id
        self.model = model
        self.created = created
        self._seq = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def response(self, text: str | None, finish: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The `response` object so far (the whole answer of a request that does not stream)."""
        return response_object(
            response_id=self.response_id,
            message_id=self.message_id,
            model=self.model,
            created=self.created,
            text=text,
            finish=finish,
            usage=usage,
        )

    def start(self) -> bytes:
        item = {**_output_message(self.message_id, "", "in_progress"), "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        return (
            self.event("response.created", response=self.response(None, None, None))
            + self.event("response.in_progress", response=self.response(None, None, None))
            + self.event("response.output_item.added", output_index=0, item=item)
            + self.event(
                "response.content_part.added",
                item_id=self.message_id,
                output_index=0,
                content_index=0,
                part=part,
            )
        )

    def delta(self, text: str) -> bytes:
        if not text:
            return b""
        return self.event(
            "response.output_text.delta",
            item_id=self.message_id,
            output_index=0,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def finish(self, text: str, finish: str, usage: dict[str, Any]) -> bytes:
        part = {"type": "output_text", "text": text, "annotations": []}
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        done = "response.incomplete" if finish == "length" else "response.completed"
        return (
            self.event("response.output_text.done", **where, text=text, logprobs=[])
            + self.event("response.content_part.done", **where, part=part)
            + self.event(
                "response.output_item.done",
                output_index=0,
                item=_output_message(self.message_id, text, "completed"),
            )
            + self.event(done, response=self.response(text, finish, usage))
        )

    def error(self, error: dict[str, Any]) -> bytes:
        inner = error.get("error", {})
        return self.event(
            "error", code=inner.get("code"), message=inner.get("message", ""), param=inner.get("param")
        )


# ---------------------------------------------------------------------------- embeddings


def embedding_list(*, model: str, vectors: list[bytes | list[float]], prompt_tokens: int) -> bytes:
    """`vectors` are float lists, or base64 text (already encoded) for encoding_format=base64."""
    data = [
        {"object": "embedding", "index": i, "embedding": v.decode() if isinstance(v, bytes) else v}
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})
