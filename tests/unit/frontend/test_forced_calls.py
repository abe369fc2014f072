"""Enforced tool choice for an engine that takes JSON schemas only (an upstream server): the request
the frontend sends (the call's opening markup at the end of the prompt, the call's schema as the
constraint) and what the client gets back from the engine's output (the calls and finish reasons
the torch engine's grammar gives)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest

from turbine.errors import InvalidRequest
from turbine.frontend.forced_calls import framed, prefilled
from turbine.frontend.guided import constrain
from turbine.frontend.pipeline import ModelPipeline, _parsed
from turbine.models import bundled_model_path
from turbine.postprocess.parsers.output import ParserSettings, make_output_parser
from turbine.postprocess.postprocessor import TextDelta
from turbine.preprocess.preprocessor import Prepared, Preprocessor
from turbine.preprocess.tokenizer import load_model_files
from turbine.protocol.model_card import CAP_GUIDED_DECODING, guided_capability
from turbine.protocol.openai import ChatCompletionRequest, ChatMessage
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import FinishReason

pytestmark = pytest.mark.unit

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "ping"}},
]
JSON_ONLY = (guided_capability("json_schema"), guided_capability("grammar"))
OPENING, CLOSING = "<tool_call>\n", "\n</tool_call>"
WEATHER_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def _request(max_tokens: int = 10, min_tokens: int = 0) -> PreprocessedRequest:
    return PreprocessedRequest(
        "r", "m", [1, 2, 3], SamplingOptions(), StopConditions(max_tokens=max_tokens, min_tokens=min_tokens)
    )


def test_the_opening_markup_ends_the_prompt_and_the_budget_fits_the_context() -> None:
    out = prefilled(_request(), [7, 8], context_length=100)
    assert out.token_ids == [1, 2, 3, 7, 8] and out.stop.max_tokens == 10
    # Where the longer prompt leaves less room, the budget (and min_tokens with it) shrinks.
    tight = prefilled(_request(max_tokens=10, min_tokens=9), [7, 8], context_length=12)
    assert (tight.stop.max_tokens, tight.stop.min_tokens) == (7, 7)
    with pytest.raises(InvalidRequest) as err:
        prefilled(_request(), [7, 8], context_length=5)
    assert (err.value.param, err.value.code) == ("messages", "context_length_exceeded")


async def _deltas(*pieces: tuple[str, FinishReason | None]) -> AsyncGenerator[TextDelta, None]:
    for text, finish in pieces:
        yield TextDelta(text, finish)


async def _collect(deltas: AsyncGenerator[TextDelta, None]) -> list[TextDelta]:
    return [d async for d in deltas]


async def test_the_markup_goes_around_a_stopped_output_and_only_opens_a_cut_one() -> None:
    done = await _collect(framed(_deltas(('{"a"', None), (": 1}", FinishReason.STOP)), OPENING, CLOSING))
    assert [d.text for d in done] == [OPENING + '{"a"', ": 1}" + CLOSING]
    cut = await _collect(framed(_deltas(('{"a"', None), (": ", FinishReason.LENGTH)), OPENING, CLOSING))
    assert "".join(d.text for d in cut) == OPENING + '{"a": '


async def _client_sees(
    pieces: list[tuple[str, FinishReason | None]], *, named: bool
) -> tuple[list[tuple[str, dict[str, Any]]], str, FinishReason | None]:
    """The calls, content and finish reason the engine's `pieces` become for the client."""
    parser = make_output_parser(ParserSettings(tool_call_parser="hermes"), TOOLS)
    out = await _collect(_parsed(framed(_deltas(*pieces), OPENING, CLOSING), parser, None, named))
    calls = [(c.name, json.loads(c.arguments)) for d in out for c in d.tool_calls]
    return calls, "".join(d.text for d in out), out[-1].finish_reason


