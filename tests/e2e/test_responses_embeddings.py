"""/v1/responses (over the chat path) and /v1/embeddings, driven by the official openai client."""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import openai
import pytest

from tests.e2e.conftest import MODEL, Stack, http, wait_instances
from turbine.engines.embedding import EMBEDDING_DIM

pytestmark = pytest.mark.e2e

EMBED = "tiny-embed"
ECHO = "tiny-echo"


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _stack(stack: Stack) -> str:
    """A mocker chat model, an echo chat model (finishes on "stop") and an echo embedding model."""
    _, url = stack.frontend()
    stack.worker("--engine", "mocker", "--speedup-ratio", "1000")
    stack.worker("--engine", "echo", "--model-name", ECHO)
    stack.worker("--engine", "echo", "--model-name", EMBED, "--model-type", "embedding")
    for model in (MODEL, ECHO, EMBED):
        wait_instances(url, 1, model=model)
    return url


def test_responses_and_embeddings(stack: Stack) -> None:
    url = _stack(stack)
    oai = client(url)

    # ---------------------------------------------------------------- responses, not streamed
    resp = oai.responses.create(
        model=MODEL, input="Hello there", instructions="Be brief.", max_output_tokens=8
    )
    assert resp.id.startswith("resp") and resp.object == "response"
    assert resp.status == "incomplete"
    assert resp.incomplete_details is not None and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage is not None and resp.usage.output_tokens == 8
    assert resp.usage.total_tokens == resp.usage.input_tokens + 8
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    message = resp.output[0]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg")
    assert message.content[0].type == "output_text" and message.content[0].text
    assert resp.output_text == message.content[0].text

    items = [
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "Say"}, {"type": "input_text", "text": " hi"}],
        },
    ]
    done = oai.responses.create(model=ECHO, input=items)  # type: ignore[arg-type]
    assert done.status == "completed" and done.incomplete_details is None
    assert "Say hi" in done.output_text  # the echo engine returns the templated prompt

    # ---------------------------------------------------------------------- responses, streamed
    events = list(oai.responses.create(model=ECHO, input="Stream me", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert kind in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    text_done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1]
    assert final.type == "response.completed"
    assert deltas and deltas == text_done.text == final.response.output_text
    assert "Stream me" in deltas

    limited = list(oai.responses.create(model=MODEL, input="Hi", max_output_tokens=5, stream=True))
    assert limited[-1].type == "response.incomplete"
    assert limited[-1].response.usage is not None and limited[-1].response.usage.output_tokens == 5

    # ------------------------------------------------------------------------------ embeddings
    floats = oai.embeddings.create(model=EMBED, input=["hello world", "goodbye"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert all(len(d.embedding) == EMBEDDING_DIM for d in floats.data)
    assert math.isclose(sum(x * x for x in floats.data[0].embedding), 1.0, rel_tol=1e-6)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
    # The client asks for base64 by default and decodes it: float32 of the same vector.
    decoded = oai.embeddings.create(model=EMBED, input="hello world")
    assert decoded.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    again = oai.embeddings.create(model=EMBED, input="hello world", encoding_format="float")
    assert again.data[0].embedding == floats.data[0].embedding  # deterministic
    # Token ids, and lists of them; the raw base64 body is little-endian float32.
    by_ids = oai.embeddings.create(model=EMBED, input=[[1, 2, 3], [4, 5]], encoding_format="float")
    assert len(by_ids.data) == 2 and by_ids.usage.prompt_tokens == 5
    status, _, body = http(
        "POST",
        url + "/v1/embeddings",
        json.dumps({"model": EMBED, "input": [1, 2, 3], "encoding_format": "base64"}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200
    raw = base64.b64decode(json.loads(body)["data"][0]["embedding"])
    vector = list(struct.unpack(f"<{EMBEDDING_DIM}f", raw))
    assert vector == pytest.approx(by_ids.data[0].embedding, abs=1e-6)

    # ----------------------------------------------------------------------------- bad inputs
    robot: Any = [{"role": "robot", "content": "hi"}]
    image: Any = [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
    with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
        oai.embeddings.create(model=MODEL, input="hi")
    with pytest.raises(openai.BadRequestError, match="does not serve chat"):
        oai.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="does not serve chat"):
        oai.responses.create(model=EMBED, input="hi")
    with pytest.raises(openai.BadRequestError, match="input"):
        oai.embeddings.create(model=EMBED, input=[])
    with pytest.raises(openai.BadRequestError, match="encoding_format"):
        oai.embeddings.create(model=EMBED, input="hi", encoding_format="int8")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="token ids"):
        oai.embeddings.create(model=EMBED, input=[[1, 10**9]])
    with pytest.raises(openai.BadRequestError, match="input"):
        oai.responses.create(model=MODEL, input=robot)
    with pytest.raises(openai.BadRequestError, match="input"):
        oai.responses.create(model=MODEL, input="")
    with pytest.raises(openai.BadRequestError, match="input"):
        oai.responses.create(model=MODEL, input=image)
    with pytest.raises(openai.BadRequestError, match="max_output_tokens"):
        oai.responses.create(model=MODEL, input="hi", max_output_tokens=0)
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="no-such-model", input="hi")
