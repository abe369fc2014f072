"""Parser names → parsers, and the marker strings each needs to see in the model's text.

Names follow vLLM's and Dynamo's `--tool-call-parser` / `--reasoning-parser` values, so a deployment
moves over with the same flags. The tables are read-only (`MappingProxyType`).
"""

from __future__ import annotations

import secrets
import string
import uuid
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, NamedTuple

from turbine.postprocess.parsers import (
    deepseek_v3,
    gpt_oss,
    harmony,
    hermes,
    llama3_json,
    mistral,
    pythonic,
    qwen3_coder,
    think,
)
from turbine.postprocess.parsers.base import ReasoningParser, ToolCallParser

Tools = list[dict[str, Any]]


def openai_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


_ALNUM = string.ascii_letters + string.digits


def mistral_call_id() -> str:
    """Mistral's chat templates accept only ids of 9 alphanumeric characters in the next turn."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


class ToolFormat(NamedTuple):
    # Builds one choice's parser; qwen3_coder reads the request's tool schemas to type arguments.
    make: Callable[[Tools | None], ToolCallParser]
    # Strings the parser looks for: where a model's tokenizer has one as a special token, the
    # frontend must keep special tokens in the text (see `special_tokens.py`).
    markers: tuple[str, ...]
    # The id each parsed call gets: the model's own template must accept it in the next turn.
    call_id: Callable[[], str] = openai_call_id


class ReasoningFormat(NamedTuple):
    make: Callable[[], ReasoningParser]
    markers: tuple[str, ...]


_DEEPSEEK = (
    deepseek_v3.CALLS_BEGIN,
    deepseek_v3.CALLS_END,
    deepseek_v3.CALL_BEGIN,
    deepseek_v3.CALL_END,
    deepseek_v3.SEP,
)
_HARMONY = ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|return|>", "<|call|>")
_THINK = (think.START, think.END)

TOOL_CALL_FORMATS: MappingProxyType[str, ToolFormat] = MappingProxyType(
    {
        "hermes": ToolFormat(hermes.make_parser, (hermes.START, hermes.END)),
        "llama3_json": ToolFormat(llama3_json.make_parser, (llama3_json.PYTHON_TAG,)),
        "mistral": ToolFormat(
            mistral.make_parser, (mistral.START, mistral.ARGS, mistral.CALL_ID), mistral_call_id
        ),
        "pythonic": ToolFormat(pythonic.make_parser, (pythonic.PYTHON_START, pythonic.PYTHON_END)),
        "deepseek_v3": ToolFormat(deepseek_v3.make_parser, _DEEPSEEK),
        "deepseek_v3_1": ToolFormat(deepseek_v3.make_parser, _DEEPSEEK),
        "qwen3_coder": ToolFormat(qwen3_coder.make_parser, (qwen3_coder.START, qwen3_coder.END)),
        "harmony": ToolFormat(harmony.make_parser, _HARMONY),
    }
)

REASONING_FORMATS: MappingProxyType[str, ReasoningFormat] = MappingProxyType(
    {
        "basic": ReasoningFormat(think.basic, _THINK),
        "qwen3": ReasoningFormat(think.basic, _THINK),
        "deepseek_r1": ReasoningFormat(think.deepseek_r1, _THINK),
        "gpt_oss": ReasoningFormat(gpt_oss.HarmonyReasoningParser, _HARMONY),
    }
)
