"""tools / tool_choice: OpenAI's validation, and what the template and the parser get."""

from __future__ import annotations

from typing import Any

import pytest

from turbine.errors import InvalidRequest
from turbine.preprocess.chat_template import ChatTemplate
from turbine.preprocess.tools import ToolPlan, plan_tools, template_tool_calls

pytestmark = pytest.mark.unit

TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


def test_choices() -> None:
    assert plan_tools(TOOLS, None, exclude_when_none=False) == ToolPlan(TOOLS, TOOLS)
    assert plan_tools(TOOLS, "auto", exclude_when_none=True) == ToolPlan(TOOLS, TOOLS)
    assert plan_tools(TOOLS, "required", exclude_when_none=False) == ToolPlan(TOOLS, TOOLS)
    named = {"type": "function", "function": {"name": "f"}}
    assert plan_tools(TOOLS, named, exclude_when_none=False) == ToolPlan(TOOLS, TOOLS)
    assert plan_tools(TOOLS, "none", exclude_when_none=False) == ToolPlan(TOOLS, None)
    assert plan_tools(TOOLS, "none", exclude_when_none=True) == ToolPlan(None, None)
    assert plan_tools(None, None, exclude_when_none=False) == ToolPlan(None, None)
    assert plan_tools(None, "auto", exclude_when_none=False) == ToolPlan(None, None)


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (TOOLS, "always", "tool_choice"),
        (None, "required", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "g"}}, "tool_choice"),
        (TOOLS, {"type": "function"}, "tool_choice"),
        ([{"type": "function", "function": {}}], None, "tools[0]"),
        ([{"type": "code_interpreter"}], None, "tools[0]"),
        (["f"], None, "tools[0]"),
    ],
)
def test_bad_requests_are_400s_naming_the_parameter(tools: Any, choice: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        plan_tools(tools, choice, exclude_when_none=False)
    assert err.value.param == param and err.value.http_status == 400


def test_history_tool_call_arguments_reach_templates_as_objects() -> None:
    calls: list[dict[str, Any]] = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        {"id": "c", "type": "function", "function": {"name": "h", "arguments": {"y": 2}}},
    ]
    out = template_tool_calls(calls)
    assert [c["function"]["arguments"] for c in out] == [{"x": 1}, "not json", {"y": 2}]
    assert calls[0]["function"]["arguments"] == '{"x": 1}'  # the request is not changed
    # A template in the style of Qwen2.5's renders the call once, not as a quoted string.
    template = ChatTemplate(
        "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}"
        "{% endfor %}{% endfor %}"
    )
    assert template.render([{"role": "assistant", "content": None, "tool_calls": out[:1]}]) == '{"x": 1}'
