"""Build OpenAI response bodies and stream chunks (exact shapes, encoded with orjson)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from turbine.postprocess.postprocessor import TextDelta


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChunkFormatter:
    """Formats one request's SSE events; `chat` selects chat.completion.chunk vs text_completion."""

    __slots__ = ("_base", "_chat", "_include_usage", "_object")

    def __init__(self, *, chat: bool, request_id: str, model: str, created: int, include_usage: bool) -> None:
        self._chat = chat
        self._object = "chat.completion.chunk" if chat else "text_completion"
        self._include_usage = include_usage
        self._base = {
            "id": request_id,
            "object": self._object,
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }

    def _event(self, choice: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {**self._base, "choices": [choice]}
        if self._include_usage:
            body["usage"] = None
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def role(self, index: int = 0) -> bytes:
        """Chat streams open with an empty assistant delta per choice, as OpenAI's do."""
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
        if self._chat:
            content = {"content": delta.text} if delta.text or finish is None else {}
            return self._event({"index": index, "delta": content, "logprobs": None, "finish_reason": finish})
        return self._event({"index": index, "text": delta.text, "logprobs": None, "finish_reason": finish})

    def usage(self, usage: dict[str, Any]) -> bytes:
        body = {**self._base, "choices": [], "usage": usage}
        return b"data: " + orjson.dumps(body) + b"\n\n"

    @staticmethod
    def error(error: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(error) + b"\n\n"

    DONE = b"data: [DONE]\n\n"


def chat_completion(
    *, request_id: str, model: str, created: int, choices: list[tuple[str, str]], usage: dict[str, Any]
) -> bytes:
    """`choices` are (text, finish_reason) per choice index."""
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
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i, (text, finish) in enumerate(choices)
            ],
            "usage": usage,
        }
    )


def text_completion(
    *, request_id: str, model: str, created: int, choices: list[tuple[str, str]], usage: dict[str, Any]
) -> bytes:
    return orjson.dumps(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                for i, (text, finish) in enumerate(choices)
            ],
            "usage": usage,
        }
    )
