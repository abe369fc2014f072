"""Structured outputs in each upstream server's own fields, the card capabilities of each dialect,
and the GGUF tokenizer directory the sidecar builds for `--model-path FILE.gguf`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from turbine.choices import GUIDED_DIALECTS
from turbine.engines.upstream.guided import guided_capabilities, guided_fields
from turbine.engines.upstream.params import Mode, completion_body
from turbine.errors import ConfigError, InvalidRequest
from turbine.models import bundled_model_path
from turbine.preprocess.tokenizer import load_model_files
from turbine.protocol.request import GuidedDecoding, PreprocessedRequest, SamplingOptions, StopConditions

pytestmark = pytest.mark.unit

SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
CHOICES = ["yes", 'a "quoted" one', "x.y|z"]


def test_vllm_takes_every_kind_in_structured_outputs() -> None:
    assert guided_fields(GuidedDecoding("json_schema", SCHEMA), "vllm") == {
        "structured_outputs": {"json": json.loads(SCHEMA)}
    }
    assert guided_fields(GuidedDecoding("regex", "[a-z]+"), "vllm") == {
        "structured_outputs": {"regex": "[a-z]+"}
    }
    assert guided_fields(GuidedDecoding("choice", json.dumps(CHOICES)), "vllm") == {
        "structured_outputs": {"choice": CHOICES}
    }
    assert guided_fields(GuidedDecoding("grammar", 'root ::= "a"'), "vllm") == {
        "structured_outputs": {"grammar": 'root ::= "a"'}
    }


def test_sglang_takes_schema_text_regex_and_ebnf() -> None:
    assert guided_fields(GuidedDecoding("json_schema", SCHEMA), "sglang") == {"json_schema": SCHEMA}
    assert guided_fields(GuidedDecoding("grammar", 'root ::= "a"'), "sglang") == {"ebnf": 'root ::= "a"'}
    regex = guided_fields(GuidedDecoding("choice", json.dumps(CHOICES)), "sglang")["regex"]
    # The alternatives match themselves exactly, and nothing else.
    assert all(re.fullmatch(regex, c) for c in CHOICES)
    assert not re.fullmatch(regex, "xay|z") and not re.fullmatch(regex, "x.y")


def test_llama_cpp_takes_a_schema_object_and_gbnf_but_no_regex() -> None:
    assert guided_fields(GuidedDecoding("json_schema", SCHEMA), "llama.cpp") == {
        "json_schema": json.loads(SCHEMA)
    }
    gbnf = guided_fields(GuidedDecoding("choice", json.dumps(CHOICES)), "llama.cpp")["grammar"]
    assert gbnf == 'root ::= "yes" | "a \\"quoted\\" one" | "x.y|z"'
    with pytest.raises(InvalidRequest) as err:
        guided_fields(GuidedDecoding("regex", "[a-z]+", "guided_regex"), "llama.cpp")
    assert err.value.param == "guided_regex"


@pytest.mark.parametrize("dialect", GUIDED_DIALECTS)
def test_tool_grammars_and_unlisted_kinds_are_refused(dialect: str) -> None:
    with pytest.raises(InvalidRequest):  # Turbine's Lark tool-call grammars are read by no server
        guided_fields(GuidedDecoding("grammar", "start: x", "tool_choice"), dialect)
    kinds = {cap.split(":", 1)[1] for cap in guided_capabilities(dialect)}
    for kind in {"json_schema", "regex", "choice", "grammar"} - kinds:
        with pytest.raises(InvalidRequest):
            guided_fields(GuidedDecoding(kind, json.dumps(["a"])), dialect)
    # A forced call's JSON schema goes as any schema does.
    forced = GuidedDecoding("json_schema", SCHEMA, "tool_choice")
    if "json_schema" in kinds:
        assert guided_fields(forced, dialect) == guided_fields(GuidedDecoding("json_schema", SCHEMA), dialect)
    else:
        with pytest.raises(InvalidRequest):
            guided_fields(forced, dialect)


def test_capabilities_per_dialect() -> None:
    assert guided_capabilities("none") == ()
    assert guided_capabilities("llama.cpp") == (
        "guided_decoding:json_schema",
        "guided_decoding:choice",
        "guided_decoding:grammar",
    )
    assert len(guided_capabilities("vllm")) == 4


def test_the_completion_body_carries_the_constraint() -> None:
    tokenizer = load_model_files(bundled_model_path()).tokenizer
    guided = GuidedDecoding("json_schema", SCHEMA)
    req = PreprocessedRequest("r", "m", [1, 2], SamplingOptions(guided=guided), StopConditions(max_tokens=3))
    body = completion_body(req, mode=Mode.TOKEN, model="m", tokenizer=tokenizer, guided_dialect="llama.cpp")
    assert body["json_schema"] == json.loads(SCHEMA)
    plain = PreprocessedRequest("r", "m", [1, 2], SamplingOptions(), StopConditions(max_tokens=3))
    body = completion_body(plain, mode=Mode.TOKEN, model="m", tokenizer=tokenizer, guided_dialect="llama.cpp")
    assert not {"json_schema", "grammar", "structured_outputs"} & set(body)


def test_a_file_that_is_not_gguf_is_a_config_error(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from turbine.engines.upstream.gguf_files import tokenizer_dir

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match=r"bad\.gguf"):
        tokenizer_dir(bad, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"gone\.gguf"):
        tokenizer_dir(tmp_path / "gone.gguf", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written is left
