"""Tool-call and reasoning parsing end to end: scripted workers (`--engine scripted`) write each format's
text as real tokens, the frontend parses it, and the official openai client reads it, stream and not.

One stack for the module: a model per parser (the worker's --tool-call-parser/--reasoning-parser,
carried in its card), a frontend with defaults, a second one with --exclude-tools-when-tool-choice-none
and --reasoning-field-name reasoning, and a third overriding every card with --tool-call-parser.
The model directory is the bundled tokenizer with a chat template that lists the request's tools
after the messages, and the script answers "case=NAME" prompts, so a reply can show what the
template received.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import tokenizers
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from tests.e2e.conftest import Stack, wait_instances
from turbine.models import bundled_model_path

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("output_parsers")]

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if tools %}TOOLS:{% for tool in tools %} {{ tool['function']['name'] }}{% endfor %}\\n{% endif %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SCRIPT: list[dict[str, str]] = [
    {"when": "case=probe<|im_end|>\nTOOLS: get_weather", "reply": "saw tools"},
    {"when": "case=probe", "reply": "no tools"},
    {"when": "case=hermes", "reply": "Let me check.\n" + HERMES_CALL},
    {"when": "case=two", "reply": HERMES_CALL + HERMES_CALL.replace("Paris", "Rome")},
    {
        "when": "case=malformed",
        "reply": 'Oops <tool_call>{"name": "get_weather", "arguments": {</tool_call> ok',
    },
    {"when": "case=think", "reply": "<think>The user wants weather.</think>Checking.\n" + HERMES_CALL},
    {
        "when": "case=llama3",
        "reply": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    },
    # `[TOOL_CALLS]` is a special token of the mistral model's tokenizer here, as in Mistral's own, and
    # the reply ends with the (special) end-of-turn token: the parser must see the one and not the other.
    {
        "when": "case=mistral",
        "reply": 'Calling.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]<|im_end|>',
    },
    {"when": "case=pythonic", "reply": '[get_weather(city="Paris")]'},
    {
        "when": "case=deepseek",
        "reply": "Need a tool.</think>Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
        'get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    },
    {
        "when": "case=coder",
        "reply": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
    },
    {
        "when": "case=gptoss",
        "reply": "<|channel|>analysis<|message|>Weather needed.<|end|><|start|>assistant"
        "<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>',
    },
]

TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]
PARIS = {"city": "Paris"}

# model name → worker flags
MODELS = {
    "m-hermes": ["--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"],
    "m-llama3": ["--tool-call-parser", "llama3_json"],
    "m-mistral": ["--tool-call-parser", "mistral"],  # on its own model directory, see `urls`
    "m-pythonic": ["--tool-call-parser", "pythonic"],
    "m-deepseek": ["--tool-call-parser", "deepseek_v3", "--reasoning-parser", "deepseek_r1"],
    "m-coder": ["--tool-call-parser", "qwen3_coder"],
    "m-gptoss": ["--tool-call-parser", "harmony", "--reasoning-parser", "gpt_oss"],
}


@dataclass
class Urls:
    default: str
    exclude: str  # --exclude-tools-when-tool-choice-none --reasoning-field-name reasoning
    override: str  # --tool-call-parser qwen3_coder, over every card's


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Urls]:
    root = Path(tmp_path_factory.mktemp("parsers"))
    model = root / "model"
    shutil.copytree(bundled_model_path(), model)
    (model / "chat_template.jinja").write_text(TEMPLATE)
    mistral = root / "model-mistral"
    shutil.copytree(model, mistral)
    tokenizer = tokenizers.Tokenizer.from_file(str(mistral / "tokenizer.json"))
    tokenizer.add_special_tokens([tokenizers.AddedToken("[TOOL_CALLS]", special=True)])
    tokenizer.save(str(mistral / "tokenizer.json"))
    script = root / "script.json"
    script.write_text(json.dumps(SCRIPT))
    stack = Stack(root)
    try:
        _, default = stack.frontend()
        _, exclude = stack.frontend(
            "--exclude-tools-when-tool-choice-none", "--reasoning-field-name", "reasoning"
        )
        _, override = stack.frontend("--tool-call-parser", "qwen3_coder")
        for name, flags in MODELS.items():
            stack.worker(
                "--engine", "scripted", "--script-file", str(script),
                "--model-path", str(mistral if name == "m-mistral" else model),
                "--model-name", name, *flags,
            )  # fmt: skip
        for name in MODELS:
            wait_instances(default, 1, model=name)
            wait_instances(exclude, 1, model=name)
        wait_instances(override, 1, model="m-llama3")
        yield Urls(default, exclude, override)
    finally:
        stack.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def complete(oai: openai.OpenAI, **kwargs: Any) -> ChatCompletion:
    result = oai.chat.completions.create(**kwargs)
    assert isinstance(result, ChatCompletion)
    return result


def functions(message: ChatCompletionMessage) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, name, arguments) of the message's tool calls."""
    out = []
    for call in message.tool_calls or []:
        assert isinstance(call, ChatCompletionMessageFunctionToolCall) and call.type == "function"
        out.append((call.id, call.function.name, json.loads(call.function.arguments)))
    return out


