"""Penalties, logit bias, batched completion prompts and the field census, through the `openai`
client over HTTP: a frontend with a tiny torch worker (which honours every knob) and an echo worker
(which honours none of them, so the frontend refuses them for its model)."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import tokenizers

from tests.e2e.conftest import TINY, Stack, tiny_torch_worker, wait_instances
from turbine.protocol.openai import UNBUILT_CHAT, UNBUILT_COMPLETION, ChatCompletionRequest, CompletionRequest
from turbine.protocol.request import SAMPLING_KNOBS

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("sampling_knobs")]

ECHO = "echo-model"
PROMPT = "Story: once upon a time"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[str]:
    """One frontend and its two workers for the whole module (started once: the tests only read)."""
    stack = Stack(tmp_path_factory.mktemp("sampling-knobs"))
    try:
        yield _start(stack, tiny_llama_dir)
    finally:
        stack.stop()


def _start(stack: Stack, tiny_llama_dir: Path) -> str:
    _, url = stack.frontend()
    tiny_torch_worker(stack, tiny_llama_dir)
    stack.worker("--engine", "echo", "--model-name", ECHO)
    wait_instances(url, 1, timeout=60, model=TINY)
    wait_instances(url, 1, timeout=20, model=ECHO)
    return url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _tokens(oai: openai.OpenAI, max_tokens: int = 30, **extra: Any) -> list[str]:
    """The generated tokens' texts (from logprobs), greedy."""
    out = oai.completions.create(
        model=TINY,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True, **extra},
    )
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    return logprobs.tokens


def _ids_reading(tok: tokenizers.Tokenizer, text: str) -> list[int]:
    """Every token id whose text is `text`."""
    return [i for i in range(tok.get_vocab_size()) if tok.decode([i]) == text]


def _repeats(tokens: list[str]) -> int:
    return len(tokens) - len(set(tokens))


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict), body
    inner = body.get("error", body)
    assert isinstance(inner, dict)
    return inner


def test_bias_and_penalties_move_greedy_output(served: str, tiny_llama_dir: Path) -> None:
    oai = _client(served)
    tok = tokenizers.Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    plain = _tokens(oai)
    # -100 on the most common generated token (every id that reads as it): it never appears.
    common = collections.Counter(plain).most_common(1)[0][0]
    ids = _ids_reading(tok, common)
    assert ids
    banned = _tokens(oai, logit_bias={str(i): -100 for i in ids})
    assert common not in banned and banned != plain
    # +100 on a token: every generated token is that one, in every choice.
    forced_id = 1234
    out = oai.completions.create(
        model=TINY,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0.8,
        seed=5,
        n=2,
        logit_bias={str(forced_id): 100},
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in out.choices] == [tok.decode([forced_id] * 10)] * 2
    # The random model rarely repeats on its own; +3 on its first three tokens makes it loop on
    # them. frequency_penalty 2 lowers the repeated-token count; so do presence and repetition.
    lure = {str(i): 3 for t in plain[:3] for i in _ids_reading(tok, t)}
    looping = _tokens(oai, logit_bias=lure)
    assert _repeats(looping) > 10
    for knob in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
        penalised = _tokens(oai, logit_bias=lure, **{knob: 2})
        assert _repeats(penalised) < _repeats(looping), (knob, looping, penalised)
    # allowed_token_ids and bad_words through chat, streamed.
    allowed = [i for letter in "abc" for i in _ids_reading(tok, letter)]
    assert len(allowed) >= 3
    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in oai.chat.completions.create(
            model=TINY,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True, "allowed_token_ids": allowed},
        )
        if chunk.choices
    )
    assert text and set(text) <= {"a", "b", "c"}, text
    # A bad word: its token is never generated.
    word = next(t for t in plain if t.strip().isalpha())
    assert word not in _tokens(oai, bad_words=[word.strip()])


def test_out_of_range_knobs_are_400s_in_openai_wording(served: str) -> None:
    oai = _client(served)
    cases: list[tuple[dict[str, Any], str, str]] = [
        (
            {"presence_penalty": 5},
            "presence_penalty",
            "Invalid 'presence_penalty': decimal above maximum value. Expected a value <= 2, but got 5 "
            "instead.",
        ),
        (
            {"frequency_penalty": -2.5},
            "frequency_penalty",
            "Invalid 'frequency_penalty': decimal below minimum value. Expected a value >= -2, but got "
            "-2.5 instead.",
        ),
        ({"repetition_penalty": 0}, "repetition_penalty", "Expected a value > 0"),
        (
            {"logit_bias": {"abc": 1}},
            "logit_bias",
            "Invalid key in 'logit_bias': abc. You should only be submitting non-negative integers.",
        ),
        ({"logit_bias": {"5": 200}}, "logit_bias", "[-100, 100]"),
        ({"allowed_token_ids": [10**7]}, "allowed_token_ids", "allowed_token_ids"),
        ({"bad_words": [" "]}, "bad_words", "bad_words"),
        ({"best_of": 3}, "best_of", "'best_of' is not supported"),
        ({"suffix": "tail"}, "suffix", "'suffix' is not supported"),
    ]
    for body, param, message in cases:
        with pytest.raises(openai.BadRequestError) as info:
            oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=2, extra_body=body)
        err = _error(info.value)
        assert err["param"] == param and message in err["message"], (body, err)
    # best_of equal to n asks for nothing more: served.
    assert oai.completions.create(model=TINY, prompt=PROMPT, max_tokens=2, extra_body={"best_of": 1}).choices


