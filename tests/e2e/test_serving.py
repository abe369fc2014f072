"""Frontend + worker processes with file discovery, driven by the official openai client."""

from __future__ import annotations

import collections
import concurrent.futures
import shutil
import signal
import time
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import MODEL, Stack, live_instances, metric_sum, wait_instances, wait_until
from turbine.models import bundled_model_path

pytestmark = pytest.mark.e2e

FAST = ("--engine", "mocker", "--speedup-ratio", "1000")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_chat_and_completions_stream_and_not(stack: Stack) -> None:
    _, url = stack.frontend()
    stack.worker(*FAST, "--num-workers", "2")
    wait_instances(url, 2)
    oai = client(url)

    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")

    chat = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12
    )
    assert chat.object == "chat.completion"
    assert chat.id.startswith("chatcmpl-")
    assert chat.choices[0].finish_reason == "length"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == 12
    assert chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 12

    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=12,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    # Same seed, same tokens: the non-streamed answer with that seed has the same text.
    again = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, seed=7
    )
    assert again.choices[0].message.content == text

    comp = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert comp.object == "text_completion"
    assert comp.choices[0].finish_reason == "length"
    assert comp.usage is not None and comp.usage.completion_tokens == 8
    streamed = list(oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True))
    assert streamed[-1].choices[0].finish_reason == "length"
    assert all(c.object == "text_completion" for c in streamed)


def test_prefix_cache_hits_are_reported_as_cached_tokens(stack: Stack) -> None:
    _, url = stack.frontend()
    stack.worker(*FAST, "--block-size", "16")
    wait_instances(url, 1)
    oai = client(url)
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    first = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    second = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None and second.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == (second.usage.prompt_tokens // 16) * 16 and cached > 0


def test_stop_strings_are_never_emitted(stack: Stack) -> None:
    _, url = stack.frontend()
    stack.worker("--engine", "echo")
    wait_instances(url, 1)
    oai = client(url)
    # The echo engine repeats the prompt, so the stop string is certain to be generated.
    out = oai.completions.create(model=MODEL, prompt="alpha beta STOP gamma", max_tokens=50, stop=["STOP"])
    assert out.choices[0].text == "alpha beta "
    assert out.choices[0].finish_reason == "stop"
    chunks = list(
        oai.completions.create(
            model=MODEL, prompt="alpha beta STOP gamma", max_tokens=50, stop="STOP", stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == "alpha beta "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_multibyte_text_streams_whole_through_the_byte_level_detokenizer(stack: Stack) -> None:
    """The bundled tokenizer is byte-level, so the frontend detokenizes through its `ByteLevelTable`:
    emoji and CJK split over byte tokens must arrive whole, streamed token by token or not."""
    _, url = stack.frontend()
    stack.worker("--engine", "echo")
    wait_instances(url, 1)
    oai = client(url)
    prompt = "party 🎉🎉 日本語のテキスト naïve café 👍🏽 done"
    whole = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=200)
    assert whole.choices[0].text == prompt
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=200, stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == prompt
    assert all("\ufffd" not in t for t in texts)  # no half character ever went out
    assert len(texts) > 1  # streamed in several deltas, not one


def test_round_robin_spreads_requests_evenly(stack: Stack) -> None:
    _, url = stack.frontend("--router-mode", "round-robin")
    stack.worker(*FAST, "--num-workers", "3")
    wait_instances(url, 3)
    oai = client(url)
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(30):
        raw = oai.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=1)
        seen[raw.headers["x-turbine-worker"]] += 1
    assert sorted(seen.values()) == [10, 10, 10]


def test_random_router_uses_every_worker(stack: Stack) -> None:
    _, url = stack.frontend("--router-mode", "random")
    stack.worker(*FAST, "--num-workers", "2")
    wait_instances(url, 2)
    oai = client(url)
    seen = {
        oai.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=1).headers[
            "x-turbine-worker"
        ]
        for _ in range(40)
    }
    assert len(seen) == 2