def ask(case: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"case={case}"}]


@dataclass
class Streamed:
    content: str = ""
    reasoning: str = ""
    pieces: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish: str | None = None


def stream(oai: openai.OpenAI, reasoning_field: str = "reasoning_content", **kwargs: Any) -> Streamed:
    out = Streamed()
    for chunk in oai.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                out.content += delta.content
                out.pieces.append(delta.content)
            extra = delta.model_extra or {}
            out.reasoning += extra.get(reasoning_field) or ""
            for call in delta.tool_calls or []:
                entry = out.calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                if call.id:
                    assert entry["id"] is None, "a call's id comes once, in its first chunk"
                    entry["id"] = call.id
                    # OpenAI's first chunk of a call: index, id, type, name and empty arguments.
                    assert call.type == "function"
                    assert call.function is not None and call.function.name
                    assert call.function.arguments == ""
                else:
                    assert entry["id"] is not None, "a call's first chunk carries its id"
                function = call.function
                if function is not None and function.name:
                    assert entry["arguments"] == "", "the name comes before the arguments"
                    entry["name"] += function.name
                if function is not None and function.arguments:
                    entry["arguments"] += function.arguments
            if choice.finish_reason is not None:
                out.finish = choice.finish_reason
    return out


def test_hermes_calls_with_content_stream_and_not(urls: Urls) -> None:
    oai = client(urls.default)
    chat = complete(oai, model="m-hermes", messages=ask("hermes"), tools=TOOLS)
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"
    [(call_id, name, arguments)] = functions(choice.message)
    assert call_id.startswith("call_") and (name, arguments) == ("get_weather", PARIS)

    streamed = stream(oai, model="m-hermes", messages=ask("hermes"), tools=TOOLS)
    assert streamed.finish == "tool_calls"
    assert streamed.content == "Let me check.\n"
    # The markup is held back while it might be a call: no content piece shows any of it.
    assert not any("<" in piece or "tool_call" in piece for piece in streamed.pieces)
    assert list(streamed.calls) == [0]
    assert streamed.calls[0]["name"] == "get_weather" and json.loads(streamed.calls[0]["arguments"]) == PARIS
    assert str(streamed.calls[0]["id"]).startswith("call_")


def test_two_calls_are_indexed_in_order(urls: Urls) -> None:
    oai = client(urls.default)
    chat = complete(oai, model="m-hermes", messages=ask("two"), tools=TOOLS, tool_choice="auto")
    assert [args["city"] for _, _, args in functions(chat.choices[0].message)] == ["Paris", "Rome"]
    assert chat.choices[0].message.content is None
    streamed = stream(oai, model="m-hermes", messages=ask("two"), tools=TOOLS)
    assert sorted(streamed.calls) == [0, 1]
    assert json.loads(streamed.calls[1]["arguments"]) == {"city": "Rome"}
    assert streamed.content == ""


def test_malformed_call_stays_text_and_tool_choice_none_or_no_tools_do_not_parse(urls: Urls) -> None:
    oai = client(urls.default)
    raw = next(r["reply"] for r in SCRIPT if r["when"] == "case=malformed")
    plain: list[dict[str, Any]] = [{"tools": TOOLS}, {}]
    for kwargs in plain:
        chat = complete(oai, model="m-hermes", messages=ask("malformed"), **kwargs)
        assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (raw, "stop")
        assert chat.choices[0].message.tool_calls is None
        streamed = stream(oai, model="m-hermes", messages=ask("malformed"), **kwargs)
        assert (streamed.content, streamed.finish, streamed.calls) == (raw, "stop", {})
    hermes = next(r["reply"] for r in SCRIPT if r["when"] == "case=hermes")
    unparsed: list[dict[str, Any]] = [{"tools": TOOLS, "tool_choice": "none"}, {}]
    for kwargs in unparsed:
        chat = complete(oai, model="m-hermes", messages=ask("hermes"), **kwargs)
        assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (hermes, "stop")


def test_enforced_tool_choice_on_an_engine_that_cannot_constrain_and_bad_tool_requests(urls: Urls) -> None:
    """The scripted engine cannot constrain its output: `required`, a named function (enforced tool
    choice) and `response_format` are 400s there, never served as `auto` / free text."""
    oai = client(urls.default)
    named = {"type": "function", "function": {"name": "get_weather"}}
    bad: list[dict[str, Any]] = [
        {"tools": TOOLS, "tool_choice": named},
        {"tools": TOOLS, "tool_choice": "required"},
        {"response_format": {"type": "json_object"}},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": "sometimes"},
        {"tools": [{"type": "function"}]},
    ]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as err:
            complete(oai, model="m-hermes", messages=ask("hermes"), **kwargs)
        assert err.value.status_code == 400
        assert isinstance(err.value.body, dict) and "param" in err.value.body  # OpenAI's error shape


