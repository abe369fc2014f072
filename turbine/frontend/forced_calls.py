"""Enforced tool choice on an engine that constrains its output to JSON schemas only (pure).

Upstream servers (`--upstream-guided-decoding vllm|sglang|llama.cpp`) read none of Turbine's
tool-call grammars, but each takes a JSON schema; and a call that must come is, in a forceable
format, fixed markup around one JSON object (`postprocess/parsers/tool_grammar.forced_call`). So
for `tool_choice` "required" or a named function (Anthropic's `any` / `tool`):

- the opening markup's tokens end the prompt (`prefilled`): the model goes on as if it had written
  them, its output constrained to the call's JSON object;
- the choice's parser sees the opening markup before the generated text and, when the engine
  stopped where the schema allows it to, the closing markup after it (`framed`);

so the client gets the call and the finish_reason the torch engine's grammar gives: "tool_calls",
or "stop" for a named function. "required" yields exactly one call (one or more were asked for).
`auto` with `parallel_tool_calls: false` (text, then at most one call) is no JSON schema: the
frontend refuses it with a 400.

Unlike the torch engine's, the opening markup's tokens count as prompt tokens, and `max_tokens`
bounds the JSON object alone (cut where the longer prompt leaves less room in the context).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import msgspec

from turbine.errors import InvalidRequest
from turbine.postprocess.postprocessor import TextDelta
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.response import FinishReason


def prefilled(
    request: PreprocessedRequest, opening_ids: list[int], context_length: int
) -> PreprocessedRequest:
    """`request` with `opening_ids` after its prompt, its token budget cut to what still fits the
    context; `InvalidRequest` when not one token does."""
    token_ids = [*request.token_ids, *opening_ids]
    room = context_length - len(token_ids)
    if room < 1:
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{len(token_ids) + 1} tokens ({len(token_ids)} in the messages and the forced tool call's "
            "opening markup, 1 in the completion). Please reduce the length of the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    stop = request.stop
    max_tokens = min(stop.max_tokens, room)
    stop = msgspec.structs.replace(stop, max_tokens=max_tokens, min_tokens=min(stop.min_tokens, max_tokens))
    return msgspec.structs.replace(request, token_ids=token_ids, stop=stop)


async def framed(
    deltas: AsyncGenerator[TextDelta, None], opening: str, closing: str
) -> AsyncGenerator[TextDelta, None]:
    """`deltas` with `opening` before the first one's text and, when the engine stopped (the JSON
    object is complete: the schema let it end there), `closing` after the last one's. A stream cut
    short (`length`) stays open, as the torch engine's output would be."""
    first = True
    try:
        async for delta in deltas:
            text = delta.text
            if first:
                text, first = opening + text, False
            if delta.finish_reason is FinishReason.STOP:
                text += closing
            yield delta._replace(text=text)
    finally:
        await deltas.aclose()
