"""ScriptedEngine: streams a reply written in advance, as the model's own tokens.

For testing what the frontend does with a model's text (tool-call and reasoning parsers, stop strings,
streaming) through real processes, without a model: the reply is tokenized with the model's tokenizer
and streamed one token per step, so a marker splits across deltas exactly as it would from a model.

`--script-file FILE` is either a plain text file (the reply to every request) or a `.json` list of
rules `{"when": "...", "reply": "..."}`: the first rule whose `when` occurs in the decoded prompt
(special tokens included) gives the reply; a rule without `when` always matches; no match is a reply
of nothing (finish "stop"). Deterministic: the same prompt always gets the same tokens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import NamedTuple

import tokenizers

from turbine.engines.base import EngineCapacity
from turbine.errors import ConfigError
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.response import EngineOutput, FinishReason


class ScriptRule(NamedTuple):
    when: str | None
    reply: str


def load_script(path: Path) -> list[ScriptRule]:
    """The rules of a script file; ConfigError if a .json file is not a list of rules."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return [ScriptRule(None, text)]
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--script-file {path}: not JSON: {exc}") from None
    if not isinstance(raw, list):
        raise ConfigError(f"--script-file {path}: expected a list of {{'when', 'reply'}} rules")
    rules = []
    for i, item in enumerate(raw):
        when = item.get("when") if isinstance(item, dict) else None
        reply = item.get("reply") if isinstance(item, dict) else None
        if not isinstance(reply, str) or not (when is None or isinstance(when, str)):
            raise ConfigError(f"--script-file {path}: rule {i} needs a string 'reply' (and 'when', if any)")
        rules.append(ScriptRule(when, reply))
    return rules


class ScriptedEngine:
    """Replies from a script (see the module docstring). Holds no KV cache (`cached_tokens` 0)."""

    def __init__(
        self, rules: list[ScriptRule], tokenizer: tokenizers.Tokenizer, block_size: int = 64
    ) -> None:
        self._rules = rules
        self._tokenizer = tokenizer
        self._block_size = block_size
        # Each rule's reply, tokenized once.
        self._ids = [tokenizer.encode(rule.reply, add_special_tokens=False).ids for rule in rules]

    def capacity(self) -> EngineCapacity:
        return EngineCapacity(kv_block_size=self._block_size)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def reply_ids(self, prompt_ids: list[int]) -> list[int]:
        prompt = self._tokenizer.decode(prompt_ids, skip_special_tokens=False)
        for rule, ids in zip(self._rules, self._ids, strict=True):
            if rule.when is None or rule.when in prompt:
                return ids
        return []

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        reply = self.reply_ids(request.token_ids)
        max_tokens = request.stop.max_tokens
        for i, token in enumerate(reply[:max_tokens], start=1):
            # One token per step, yielding to the loop so that streams interleave as a model's would.
            await asyncio.sleep(0)
            if i == max_tokens and i < len(reply):
                yield EngineOutput(token_ids=[token], finish_reason=FinishReason.LENGTH, cached_tokens=0)
                return
            if i == len(reply):
                yield EngineOutput(token_ids=[token], finish_reason=FinishReason.STOP, cached_tokens=0)
                return
            yield EngineOutput(token_ids=[token])
        yield EngineOutput(finish_reason=FinishReason.STOP, cached_tokens=0)