def test_an_engine_without_the_knobs_refuses_them(served: str) -> None:
    oai = _client(served)
    for knob, value in (
        ("presence_penalty", 1.0),
        ("frequency_penalty", 0.5),
        ("repetition_penalty", 1.1),
        ("logit_bias", {"5": 3}),
        ("bad_words", ["word"]),
        ("allowed_token_ids", [5, 6]),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(
                model=ECHO,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                extra_body={knob: value},
            )
        err = _error(info.value)
        assert err["param"] == knob and err["code"] == "unsupported_parameter", err
    # Values that ask for nothing are fine there.
    out = oai.chat.completions.create(
        model=ECHO,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
    )
    assert out.choices[0].message.content


def test_batched_completion_prompts_stream_and_not(served: str, tiny_llama_dir: Path) -> None:
    oai = _client(served)
    prompts = ["The cat", "A dog ran", "Numbers: 1 2 3"]

    def single(prompt: str | list[int]) -> str:
        out = oai.completions.create(
            model=TINY, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        return out.choices[0].text

    alone = [single(p) for p in prompts]
    out = oai.completions.create(
        model=TINY, prompt=prompts, max_tokens=6, temperature=0, n=2, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text for c in out.choices] == [a for a in alone for _ in range(2)]
    tok = tokenizers.Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    prompt_tokens = sum(len(tok.encode(p, add_special_tokens=False).ids) for p in prompts)
    assert out.usage is not None and out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 36
    texts: dict[int, str] = collections.defaultdict(str)
    finishes: dict[int, str] = {}
    for chunk in oai.completions.create(
        model=TINY,
        prompt=prompts,
        max_tokens=6,
        temperature=0,
        n=2,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(6)] == [c.text for c in out.choices]
    assert finishes == {i: "length" for i in range(6)}
    # Token id lists, one choice each.
    id_prompts = [tok.encode(p, add_special_tokens=False).ids for p in prompts[:2]]
    by_ids = oai.completions.create(
        model=TINY, prompt=id_prompts, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.text for c in by_ids.choices] == [single(ids) for ids in id_prompts]
    for bad in ([], [""], ["a", [1, 2]], [[1], []]):
        with pytest.raises(openai.BadRequestError) as info:
            oai.completions.create(model=TINY, prompt=bad, max_tokens=2)  # type: ignore[arg-type]
        assert _error(info.value)["param"] == "prompt"


# ---- the field census ----------------------------------------------------------------------------

# vLLM's documented extra request fields (its OpenAI-compatible server's "extra parameters").
VLLM_CHAT_EXTRAS = [
    "best_of",
    "use_beam_search",
    "top_k",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "prompt_logprobs",
    "allowed_token_ids",
    "bad_words",
    "echo",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "documents",
    "chat_template",
    "chat_template_kwargs",
    "mm_processor_kwargs",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structural_tag",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "priority",
    "request_id",
    "logits_processors",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "cache_salt",
    "kv_transfer_params",
    "vllm_xargs",
]
VLLM_COMPLETION_EXTRAS = [
    "use_beam_search",
    "top_k",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "allowed_token_ids",
    "prompt_logprobs",
    "add_special_tokens",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "priority",
    "request_id",
    "logits_processors",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "cache_salt",
    "kv_transfer_params",
    "vllm_xargs",
    "bad_words",
]

# A value for each field that asks for something (not a no-op), valid in shape.
SAMPLE: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"},
    "frequency_penalty": 0.5,
    "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
    "logit_bias": {"5": 1.5},
    "logprobs": True,
    "max_completion_tokens": 3,
    "max_tokens": 3,
    "metadata": {"k": "v"},
    "modalities": ["text", "audio"],
    "moderation": {"mode": "block"},
    "n": 2,
    "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "x"},
    "presence_penalty": 0.5,
    "prompt_cache_key": "k",
    "prompt_cache_options": {"ttl": "1h"},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "low",
    "response_format": {"type": "json_object"},
    "safety_identifier": "someone",
    "seed": 3,
    "service_tier": "flex",
    "stop": ["zzz"],
    "store": True,
    "stream_options": {"include_usage": True},
    "temperature": 0.5,
    "tool_choice": "auto",
    "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ],
    "top_logprobs": 2,
    "top_p": 0.9,
    "user": "u1",
    "verbosity": "low",
    "web_search_options": {},
    "best_of": 3,
    "echo": True,
    "suffix": "tail",
    "use_beam_search": True,
    "top_k": 5,
    "min_p": 0.1,
    "repetition_penalty": 1.2,
    "length_penalty": 0.5,
    "stop_token_ids": [7],
    "include_stop_str_in_output": True,
    "ignore_eos": True,
    "min_tokens": 1,
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
    "truncate_prompt_tokens": 5,
    "prompt_logprobs": 1,
    "allowed_token_ids": [5, 6, 7],
    "bad_words": ["zebra"],
    "add_generation_prompt": False,
    "continue_final_message": True,
    "add_special_tokens": "flip",
    "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": False},
    "mm_processor_kwargs": {"a": 1},
    "structured_outputs": {"regex": "a+"},
    "guided_json": {"type": "object"},
    "guided_regex": "a+",
    "guided_choice": ["a", "b"],
    "guided_grammar": 'root ::= "a"',
    "structural_tag": "{}",
    "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": " ",
    "priority": 1,
    "request_id": "mine",
    "logits_processors": ["x"],
    "return_tokens_as_token_ids": True,
    "return_token_ids": True,
    "cache_salt": "salt",
    "kv_transfer_params": {"a": 1},
    "vllm_xargs": {"a": 1},
}
# Fields whose honouring other tests prove (routing hints, sampling, logprobs, tools, stop, n, ...).
HONOURED = {
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n", "user",
    "stream_options", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "chat_template_kwargs", "min_p", "ignore_eos", "min_tokens", "stop_token_ids", "top_k",
    "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", *SAMPLING_KNOBS,
}  # fmt: skip


