"""A request's output constraint, settled in the frontend before any worker sees it.

Structured outputs (`turbine/preprocess/guided.py` reads every spelling) and enforced tool choice
(`required`, a named function, `parallel_tool_calls: false`; `postprocess/parsers/tool_grammar.py`
writes the grammar in the model's tool-call format) both become one `GuidedDecoding` in the
request's sampling options. Then:
- the model's card must list the "guided_decoding" capability, else 400 naming the field: an engine
  that cannot constrain its output must not answer free text to a client that asked for JSON. An
  engine that takes only some kinds (an upstream server, `guided_decoding:KIND`) serves structured
  outputs of those kinds, and a forced tool call when it takes JSON schemas (`forced_calls.py`);
- the grammar library must compile it, else 400 with the library's reason (checked here once, so a
  bad schema never reaches a worker's batch).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import msgspec

from turbine.errors import InvalidRequest
from turbine.frontend.forced_calls import prefilled
from turbine.frontend.pipeline import ModelPipeline
from turbine.postprocess.parsers.tool_grammar import FORCEABLE, ForcedCall, forced_call, tool_call_grammar
from turbine.preprocess.guided import structured_output
from turbine.preprocess.preprocessor import Prepared
from turbine.protocol.model_card import CAP_GUIDED_DECODING, guided_capability
from turbine.protocol.openai import ChatCompletionRequest, CompletionRequest
from turbine.protocol.request import GuidedDecoding


def _named(tool_choice: str | dict[str, Any] | None) -> str | None:
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        return name if isinstance(name, str) else None
    return None


def _tool_constraint(
    pipeline: ModelPipeline, req: ChatCompletionRequest
) -> tuple[GuidedDecoding, ForcedCall | None] | None:
    """The constraint `tool_choice` / `parallel_tool_calls` ask for, or None (`none`, no tools,
    `auto` with parallel calls): a grammar for an engine with the whole "guided_decoding"
    capability; for one that takes JSON schemas only, the forced call's schema with its markup (the
    frontend writes that). `tool_choice` itself was validated by the preprocessor."""
    parallel = req.parallel_tool_calls is not False
    auto = req.tool_choice in (None, "auto")
    if not req.tools or req.tool_choice == "none" or (auto and parallel):
        return None
    param = "parallel_tool_calls" if auto else "tool_choice"
    parser = pipeline.parsers.tool_call_parser
    only = _named(req.tool_choice)
    caps = pipeline.card.capabilities
    if CAP_GUIDED_DECODING not in caps and guided_capability("json_schema") in caps:
        if auto:
            raise InvalidRequest(
                f"parallel_tool_calls false with tool_choice 'auto' is not supported by model "
                f"'{pipeline.name}': its engine constrains its output to JSON schemas only, and text "
                "followed by at most one tool call is not one",
                param=param,
                code="unsupported_value",
            )
        call = forced_call(parser, req.tools, only=only)
        if call is None:
            raise _unforceable(pipeline, req, param)
        return GuidedDecoding("json_schema", json.dumps(call.schema), param), call
    _require_capability(pipeline, param)
    grammar = tool_call_grammar(parser, req.tools, only=only, parallel=parallel, optional=auto)
    if grammar is None:
        raise _unforceable(pipeline, req, param)
    return GuidedDecoding("grammar", grammar, param), None


def _unforceable(pipeline: ModelPipeline, req: ChatCompletionRequest, param: str) -> InvalidRequest:
    parser = pipeline.parsers.tool_call_parser
    what = "a named function" if _named(req.tool_choice) is not None else repr(req.tool_choice or "auto")
    if param == "parallel_tool_calls":
        what += " with parallel_tool_calls false"
    return InvalidRequest(
        f"tool_choice {what} cannot be enforced for model '{pipeline.name}': its tool-call format "
        f"({parser or 'none'}) has no grammar (enforceable: {', '.join(FORCEABLE)})",
        param=param,
        code="unsupported_value",
    )


def _require_capability(pipeline: ModelPipeline, param: str, kind: str | None = None) -> None:
    """`kind`: a structured output's kind, which an engine may support alone (an upstream server
    declares the kinds it takes); None (tool choice): the engine's own grammars are needed."""
    caps = pipeline.card.capabilities
    if CAP_GUIDED_DECODING not in caps and (kind is None or guided_capability(kind) not in caps):
        raise InvalidRequest(
            f"{param} is not supported by model '{pipeline.name}': its engine cannot constrain its output"
            + ("" if kind is None else f" to a {kind} constraint"),
            param=param,
            code="unsupported_value",
        )


def responses_format(text_format: object) -> dict[str, Any] | None:
    """The Responses API's `text.format` (flat: `{"type": "json_schema", "name", "schema",
    "strict"}`) as chat's `response_format`."""
    if not isinstance(text_format, dict):
        return None
    if text_format.get("type") != "json_schema":
        return text_format
    inner = {k: v for k, v in text_format.items() if k != "type"}
    return {"type": "json_schema", "json_schema": inner}


@functools.lru_cache(maxsize=256)
def _compile_error(guided: GuidedDecoding) -> str | None:
    """The library's reason `guided` does not compile, or None; remembered, since clients send the
    same schema again and again."""
    try:
        from turbine.engines.grammar import check
    except ImportError:  # a frontend without the grammar library: the worker checks it instead
        return None
    return check(guided)


def constrain(
    pipeline: ModelPipeline,
    req: ChatCompletionRequest | CompletionRequest,
    prepared: Prepared,
    *,
    format_param: str = "response_format",
) -> Prepared:
    """`prepared` with the request's output constraint, or an `InvalidRequest` naming the field
    (`format_param`: what the client called `response_format`)."""
    guided = structured_output(req, format_param)
    call: ForcedCall | None = None
    if isinstance(req, ChatCompletionRequest):
        tools = _tool_constraint(pipeline, req)
        if tools is not None and guided is not None:
            param = tools[0].param
            raise InvalidRequest(
                f"{param} {getattr(req, param)!r} cannot be combined with "
                f"{guided.param.split('.')[0]}: both constrain the whole output",
                param=param,
            )
        if tools is not None:
            guided, call = tools
    if guided is None:
        return prepared
    structured = guided.param not in ("tool_choice", "parallel_tool_calls")
    _require_capability(pipeline, guided.param, guided.kind if structured or call is not None else None)
    error = _compile_error(guided)
    if error is not None:
        raise InvalidRequest(f"{guided.param}: {error}", param=guided.param, code="invalid_value")
    request = prepared.request
    sampling = msgspec.structs.replace(request.sampling, guided=guided)
    request = msgspec.structs.replace(request, sampling=sampling)
    if call is not None:
        preprocessor = pipeline.preprocessor
        opening = preprocessor.tokenizer.encode(call.opening)
        request = prefilled(request, opening, preprocessor.context_length)
    named = (
        guided.param == "tool_choice" and isinstance(req, ChatCompletionRequest) and _named(req.tool_choice)
    )
    return prepared._replace(
        request=request,
        named_call=bool(named),
        forced_markup=None if call is None else (call.opening, call.closing),
    )
