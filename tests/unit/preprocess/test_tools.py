"""tools / tool_choice: OpenAI's validation, and what the template and the parser get."""

from __future__ import annotations

from typing import Any

import pytest

from turbine.errors import InvalidRequest
from turbine.preprocess.tools import ToolPlan, plan_tools

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