def _openai_fields(module: Any) -> set[str]:
    params = module.CompletionCreateParamsBase
    return set(params.__required_keys__ | params.__optional_keys__)


def _adjusted(field: str, value: Any, *, chat: bool) -> Any:
    if field == "add_special_tokens":
        return chat  # the opposite of each endpoint's default
    if field == "logprobs" and not chat:
        return 1  # legacy completions: the number of alternatives
    return value


@pytest.mark.timeout(180)
def test_every_request_field_is_honoured_or_refused_by_name(served: str) -> None:
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    chat_fields = _openai_fields(chat_create_params) | set(VLLM_CHAT_EXTRAS)
    completion_fields = _openai_fields(completion_create_params) | set(VLLM_COMPLETION_EXTRAS)
    # Nothing is silently dropped: every field is decoded (msgspec drops only unknown ones).
    declared_chat = set(ChatCompletionRequest.__struct_fields__)
    declared_completion = set(CompletionRequest.__struct_fields__)
    assert chat_fields - declared_chat == set()
    assert completion_fields - declared_completion == set()
    oai = _client(served)
    skip = {"model", "messages", "prompt", "stream"}
    for chat, fields in ((True, chat_fields), (False, completion_fields)):
        unbuilt = UNBUILT_CHAT if chat else UNBUILT_COMPLETION
        for field in sorted(fields - skip):
            assert field in SAMPLE, f"new request field {field!r}: give it a sample value here"
            value = _adjusted(field, SAMPLE[field], chat=chat)
            for model in (TINY, ECHO):
                outcome = _send(oai, model, chat, field, value)
                where = f"{'chat' if chat else 'completions'} {model} {field}={value!r}"
                if outcome is None:
                    assert field in HONOURED, f"{where}: accepted, yet not known to be honoured"
                    assert field not in unbuilt, where
                else:
                    assert outcome["param"] == field or outcome["param"].startswith(field), (where, outcome)
                    assert field in outcome["message"], (where, outcome)
                if field in SAMPLING_KNOBS:
                    assert (outcome is None) == (model == TINY), (where, outcome)
                if field in unbuilt or field in ("best_of", "suffix"):
                    assert outcome is not None and outcome["code"] == "unsupported_parameter", (
                        where,
                        outcome,
                    )


def _send(oai: openai.OpenAI, model: str, chat: bool, field: str, value: Any) -> dict[str, Any] | None:
    """None when served; the error object of a 400."""
    body: dict[str, Any] = {field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    if field == "tool_choice":
        body["tools"] = SAMPLE["tools"]
    try:
        if chat:
            oai.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, extra_body=body
            )
        else:
            oai.completions.create(model=model, prompt="hi", max_tokens=3, extra_body=body)
    except openai.BadRequestError as exc:
        return _error(exc)
    return None
