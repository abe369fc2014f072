"""ScriptedEngine: a reply from the script as the model's tokens, chosen by the prompt, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from turbine.engines.scripted import ScriptedEngine, ScriptRule, load_script
from turbine.errors import ConfigError
from turbine.models import bundled_model_path
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import EngineOutput, FinishReason

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(bundled_model_path() / "tokenizer.json"))


def _request(tok: tokenizers.Tokenizer, prompt: str, max_tokens: int = 100) -> PreprocessedRequest:
    ids = tok.encode(prompt, add_special_tokens=False).ids
    return PreprocessedRequest("r", "m", ids, SamplingOptions(), StopConditions(max_tokens=max_tokens))


async def _run(engine: ScriptedEngine, request: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


async def test_rules_pick_the_reply_by_prompt_and_stream_it_token_by_token(tok: tokenizers.Tokenizer) -> None:
    engine = ScriptedEngine([ScriptRule("weather", "<tool_call>{}</tool_call>"), ScriptRule(None, "Hi")], tok)
    outs = await _run(engine, _request(tok, "<|im_start|>user\nthe weather?<|im_end|>"))
    assert all(len(o.token_ids) == 1 for o in outs) and len(outs) > 3
    assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
    assert outs[-1].finish_reason is FinishReason.STOP
    assert tok.decode([t for o in outs for t in o.token_ids]) == "<tool_call>{}</tool_call>"
    other = await _run(engine, _request(tok, "hello"))
    assert tok.decode([t for o in other for t in o.token_ids]) == "Hi"


async def test_max_tokens_cuts_with_length_and_no_match_is_an_empty_reply(tok: tokenizers.Tokenizer) -> None:
    engine = ScriptedEngine([ScriptRule("x", "one two three four five")], tok)
    outs = await _run(engine, _request(tok, "x", max_tokens=2))
    assert [len(o.token_ids) for o in outs] == [1, 1] and outs[-1].finish_reason is FinishReason.LENGTH
    assert await _run(engine, _request(tok, "nothing")) == [
        EngineOutput(finish_reason=FinishReason.STOP, cached_tokens=0)
    ]


def test_script_files(tmp_path: Path) -> None:
    text = tmp_path / "reply.txt"
    text.write_text("hello\n")
    assert load_script(text) == [ScriptRule(None, "hello\n")]
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"when": "a", "reply": "b"}, {"reply": "c"}]))
    assert load_script(rules) == [ScriptRule("a", "b"), ScriptRule(None, "c")]
    for bad in ('{"reply": "x"}', "[{}]", '[{"when": 1, "reply": "x"}]', "not json"):
        rules.write_text(bad)
        with pytest.raises(ConfigError):
            load_script(rules)
