"""A request's output constraint (`GuidedDecoding`) in an upstream server's own fields (pure).

Which server sits behind the sidecar is declared by `--upstream-guided-decoding` (the sidecar cannot
ask a server which constraint fields it reads: unknown fields are ignored, not refused, so a probe
would prove nothing). Each dialect names the constraint kinds it can express; the worker's card
lists them (`guided_capability`), so the frontend refuses the others with a 400 naming the field:

- `vllm`: `structured_outputs` with `json` (a schema object), `regex`, `choice`, `grammar` (what
  its backend reads: EBNF/GBNF for xgrammar, Lark for guidance).
- `sglang`: `json_schema` (the schema's JSON text), `regex`, `ebnf`; a choice becomes a regex of the
  escaped alternatives.
- `llama.cpp` (`llama-server`): `json_schema` (a schema object) and `grammar` (GBNF); a choice
  becomes a GBNF rule of the quoted alternatives; no regular expressions.
- `none`: the server constrains nothing.

Enforced tool choice reaches a server as a JSON schema: the frontend writes the tool-call markup
itself and constrains only the call's JSON object (`turbine/frontend/forced_calls.py`), so every
dialect with `json_schema` forces a call. Turbine's Lark grammars over the markup (a text reply
with at most one call) are read by no server: those need the full `guided_decoding` capability,
which upstreams never list.
"""

from __future__ import annotations

import json
from typing import Any

from turbine.errors import InvalidRequest
from turbine.protocol.model_card import guided_capability
from turbine.protocol.request import GuidedDecoding

_KINDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "vllm": ("json_schema", "regex", "choice", "grammar"),
    "sglang": ("json_schema", "regex", "choice", "grammar"),
    "llama.cpp": ("json_schema", "choice", "grammar"),
}

_REGEX_SPECIAL = set("\\.^$|?*+()[]{}/")


def guided_capabilities(dialect: str) -> tuple[str, ...]:
    """The card capabilities of a server of this dialect: one per constraint kind it expresses."""
    return tuple(guided_capability(kind) for kind in _KINDS[dialect])


def _regex_literal(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def _gbnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def guided_fields(guided: GuidedDecoding, dialect: str) -> dict[str, Any]:
    """The body fields that ask a `dialect` server for `guided`; `InvalidRequest` naming the field
    where it cannot (the frontend refuses those first, from the card)."""
    tool_grammar = guided.kind == "grammar" and guided.param in ("tool_choice", "parallel_tool_calls")
    if guided.kind not in _KINDS[dialect] or tool_grammar:
        raise InvalidRequest(
            f"{guided.param} is not supported by this model's upstream server ({dialect})",
            param=guided.param,
            code="unsupported_value",
        )
    kind, spec = guided.kind, guided.spec
    if dialect == "vllm":
        value: Any = json.loads(spec) if kind in ("json_schema", "choice") else spec
        return {"structured_outputs": {"json" if kind == "json_schema" else kind: value}}
    if dialect == "sglang":
        if kind == "choice":
            return {"regex": "(" + "|".join(_regex_literal(c) for c in json.loads(spec)) + ")"}
        return {{"json_schema": "json_schema", "regex": "regex", "grammar": "ebnf"}[kind]: spec}
    # llama.cpp
    if kind == "json_schema":
        return {"json_schema": json.loads(spec)}
    if kind == "choice":
        return {"grammar": "root ::= " + " | ".join(_gbnf_literal(c) for c in json.loads(spec))}
    return {"grammar": spec}
