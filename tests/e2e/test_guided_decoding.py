"""Structured outputs and enforced tool choice on the torch engine, end to end: SmolLM2 (the real GGUF
model) behind a frontend, driven by the official `openai` and `anthropic` clients. Every output is
checked against its constraint (a JSON Schema validator, the regex, the choices, the tools' schemas).

Engines that cannot constrain their output (the mocker) refuse the same requests with a 400.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import anthropic
import jsonschema_rs
import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam

from tests.e2e.conftest import (
    SMALL_KV,
    TINY,
    Stack,
    StreamProgress,
    http,
    live_instances,
    tiny_torch_worker,
    wait_instances,
    wait_until,
)

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("guided_decoding")]

SMOLLM2 = "SmolLM2-135M-Instruct"
MOCK = "mock-model"


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, gguf_cache: Path, smollm2_dir: Path
) -> Iterator[str]:
    """One frontend; SmolLM2 on the torch engine (hermes tool calls, its conversion in `gguf_cache`
    already: `smollm2_dir`) and a mocker model beside it."""
    root = tmp_path_factory.mktemp("guided")
    stack = Stack(root)
    try:
        _, url = stack.frontend("--enable-anthropic-api")
        worker = stack.worker(
            "--engine", "torch", "--model-path", str(smollm2_gguf), "--gguf-cache-dir", str(gguf_cache),
            "--device", "cpu", "--tool-call-parser", "hermes", *SMALL_KV,
        )  # fmt: skip
        stack.worker("--engine", "mocker", "--model-name", MOCK)
        wait_until(lambda: live_instances(url, SMOLLM2) == 1, 180, worker)
        wait_instances(url, 1, model=MOCK)
        yield url
    finally:
        stack.stop()


def _oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population: int = pydantic.Field(ge=0, le=100_000_000)


def test_parse_returns_a_pydantic_object_stream_and_not(served: str) -> None:
    oai = _oai(served)
    messages = _ask("Describe Paris as JSON with its name, country and population.")
    out = oai.chat.completions.parse(
        model=SMOLLM2, messages=messages, response_format=City, temperature=0, max_tokens=60
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice
    parsed = choice.message.parsed
    assert isinstance(parsed, City), choice.message.content
    with oai.chat.completions.stream(
        model=SMOLLM2, messages=messages, response_format=City, temperature=0, max_tokens=60
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == parsed


SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 16},
                            "zip": {"type": "integer"},
                        },
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["person"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {
            "color": {"type": "string", "enum": ["red", "green", "blue"]},
            "size": {"enum": ["S", "M", "L"]},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "fruits": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 2,
                "maxItems": 3,
            }
        },
        "required": ["fruits"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "ok": {"type": "boolean"},
        },
        "required": ["code", "ok"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(served: str, name: str) -> None:
    schema = SCHEMAS[name]
    out = _oai(served).chat.completions.create(
        model=SMOLLM2,
        messages=_ask(f"Give an example of {name} data as JSON."),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
        temperature=0,
        max_tokens=80,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema_rs.validate(schema, json.loads(choice.message.content or ""))


def test_json_object_regex_and_choice_in_every_spelling(served: str) -> None:
    oai = _oai(served)
    obj = oai.chat.completions.create(
        model=SMOLLM2,
        messages=_ask("Reply with a JSON object about a cat."),
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    else:  # an unbounded object may run out of tokens; what came is still a JSON object's start
        assert (obj.choices[0].message.content or "").startswith("{")
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    extra: dict[str, Any]
    for extra in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        out = oai.chat.completions.create(
            model=SMOLLM2, messages=_ask("A code, please."), temperature=0, max_tokens=12, extra_body=extra
        )
        assert re.fullmatch(pattern, out.choices[0].message.content or ""), out
        assert out.choices[0].finish_reason == "stop"
    choices = ["positive", "negative", "neutral"]
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        out = oai.chat.completions.create(
            model=SMOLLM2,
            messages=_ask("Sentiment of 'I love this!'?"),
            temperature=0,
            max_tokens=8,
            extra_body=extra,
        )
        assert out.choices[0].message.content in choices, out
    # Completions take vLLM's spellings too, and a grammar in Lark or GBNF.
    lark = 'start: "yes" | "no"'
    gbnf = 'root ::= "yes" | "no"'
    for extra in ({"guided_grammar": lark}, {"structured_outputs": {"grammar": gbnf}}):
        done = oai.completions.create(
            model=SMOLLM2, prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0, extra_body=extra
        )
        assert done.choices[0].text in ("yes", "no"), done
    # The Responses API's text.format, and n > 1: every choice follows the schema.
    schema = SCHEMAS["enum"]
    fmt: Any = {"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}}
    resp = oai.responses.create(
        model=SMOLLM2, input="Pick a color and a size.", max_output_tokens=40, temperature=0, text=fmt
    )
    jsonschema_rs.validate(schema, json.loads(resp.output_text))
    several = oai.chat.completions.create(
        model=SMOLLM2,
        messages=_ask("Pick a color and a size."),
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}},
        n=3,
        temperature=1.0,
        seed=7,
        max_tokens=40,
    )
    assert len(several.choices) == 3
    for choice in several.choices:
        jsonschema_rs.validate(schema, json.loads(choice.message.content or ""))


WEATHER: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMA_OF: dict[str, dict[str, Any]] = {
    t["function"]["name"]: dict(t["function"].get("parameters", {})) for t in TOOLS
}


def _check_calls(message: Any, names: set[str]) -> list[str]:
    calls = message.tool_calls or []
    for call in calls:
        assert call.function.name in names
        jsonschema_rs.validate(SCHEMA_OF[call.function.name], json.loads(call.function.arguments))
    return [c.function.name for c in calls]


def test_tool_choice_required_named_and_not_parallel(served: str) -> None:
    oai = _oai(served)
    # `required`: one or more calls of the given tools, and nothing else.
    required = oai.chat.completions.create(
        model=SMOLLM2,
        messages=_ask("Weather in Paris and in Rome?"),
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(_check_calls(choice.message, {"get_weather", "get_time"})) >= 1
    assert not choice.message.content
    # A named function: exactly that call, finishing with "stop" as OpenAI's does.
    named = oai.chat.completions.create(
        model=SMOLLM2,
        messages=_ask("What is the weather in Paris?"),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=60,
    )
    choice = named.choices[0]
    assert choice.finish_reason == "stop", choice
    assert _check_calls(choice.message, {"get_time"}) == ["get_time"]
    # parallel_tool_calls false: exactly one call, streamed too; here for a question that needs no
    # tool, which `required` still answers with a call.
    stream = oai.chat.completions.create(
        model=SMOLLM2,
        messages=_ask("Hello! How are you today?"),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
        stream=True,
    )
    indices: set[int] = set()
    finish = None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            indices.add(delta_call.index)
        finish = chunk.choices[0].finish_reason or finish
    assert (indices, finish) == ({0}, "tool_calls")
    # auto without parallel calls: text, or text and at most one call.
    auto = oai.chat.completions.create(
        model=SMOLLM2,
        messages=_ask("Weather in Paris and in Rome?"),
        tools=TOOLS,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    choice = auto.choices[0]
    assert len(_check_calls(choice.message, {"get_weather", "get_time"})) <= 1, choice
    assert choice.finish_reason in ("stop", "tool_calls", "length")


def test_anthropic_tool_choice_and_output_format(served: str) -> None:
    client = anthropic.Anthropic(base_url=served, api_key="unused", max_retries=0, timeout=120)
    tools: list[anthropic.types.ToolParam] = [
        {"name": t["function"]["name"], "input_schema": SCHEMA_OF[t["function"]["name"]]} for t in TOOLS
    ]
    hello: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hi there!"}]
    anyone = client.messages.create(
        model=SMOLLM2,
        max_tokens=80,
        messages=hello,
        tools=tools,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        extra_body={"temperature": 0},
    )
    uses = [b for b in anyone.content if b.type == "tool_use"]
    assert anyone.stop_reason == "tool_use" and len(uses) == 1, anyone
    one = client.messages.create(
        model=SMOLLM2,
        max_tokens=80,
        messages=hello,
        tools=tools,
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    uses = [b for b in one.content if b.type == "tool_use"]
    assert [u.name for u in uses] == ["get_weather"], one
    jsonschema_rs.validate(SCHEMA_OF["get_weather"], uses[0].input)
    schema = SCHEMAS["enum"]
    shaped = client.messages.create(
        model=SMOLLM2,
        max_tokens=40,
        messages=[{"role": "user", "content": "Pick a color and a size."}],
        extra_body={"temperature": 0, "output_config": {"format": {"type": "json_schema", "schema": schema}}},
    )
    text = "".join(b.text for b in shaped.content if b.type == "text")
    jsonschema_rs.validate(schema, json.loads(text))


BAD: list[tuple[dict[str, Any], str]] = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nope"}},
            }
        },
        "response_format",
    ),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: undefined_rule"}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "guided_regex"),
]


@pytest.mark.parametrize(("kwargs", "param"), BAD)
def test_a_constraint_that_cannot_compile_is_a_400_naming_it(
    served: str, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _oai(served).chat.completions.create(model=SMOLLM2, messages=_ask("hi"), max_tokens=5, **kwargs)
    body = err.value.body
    assert isinstance(body, dict) and str(body.get("param", "")).startswith(param), body


Kind = Literal["response_format", "guided", "required", "named", "single"]


@pytest.mark.parametrize("kind", ["response_format", "guided", "required", "named", "single"])
def test_an_engine_that_cannot_constrain_refuses_with_a_400(served: str, kind: Kind) -> None:
    cases: dict[str, dict[str, Any]] = {
        "response_format": {"response_format": {"type": "json_object"}},
        "guided": {"extra_body": {"guided_choice": ["a", "b"]}},
        "required": {"tools": TOOLS, "tool_choice": "required"},
        "named": {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        "single": {"tools": TOOLS, "parallel_tool_calls": False},
    }
    kwargs = cases[kind]
    with pytest.raises(openai.BadRequestError) as err:
        _oai(served).chat.completions.create(model=MOCK, messages=_ask("hi"), max_tokens=5, **kwargs)
    assert isinstance(err.value.body, dict) and err.value.body.get("param"), err.value.body


DIGITS: dict[str, Any] = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": 90,
    "maxItems": 90,
}


def _digits(oai: openai.OpenAI, i: int, on_chunk: Callable[[], None] | None = None) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in oai.completions.create(
        model="tiny-llama",
        prompt=f"List {i}:",
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"guided_json": DIGITS},
    ):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if on_chunk is not None:
            on_chunk()
    return text, finish


def test_a_guided_stream_migrated_mid_way_resumes_its_grammar(stack: Stack, tiny_llama_dir: Path) -> None:
    """kill -9 a worker mid-stream: the requests move to the other worker, whose grammar is advanced
    over the tokens already sent, so each client gets one valid document equal to an uninterrupted
    run (not a second document started inside the first)."""
    _, url = stack.frontend("--migration-limit", "3")
    victim = tiny_torch_worker(stack, tiny_llama_dir, ttl=2.0)
    tiny_torch_worker(stack, tiny_llama_dir, ttl=2.0)
    wait_instances(url, 2, timeout=60, model=TINY)
    oai = _oai(url)
    progress = StreamProgress()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_digits, oai, i, progress.counter(i)) for i in range(6)]
        wait_until(lambda: progress.all_past(6, 5), 60)
        victim.signal(signal.SIGKILL)
        results = [f.result() for f in futures]
    _, _, metrics = http("GET", url + "/metrics")
    migrated = [line for line in metrics.decode().splitlines() if line.startswith("turbine_migrations_total")]
    assert migrated and float(migrated[0].split()[-1]) > 0
    for text, finish in results:
        assert finish == "stop", text
        jsonschema_rs.validate(DIGITS, json.loads(text))
    wait_until(lambda: live_instances(url, "tiny-llama") == 1, 15)
    reference = [_digits(oai, i) for i in range(6)]
    assert results == reference
