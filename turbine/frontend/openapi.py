"""The frontend's HTTP routes as an OpenAPI 3.0 document, served at `GET /openapi.json`.

Hand-written to describe the routes as they are: request fields as `protocol/openai.py` decodes them,
ranges as the preprocessor validates them (cross-field rules such as `min_tokens <= max_tokens` and the
model's context length cannot be said in the schema; breaking them is a 400). Unknown request fields
are ignored by the server, so request objects allow additional properties.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from turbine.frontend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from turbine.preprocess.preprocessor import (
    CHAT_ROLES,
    MAX_BATCH_CHOICES,
    MAX_COMPLETION_LOGPROBS,
    MAX_N,
    MAX_TOP_LOGPROBS,
    SEED_MAX,
    SEED_MIN,
)

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json(_ref("Error"))}


_ERRORS = {
    "400": _error("Invalid request: malformed JSON, a wrong type, or a value out of range."),
    "404": _error("The model does not exist (no live worker serves it)."),
    "413": _error("The request body is larger than `--max-request-body-bytes`."),
    "503": _error("No live worker can take the request now; retry (see `Retry-After`)."),
}

_STOP = _nullable(
    {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}},
        ]
    }
)

# Fields shared by both generation routes (`protocol/openai.py: _Sampling`).
_SAMPLING: dict[str, Any] = {
    "model": {"type": "string", "description": "A model served by a live worker (see `/v1/models`)."},
    "max_tokens": _nullable({"type": "integer", "minimum": 1}),
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _nullable({"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1}),
    "seed": _nullable({"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX}),
    "stop": _STOP,
    "n": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_N}),
    "stream": _nullable({"type": "boolean", "default": False}),
    "stream_options": _nullable(
        {"type": "object", "properties": {"include_usage": {"type": "boolean", "default": False}}}
    ),
    "user": _nullable({"type": "string"}),
    "top_k": _nullable({"type": "integer", "minimum": -1, "description": "-1 or 0: disabled."}),
    "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "ignore_eos": {"type": "boolean", "default": False},
    "min_tokens": {"type": "integer", "minimum": 0, "default": 0},
    "stop_token_ids": _nullable(
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0},
            "description": "Ids below the vocab size.",
        }
    ),
    # Honoured by engines whose card lists them (the torch engine: all); others answer 400.
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "repetition_penalty": _nullable({"type": "number", "exclusiveMinimum": True, "minimum": 0}),
    "logit_bias": _nullable(
        {
            "type": "object",
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "description": "Token id (a string of digits) → bias added to its logit.",
        }
    ),
    "bad_words": _nullable({"type": "array", "items": {"type": "string", "minLength": 1}}),
    "allowed_token_ids": _nullable(
        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    ),
}

_CHAT_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": list(CHAT_ROLES)},
        "content": _nullable(
            {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "object"}},
                ]
            }
        ),
        "name": _nullable({"type": "string"}),
        "tool_calls": _nullable({"type": "array", "items": {"type": "object"}}),
        "tool_call_id": _nullable({"type": "string"}),
    },
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
        "tools": _nullable(
            {
                "type": "array",
                "items": {"type": "object"},
                "description": "Function tools `{type: function, function: {name, parameters}}`.",
            }
        ),
        "tool_choice": _nullable(
            {
                "description": "none, auto (default with tools), required, or a named function.",
                "oneOf": [
                    {"type": "string", "enum": ["none", "auto", "required"]},
                    {"type": "object"},
                ],
            }
        ),
        "parallel_tool_calls": _nullable({"type": "boolean"}),
        "chat_template_kwargs": _nullable({"type": "object"}),
        "response_format": _nullable(
            {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"type": "string", "enum": ["text", "json_object", "json_schema"]}},
                "description": "json_object and json_schema need an engine that enforces them (else 400).",
            }
        ),
        "logprobs": _nullable({"type": "boolean", "default": False}),
        "top_logprobs": _nullable(
            {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_TOP_LOGPROBS,
                "description": "Alternatives per token; needs `logprobs: true`.",
            }
        ),
    },
}

_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_SAMPLING,
        "prompt": {
            "description": "Text, token ids, or a batch of either (n choices per prompt).",
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_BATCH_CHOICES,
                    "items": {
                        "oneOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
                        ]
                    },
                },
            ],
        },
        "echo": {"type": "boolean", "enum": [False], "description": "`true` is not supported."},
        "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS}),
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}

_FINISH = {"type": "string", "nullable": True}

# `choices[i].logprobs`: null unless asked for and the engine computes them.
_TOP_LOGPROB_FIELDS: dict[str, Any] = {
    "token": {"type": "string"},
    "logprob": {"type": "number", "maximum": 0},
    "bytes": _nullable({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}),
}
_TOP_LOGPROB = {
    "type": "object",
    "required": ["token", "logprob", "bytes"],
    "properties": _TOP_LOGPROB_FIELDS,
}
_CHAT_LOGPROBS = _nullable(
    {
        "type": "object",
        "required": ["content"],
        "properties": {
            "content": _nullable(
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["token", "logprob", "bytes", "top_logprobs"],
                        "properties": {
                            **_TOP_LOGPROB_FIELDS,
                            "top_logprobs": {"type": "array", "items": _TOP_LOGPROB},
                        },
                    },
                }
            )
        },
    }
)
_COMPLETION_LOGPROBS = _nullable(
    {
        "type": "object",
        "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
        "properties": {
            "tokens": {"type": "array", "items": {"type": "string"}},
            "token_logprobs": {"type": "array", "items": {"type": "number", "maximum": 0}},
            "top_logprobs": {
                "type": "array",
                "items": {"type": "object", "additionalProperties": {"type": "number", "maximum": 0}},
            },
            "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        },
    }
)

_CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["chat.completion"]},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"},
                    "message": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {"type": "string"},
                            # null when the reply is only tool calls
                            "content": _nullable({"type": "string"}),
                            "tool_calls": {"type": "array", "items": {"type": "object"}},
                            "reasoning_content": {"type": "string"},
                        },
                    },
                    "logprobs": _CHAT_LOGPROBS,
                    "finish_reason": _FINISH,
                },
            },
        },
        "usage": _USAGE,
    },
}

_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["text_completion"]},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "text", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"},
                    "text": {"type": "string"},
                    "logprobs": _COMPLETION_LOGPROBS,
                    "finish_reason": _FINISH,
                },
            },
        },
        "usage": _USAGE,
    },
}

_MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["model"]},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}

_SSE = {
    "text/event-stream": {
        "schema": {
            "description": "With `stream: true`, one event per chunk (`data: {chunk}`), then `data: [DONE]`.",
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "string"}},
        }
    }
}


def _generation(summary: str, request: str, response: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(_ref(request))},
            "responses": {
                "200": {
                    "description": "The completion (JSON), or its chunks as server-sent events.",
                    "content": {**_json(_ref(response)), **_SSE},
                },
                **_ERRORS,
            },
        }
    }


def _get(summary: str, content: dict[str, Any], **errors: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {"summary": summary, "responses": {"200": {"description": "OK", "content": content}, **errors}}
    }


_STATUS_OBJECT = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "turbine frontend", "version": "0.1.0"},
    "paths": {
        "/v1/chat/completions": _generation(
            "Create a chat completion", "ChatCompletionRequest", "ChatCompletion"
        ),
        "/v1/completions": _generation("Create a text completion", "CompletionRequest", "Completion"),
        "/v1/models": _get(
            "List the models with a live worker",
            _json(
                {
                    "type": "object",
                    "required": ["object", "data"],
                    "properties": {
                        "object": {"type": "string", "enum": ["list"]},
                        "data": {"type": "array", "items": _ref("Model")},
                    },
                }
            ),
        ),
        "/v1/models/{model}": {
            **_get("Get one model", _json(_ref("Model")), **{"404": _ERRORS["404"]}),
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
        },
        "/health": _get(
            "Models and their live worker counts",
            _json(
                {
                    **_STATUS_OBJECT,
                    "properties": {
                        "status": {"type": "string", "enum": ["healthy", "no_workers"]},
                        "models": {"type": "object", "additionalProperties": {"type": "integer"}},
                    },
                }
            ),
        ),
        "/live": _get("Liveness", _json(_STATUS_OBJECT)),
        "/metrics": _get(
            "Prometheus metrics",
            {METRICS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
        ),
        "/openapi.json": _get("This document", _json({"type": "object"})),
    },
    "components": {
        "schemas": {
            "ChatMessage": _CHAT_MESSAGE,
            "ChatCompletionRequest": _CHAT_REQUEST,
            "CompletionRequest": _COMPLETION_REQUEST,
            "ChatCompletion": _CHAT_COMPLETION,
            "Completion": _COMPLETION,
            "Model": _MODEL,
            "Error": _ERROR,
        }
    },
}

SPEC_JSON: bytes = orjson.dumps(SPEC)


async def serve_openapi(request: web.Request) -> web.Response:
    """`GET /openapi.json`."""
    return web.Response(body=SPEC_JSON, content_type="application/json")