def test_killed_worker_leaves_after_its_lease_and_requests_keep_succeeding(stack: Stack) -> None:
    _, url = stack.frontend()
    victim = stack.worker(*FAST, ttl=1.5)
    stack.worker(*FAST, ttl=1.5)
    wait_instances(url, 2)
    oai = client(url)
    victim.signal(signal.SIGKILL)
    victim.wait(5)
    killed_at = time.monotonic()
    # Every request succeeds, including those routed while the dead worker is still registered.
    while live_instances(url) != 1:
        out = oai.completions.create(model=MODEL, prompt="still there?", max_tokens=3)
        assert out.choices[0].finish_reason == "length"
        assert time.monotonic() - killed_at < 10, "the dead worker never left discovery"
    assert [m.id for m in oai.models.list().data] == [MODEL]
    for _ in range(5):
        assert oai.completions.create(model=MODEL, prompt="x", max_tokens=2).usage is not None


def test_model_disappears_when_its_last_worker_goes(stack: Stack) -> None:
    _, url = stack.frontend()
    worker = stack.worker(*FAST)
    wait_instances(url, 1)
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    wait_until(lambda: live_instances(url) == 0, 10)
    oai = client(url)
    assert oai.models.list().data == []
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model=MODEL, prompt="x", max_tokens=2)


def test_sigterm_worker_mid_stream_finishes_the_stream(stack: Stack) -> None:
    _, url = stack.frontend()
    # ~100 tokens at ~10 ms each: a stream that lasts about a second.
    worker = stack.worker("--engine", "mocker", "--speedup-ratio", "1")
    wait_instances(url, 1)
    oai = client(url)
    stream = oai.completions.create(
        model=MODEL,
        prompt="tell me a long story",
        max_tokens=100,
        stream=True,
        extra_body={"ignore_eos": True},
        stream_options={"include_usage": True},
    )
    chunks = [next(stream)]
    worker.signal(signal.SIGTERM)
    chunks += list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 100
    assert worker.wait(15) == 0
    wait_until(lambda: live_instances(url) == 0, 10)


def test_sigterm_frontend_drains_and_exits_zero(stack: Stack) -> None:
    frontend, url = stack.frontend()
    stack.worker("--engine", "mocker", "--speedup-ratio", "1")
    wait_instances(url, 1)
    oai = client(url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            lambda: oai.completions.create(
                model=MODEL, prompt="drain me", max_tokens=100, extra_body={"ignore_eos": True}
            )
        )
        wait_until(lambda: metric_sum(url, "turbine_inflight_requests") == 1, 10)  # it is being served
        frontend.signal(signal.SIGTERM)
        result = pending.result(20)
    assert result.choices[0].finish_reason == "length"
    assert frontend.wait(15) == 0


def test_any_local_model_directory_serves_under_its_name(stack: Stack, tmp_path: Path) -> None:
    model_dir = tmp_path / "my-org-model"
    shutil.copytree(bundled_model_path(), model_dir)
    _, url = stack.frontend("--model-path", str(model_dir))
    stack.worker(*FAST, "--model-path", str(model_dir))
    wait_instances(url, 1, model="my-org-model")
    oai = client(url)
    assert [m.id for m in oai.models.list().data] == ["my-org-model"]
    out = oai.chat.completions.create(
        model="my-org-model",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=4,
    )
    assert out.model == "my-org-model" and out.usage is not None and out.usage.completion_tokens == 4


def test_n_choices_fan_out_stream_and_not(stack: Stack) -> None:
    _, url = stack.frontend()
    stack.worker(*FAST, "--num-workers", "2")
    wait_instances(url, 2)
    oai = client(url)
    out = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Pick a word"}], max_tokens=6, n=3, seed=11
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) == 3  # each choice samples with its own seed
    assert out.usage is not None and out.usage.completion_tokens == 18
    again = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Pick a word"}], max_tokens=6, n=3, seed=11
    )
    assert [c.message.content for c in again.choices] == texts

    chunks = list(
        oai.completions.create(model=MODEL, prompt="Pick a word", max_tokens=5, n=2, stream=True, seed=3)
    )
    by_index: dict[int, str] = collections.defaultdict(str)
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            by_index[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and by_index[0] and by_index[1]
