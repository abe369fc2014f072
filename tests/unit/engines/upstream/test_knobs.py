"""Penalties, logit bias, bad words and allowed token ids reach an upstream server in its own
names (over real HTTP to the vLLM-like and llama-cpp-python-like test servers), and the engine's
card lists the knobs its settings declare."""

from __future__ import annotations

import pytest

from tests.unit.engines.upstream.test_engine import PROMPT, collect, engine_for, request, serving
from tests.unit.engines.upstream.vllm_like import VllmLike
from turbine.engines.upstream.guided import guided_capabilities
from turbine.engines.upstream.params import UPSTREAM_KNOBS
from turbine.protocol.request import GuidedDecoding, PreprocessedRequest, SamplingOptions, StopConditions

pytestmark = pytest.mark.integration

KNOBS = {
    "presence_penalty": 0.5,
    "frequency_penalty": -1.0,
    "repetition_penalty": 1.3,
    "logit_bias": ((7, 2.5), (9, -100.0)),
    "bad_words": ("zebra",),
    "bad_words_ids": ((1234,),),
    "allowed_token_ids": (5, 6, 7),
}


async def test_token_mode_sends_each_knob_in_the_servers_names() -> None:
    server = VllmLike()
    async with serving(server) as url, engine_for(url) as (engine, _):
        await collect(engine, request(3, **KNOBS))
        body = server.bodies[-1]
        assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, -1.0)
        # vLLM/SGLang's name, and llama.cpp's over the whole context.
        assert (body["repetition_penalty"], body["repeat_penalty"], body["repeat_last_n"]) == (1.3, 1.3, -1)
        assert body["logit_bias"] == {"7": 2.5, "9": -100.0}
        assert body["bad_words"] == ["zebra"] and body["allowed_token_ids"] == [5, 6, 7]
        await collect(engine, request(3))
        plain = server.bodies[-1]
        assert not set(plain) & {"presence_penalty", "repetition_penalty", "logit_bias", "bad_words"}
        assert engine.capacity().capabilities == UPSTREAM_KNOBS


async def test_text_mode_merges_the_bias_with_the_eos_ban() -> None:
    server = VllmLike(text_only=True)
    async with serving(server) as url, engine_for(url) as (engine, _):
        req = PreprocessedRequest(
            "r",
            "m",
            PROMPT,
            SamplingOptions(logit_bias=((7, 2.5),)),
            StopConditions(max_tokens=3, ignore_eos=True),
            eos_token_ids=(2,),
        )
        await collect(engine, req)
        assert server.bodies[-1]["logit_bias"] == {"7": 2.5, "2": -100}


async def test_a_constraint_reaches_a_vllm_server_and_its_kinds_are_on_the_card() -> None:
    server = VllmLike()
    async with serving(server) as url, engine_for(url, guided_decoding="vllm") as (engine, _):
        await collect(engine, request(3, guided=GuidedDecoding("regex", "[0-9]+", "guided_regex")))
        assert server.bodies[-1]["structured_outputs"] == {"regex": "[0-9]+"}
        assert engine.capacity().capabilities == (*UPSTREAM_KNOBS, *guided_capabilities("vllm"))