def test_tools_reach_the_template_unless_excluded_for_tool_choice_none(urls: Urls) -> None:
    default, exclude = client(urls.default), client(urls.exclude)

    def reply(oai: openai.OpenAI, **kwargs: Any) -> str | None:
        return complete(oai, model="m-hermes", messages=ask("probe"), **kwargs).choices[0].message.content

    assert reply(default, tools=TOOLS) == "saw tools"
    assert reply(default, tools=TOOLS, tool_choice="none") == "saw tools"
    assert reply(default) == "no tools"
    assert reply(exclude, tools=TOOLS, tool_choice="none") == "no tools"
    assert reply(exclude, tools=TOOLS, tool_choice="auto") == "saw tools"


def test_reasoning_then_tool_calls_with_either_field_name(urls: Urls) -> None:
    for url, name in ((urls.default, "reasoning_content"), (urls.exclude, "reasoning")):
        oai = client(url)
        chat = complete(oai, model="m-hermes", messages=ask("think"), tools=TOOLS)
        message = chat.choices[0].message
        assert (message.model_extra or {}).get(name) == "The user wants weather."
        assert message.content == "Checking.\n"
        assert [name for _, name, _ in functions(message)] == ["get_weather"]
        streamed = stream(oai, reasoning_field=name, model="m-hermes", messages=ask("think"), tools=TOOLS)
        assert (streamed.reasoning, streamed.content, streamed.finish) == (
            "The user wants weather.",
            "Checking.\n",
            "tool_calls",
        )
        assert not any("<" in piece for piece in streamed.pieces)
    # Without tools, only the reasoning is split off; the call stays text.
    chat = complete(client(urls.default), model="m-hermes", messages=ask("think"))
    assert chat.choices[0].message.content == "Checking.\n" + HERMES_CALL


@pytest.mark.parametrize(
    ("model", "case", "content", "reasoning", "arguments"),
    [
        ("m-llama3", "llama3", None, "", PARIS),
        ("m-mistral", "mistral", "Calling.", "", PARIS),
        ("m-pythonic", "pythonic", None, "", PARIS),
        ("m-deepseek", "deepseek", "Sure.", "Need a tool.", PARIS),
        ("m-coder", "coder", None, "", {"city": "Paris", "days": 3}),
        ("m-gptoss", "gptoss", None, "Weather needed.", PARIS),
    ],
)
def test_each_parser_stream_and_not(
    urls: Urls, model: str, case: str, content: str | None, reasoning: str, arguments: dict[str, Any]
) -> None:
    oai = client(urls.default)
    chat = complete(oai, model=model, messages=ask(case), tools=TOOLS)
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == content
    assert (choice.message.model_extra or {}).get("reasoning_content", "") == reasoning
    assert [(name, args) for _, name, args in functions(choice.message)] == [("get_weather", arguments)]

    streamed = stream(oai, model=model, messages=ask(case), tools=TOOLS)
    assert (streamed.content, streamed.reasoning, streamed.finish) == (content or "", reasoning, "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.calls.values()] == [
        ("get_weather", arguments)
    ]


def test_a_frontend_parser_flag_overrides_the_cards(urls: Urls) -> None:
    # m-llama3's card says llama3_json; this frontend parses every model's calls as qwen3_coder.
    chat = complete(client(urls.override), model="m-llama3", messages=ask("coder"), tools=TOOLS)
    calls = [(name, args) for _, name, args in functions(chat.choices[0].message)]
    assert calls == [("get_weather", {"city": "Paris", "days": 3})]
    chat = complete(client(urls.default), model="m-llama3", messages=ask("coder"), tools=TOOLS)
    assert chat.choices[0].finish_reason == "stop" and chat.choices[0].message.tool_calls is None


def test_each_choice_has_its_own_parser(urls: Urls) -> None:
    oai = client(urls.default)
    chat = complete(oai, model="m-hermes", messages=ask("think"), tools=TOOLS, n=2)
    for choice in chat.choices:
        assert [(name, args) for _, name, args in functions(choice.message)] == [("get_weather", PARIS)]
        assert choice.message.content == "Checking.\n" and choice.finish_reason == "tool_calls"
    per_choice: dict[int, list[tuple[int, str | None]]] = {0: [], 1: []}
    for chunk in oai.chat.completions.create(
        model="m-hermes", messages=ask("think"), tools=TOOLS, n=2, stream=True
    ):
        for c in chunk.choices:
            per_choice[c.index] += [(call.index, call.id) for call in c.delta.tool_calls or []]
    for calls in per_choice.values():
        assert [index for index, _ in calls] == [0, 0]  # the opening chunk, then the arguments
        assert calls[0][1] is not None and calls[1][1] is None
    assert per_choice[0][0][1] != per_choice[1][0][1]