async def test_the_client_gets_the_call_and_the_finish_reason_of_the_torch_engine() -> None:
    pieces: list[tuple[str, FinishReason | None]] = [
        (WEATHER_JSON[:20], None),
        (WEATHER_JSON[20:], FinishReason.STOP),
    ]
    required = await _client_sees(pieces, named=False)
    assert required == ([("get_weather", {"city": "Paris"})], "", FinishReason.TOOL_CALLS)
    named = await _client_sees(pieces, named=True)
    assert named == ([("get_weather", {"city": "Paris"})], "", FinishReason.STOP)
    # Cut off mid-object: no call, the text as the torch engine's grammar would have left it.
    cut = await _client_sees([(WEATHER_JSON[:20], FinishReason.LENGTH)], named=False)
    assert cut == ([], OPENING + WEATHER_JSON[:20], FinishReason.LENGTH)


def _pipeline(capabilities: tuple[str, ...], parser: str | None = "hermes") -> ModelPipeline:
    preprocessor = Preprocessor("m", load_model_files(bundled_model_path()), None, context_length=4096)
    fake = SimpleNamespace(
        name="m",
        card=SimpleNamespace(capabilities=capabilities),
        parsers=ParserSettings(tool_call_parser=parser),
        preprocessor=preprocessor,
    )
    return cast(ModelPipeline, fake)


async def _constrain(pipeline: ModelPipeline, **fields: Any) -> tuple[Prepared, Prepared]:
    req = msgspec.convert(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": TOOLS,
            **fields,
        },
        ChatCompletionRequest,
    )
    assert isinstance(req.messages[0], ChatMessage)
    plain = await pipeline.preprocessor.chat(req, "r")
    return plain, constrain(pipeline, req, plain)


async def test_a_json_schema_engine_gets_the_call_schema_after_the_opening_markup() -> None:
    pipeline = _pipeline(JSON_ONLY)
    named = {"type": "function", "function": {"name": "get_weather"}}
    plain, forced = await _constrain(pipeline, tool_choice=named)
    opening = pipeline.preprocessor.tokenizer.encode(OPENING)
    assert forced.request.token_ids == [*plain.request.token_ids, *opening]
    guided = forced.request.sampling.guided
    assert guided is not None and (guided.kind, guided.param) == ("json_schema", "tool_choice")
    schema = json.loads(guided.spec)
    assert schema["properties"] == {"name": {"const": "get_weather"}, "arguments": WEATHER_PARAMS}
    assert forced.forced_markup == (OPENING, CLOSING) and forced.named_call
    # `required` (parallel or not): one call of any of the tools.
    for parallel in (True, False):
        _, required = await _constrain(pipeline, tool_choice="required", parallel_tool_calls=parallel)
        guided = required.request.sampling.guided
        assert guided is not None and guided.kind == "json_schema" and not required.named_call
        names = [s["properties"]["name"]["const"] for s in json.loads(guided.spec)["anyOf"]]
        assert names == ["get_weather", "ping"] and required.forced_markup == (OPENING, CLOSING)


async def test_a_full_grammar_engine_keeps_its_grammar_and_its_prompt() -> None:
    plain, forced = await _constrain(_pipeline((CAP_GUIDED_DECODING,)), tool_choice="required")
    guided = forced.request.sampling.guided
    assert guided is not None and guided.kind == "grammar" and forced.forced_markup is None
    assert forced.request.token_ids == plain.request.token_ids


@pytest.mark.parametrize(
    ("capabilities", "parser", "fields", "param"),
    [
        # Text then at most one call is no JSON schema.
        (JSON_ONLY, "hermes", {"parallel_tool_calls": False}, "parallel_tool_calls"),
        # An engine that constrains nothing, or not to JSON schemas.
        ((), "hermes", {"tool_choice": "required"}, "tool_choice"),
        ((guided_capability("grammar"),), "hermes", {"tool_choice": "required"}, "tool_choice"),
        # A tool-call format without markup to write.
        (JSON_ONLY, "llama3_json", {"tool_choice": "required"}, "tool_choice"),
    ],
)
async def test_what_cannot_be_forced_is_a_400_naming_the_field(
    capabilities: tuple[str, ...], parser: str, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        await _constrain(_pipeline(capabilities, parser), **fields)
    assert err.value.param == param


async def test_auto_with_parallel_calls_stays_unconstrained() -> None:
    plain, out = await _constrain(_pipeline(JSON_ONLY))
    assert out.request.sampling.guided is None and out.forced_markup is None
    assert out.request.token_ids == plain.request.token_ids
