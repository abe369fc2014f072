"""ChatTemplate: HF apply_chat_template semantics in a sandbox, errors mapped onto our error tree."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from turbine.errors import ConfigError, InvalidRequest
from turbine.models import bundled_model_path
from turbine.preprocess.chat_template import ChatTemplate

pytestmark = pytest.mark.unit


def _tiny_template() -> ChatTemplate:
    config = json.loads((bundled_model_path() / "tokenizer_config.json").read_text(encoding="utf-8"))
    return ChatTemplate(config["chat_template"], bos_token=None, eos_token="<|im_end|>")


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def test_chatml_render_with_generation_prompt() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        _user("Hi"),
        {"role": "assistant", "content": "Yo"},
    ]
    assert _tiny_template().render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chatml_render_without_generation_prompt() -> None:
    rendered = _tiny_template().render([_user("Hi")], add_generation_prompt=False)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n"


def test_text_parts_are_joined_and_input_is_not_mutated() -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    messages = [_user(parts)]
    rendered = _tiny_template().render(messages, add_generation_prompt=False)
    assert rendered == "<|im_start|>user\none\ntwo<|im_end|>\n"
    assert messages[0]["content"] is parts


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "image_url", "image_url": {"url": "http://x"}}],
        [{"type": "text", "text": "ok"}, {"type": "input_audio"}],
        [{"type": "text", "text": 3}],
        ["bare string part"],
        42,
    ],
)
def test_unsupported_content_is_invalid_request(content: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        _tiny_template().render([_user("fine"), _user(content)])
    assert info.value.param is not None and info.value.param.startswith("messages[1]")


def test_message_that_is_not_an_object_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        _tiny_template().render(["hello"])  # type: ignore[list-item]


def test_syntax_error_is_config_error() -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m }}")


def test_unknown_filter_is_config_error() -> None:
    with pytest.raises(ConfigError):
        ChatTemplate("{{ messages | no_such_filter }}")


def test_raise_exception_becomes_invalid_request_with_template_message() -> None:
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}"
        "{% endif %}ok"
    )
    assert template.render([_user("x")]) == "ok"
    with pytest.raises(InvalidRequest, match=r"^Conversation must start with user$"):
        template.render([{"role": "assistant", "content": "x"}])


def test_undefined_error_is_invalid_request() -> None:
    template = ChatTemplate("{{ messages[0]['missing'].strip() }}")
    with pytest.raises(InvalidRequest, match="UndefinedError"):
        template.render([_user("x")])


def test_python_error_in_template_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="TypeError"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([_user("x")])


def test_null_content_reaches_the_template_as_an_empty_string() -> None:
    # An assistant turn that only calls tools, under a template that concatenates the content.
    template = _tiny_template()
    with_null = template.render([{"role": "assistant", "content": None}], add_generation_prompt=False)
    assert with_null == template.render([{"role": "assistant", "content": ""}], add_generation_prompt=False)


def test_sandbox_blocks_mutation_and_internals() -> None:
    with pytest.raises(InvalidRequest, match="SecurityError"):
        ChatTemplate("{{ messages.append(1) }}").render([_user("x")])
    with pytest.raises(InvalidRequest, match="SecurityError"):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([_user("x")])


def test_tojson_is_plain_json_with_hf_options() -> None:
    value = {"b": "<tag> & 'quote' ü", "a": [1, 2]}
    assert ChatTemplate("{{ v | tojson }}").render([], v=value) == json.dumps(value, ensure_ascii=False)
    assert ChatTemplate("{{ v | tojson(indent=2) }}").render([], v=value) == json.dumps(
        value, ensure_ascii=False, indent=2
    )
    compact = ChatTemplate("{{ v | tojson(separators=(',', ':'), sort_keys=true) }}").render([], v=value)
    assert compact == '{"a":[1,2],"b":"<tag> & \'quote\' ü"}'
    assert ChatTemplate("{{ v | tojson(ensure_ascii=true) }}").render([], v="ü") == '"\\u00fc"'


def test_strftime_now() -> None:
    template = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}")
    before = datetime.now().strftime("%Y-%m-%d")
    rendered = template.render([])
    after = datetime.now().strftime("%Y-%m-%d")
    assert rendered in {before, after}  # either side of midnight


def test_trim_and_lstrip_blocks() -> None:
    source = (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "[{{ m.content }}]\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    )
    rendered = ChatTemplate(source).render([_user("a"), {"role": "system", "content": "s"}, _user("b")])
    assert rendered == "[a]\n[b]\n"


def test_loop_controls() -> None:
    source = (
        "{% for m in messages %}{% if loop.index == 2 %}{% continue %}{% endif %}{{ m.content }}{% endfor %}"
    )
    assert ChatTemplate(source).render([_user("a"), _user("b"), _user("c")]) == "ac"
    source = (
        "{% for m in messages %}{% if m.content == 'b' %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    )
    assert ChatTemplate(source).render([_user("a"), _user("b"), _user("c")]) == "a"


def test_generation_tag_renders_its_body() -> None:
    source = "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    assert ChatTemplate(source).render([_user("a"), _user("b")]) == "<a><b>"


def test_special_tokens_and_missing_bos() -> None:
    source = "[{{ bos_token }}]{{ messages[0].content }}[{{ eos_token }}]"
    assert ChatTemplate(source, bos_token="<s>", eos_token="</s>").render([_user("x")]) == "[<s>]x[</s>]"
    assert ChatTemplate(source, bos_token=None, eos_token="</s>").render([_user("x")]) == "[]x[</s>]"


def test_tools_and_extra_variables_reach_the_template() -> None:
    source = (
        "{% if tools is not none %}{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
        "{% if documents is none %}no-docs{% endif %}"
        "{% if enable_thinking is defined and not enable_thinking %} no-think{% endif %}"
        "{% if add_generation_prompt %} gen{% endif %}"
    )
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    template = ChatTemplate(source)
    assert template.render([]) == "no-docs gen"
    rendered = template.render([], tools=[tool], enable_thinking=False, add_generation_prompt=False)
    assert rendered == json.dumps(tool, ensure_ascii=False) + "\nno-docs no-think"


QWEN_STYLE_TOOLS = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}You are helpful.{%- endif %}
{{- '\\n\\n# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for call in message.tool_calls | default([]) %}
{{- '\\n<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' }}
{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def test_realistic_tool_template() -> None:
    tool = {"type": "function", "function": {"name": "now", "parameters": {}}}
    messages: list[dict[str, Any]] = [
        _user("time?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "now", "arguments": {"tz": "UTC"}}}],
        },
    ]
    rendered = ChatTemplate(QWEN_STYLE_TOOLS).render(messages, tools=[tool])
    assert rendered == (
        "<|im_start|>system\nYou are helpful.\n\n# Tools\n<tools>\n"
        '{"type": "function", "function": {"name": "now", "parameters": {}}}\n</tools><|im_end|>\n'
        "<|im_start|>user\ntime?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "now", "arguments": {"tz": "UTC"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>assistant\n"
    )


def test_globals_macros_and_overrides_render_as_with_jinja_render() -> None:
    """Rendering bypasses `Template.render` (globals are merged once, not per request): the output
    must still be what jinja's own `render` gives, globals, macros and namespaces included."""
    source = (
        "{% macro tag(r) %}[{{ r | upper }}]{% endmacro %}"
        "{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ tag(m['role']) }}{{ m['content'] }}"
        "{% for i in range(2) %}.{% endfor %}{% endfor %}"
        "{{ ns.n }}|{{ strftime_now('%Y') }}|{{ bos_token }}|{{ flag | default('none') }}"
        "{% if add_generation_prompt %}{{ tag('assistant') }}{% endif %}"
    )
    template = ChatTemplate(source, bos_token="<s>")
    messages = [{"role": "system", "content": "S"}, _user("U")]
    reference = template._template.render(
        {"messages": messages, "add_generation_prompt": True, "bos_token": "<s>", "tools": None, "flag": 7}
    )
    assert template.render(messages, flag=7) == reference
    assert reference.startswith("[SYSTEM]S..[USER]U..2|") and reference.endswith("|<s>|7[ASSISTANT]")
    # A request's variable wins over a global of the same name, as with `render`.
    assert ChatTemplate("{{ strftime_now }}").render([], strftime_now="mine") == "mine"
