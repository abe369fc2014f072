"""SSE chunks are built from pre-serialized halves: the bytes must equal serializing each event whole."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from turbine.frontend.openai_format import ChunkFormatter
from turbine.postprocess.postprocessor import TextDelta
from turbine.protocol.response import FinishReason

pytestmark = pytest.mark.unit


def _whole(base: dict[str, Any], choice: dict[str, Any], include_usage: bool) -> bytes:
    body: dict[str, Any] = {**base, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return b"data: " + orjson.dumps(body) + b"\n\n"


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_events_equal_whole_serialization(chat: bool, include_usage: bool) -> None:
    model = 'm "quoted" \u00e9\U0001f680'
    fmt = ChunkFormatter(chat=chat, request_id="id-1", model=model, created=7, include_usage=include_usage)
    base: dict[str, Any] = {"id": "id-1", "object": "chat.completion.chunk" if chat else "text_completion"}
    base |= {"created": 7, "model": model, "system_fingerprint": None}
    for delta in (TextDelta('he said "hi"\n', None), TextDelta("", FinishReason.LENGTH)):
        finish = delta.finish_reason.value if delta.finish_reason is not None else None
        if chat:
            content = {"content": delta.text} if delta.text or finish is None else {}
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.text, "logprobs": None, "finish_reason": finish}
        assert fmt.delta(delta) == _whole(base, choice, include_usage)
    if chat:
        role = {
            "index": 1,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        assert fmt.role(1) == _whole(base, role, include_usage)
