"""A chat request's `tools` and `tool_choice`: validated as OpenAI does, then split into what the chat
template sees and what the frontend parses tool calls against.

- `none`: the model is not to call tools; its output is not parsed for calls. The tools still reach
  the template (the model knows they exist, as with OpenAI) unless the frontend runs with
  `--exclude-tools-when-tool-choice-none`.
- `auto` (the default when tools are given): tools reach the template, the output is parsed.
- `required` and a named function: as `auto` here (the named function must be one of the tools);
  the frontend then constrains decoding to calls (`frontend/guided.py`), or refuses the request
  where the model's engine cannot.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from turbine.errors import InvalidRequest

CHOICES = ("none", "auto", "required")


class ToolPlan(NamedTuple):
    # Given to the chat template as `tools` (None: no tools variable).
    template_tools: list[dict[str, Any]] | None
    # The tools the output's calls are parsed against; None: do not parse tool calls.
    parse_tools: list[dict[str, Any]] | None


def _tool_names(tools: list[dict[str, Any]]) -> list[str]:
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(name, str)
            or not name
        ):
            raise InvalidRequest(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}",
                param=f"tools[{i}]",
            )
        names.append(name)
    return names


def _named_choice(choice: dict[str, Any]) -> str:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str) or not name:
        raise InvalidRequest(
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    return name


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    *,
    exclude_when_none: bool,
) -> ToolPlan:
    names = _tool_names(tools) if tools else []
    if tool_choice is None:
        choice = "auto" if names else "none"
    elif isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise InvalidRequest(
                f"tool_choice {tool_choice!r} is not one of 'none', 'auto', 'required' or a function",
                param="tool_choice",
            )
        choice = tool_choice
    else:
        name = _named_choice(tool_choice)
        if name not in names:
            raise InvalidRequest(
                f"tool_choice names function {name!r}, which is not in tools", param="tool_choice"
            )
        choice = "named"
    if choice == "required" and not names:
        raise InvalidRequest("tool_choice 'required' needs at least one tool in tools", param="tool_choice")
    if choice == "none":
        return ToolPlan(None if exclude_when_none else tools, None)
    return ToolPlan(tools, tools if names else None)


def template_tool_calls(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` as chat templates expect them: OpenAI sends each call's
    `function.arguments` as JSON text, but templates written for `transformers` (Qwen, Llama, Mistral,
    Hermes) render it with `tojson`, which would quote the text again; so arguments that are a JSON
    object's text become that object (copies; anything else is passed as given)."""
    out = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                decoded = json.loads(arguments)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict):
                assert isinstance(function, dict)
                call = {**call, "function": {**function, "arguments": decoded}}
        out.append(call)
    return out
