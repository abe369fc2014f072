"""The upstream sidecar end to end: `turbine worker --engine openai` in front of vLLM-like servers
(real HTTP servers with vLLM's API, metrics and ZMQ KV events: tests/unit/engines/upstream/
vllm_like.py), and `turbine frontend --upstream MODEL=URL`, driven through the `openai` client."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import Proc, Stack, free_port, http, wait_instances, wait_until
from turbine.models import bundled_model_path

pytestmark = pytest.mark.e2e

SERVED = "served-model"  # the name the vLLM-like server reports in /v1/models


class Upstream:
    def __init__(self, proc: Proc, port: int, events: str, replay: str) -> None:
        self.proc, self.url, self.events, self.replay = proc, f"http://127.0.0.1:{port}", events, replay

    def running(self) -> int:
        status, _, body = http("GET", self.url + "/metrics", timeout=2)
        line = next(x for x in body.decode().splitlines() if x.startswith("vllm:num_requests_running"))
        return int(float(line.split()[-1])) if status == 200 else -1


@pytest.fixture
def upstreams(stack: Stack) -> Callable[..., list[Upstream]]:
    """Start `count` servers at once (process start-up dominates these tests), then wait for all."""

    def start(count: int, *args: str) -> list[Upstream]:
        ups = []
        for _ in range(count):
            port = free_port()
            events, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
            argv = [sys.executable, "-m", "tests.unit.engines.upstream.vllm_like", "--port", str(port)]
            argv += ["--kv-events", events, "--kv-replay", replay, *args]
            ups.append(Upstream(stack._start("upstream", argv), port, events, replay))
        for up in ups:
            wait_until(lambda u=up: http("GET", u.url + "/v1/models", timeout=1)[0] == 200, 20, up.proc)
        return ups

    return start


def sidecar(stack: Stack, ups: list[Upstream], *args: str, events: bool = True) -> Proc:
    argv = ["--engine", "openai", "--block-size", "16", "--upstream-poll-interval-s", "0.2", *args]
    for up in ups:
        argv += ["--upstream-url", up.url]
        if events:
            argv += ["--kv-events-endpoint", up.events, "--kv-replay-endpoint", up.replay]
    return stack.worker(*argv, ttl=2.0)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def cached_tokens(oai: openai.OpenAI, prompt: str) -> int:
    out = oai.completions.create(model=SERVED, prompt=prompt, max_tokens=2)
    assert out.usage is not None and out.usage.prompt_tokens_details is not None
    return out.usage.prompt_tokens_details.cached_tokens or 0


def group_prompts(groups: int) -> Iterator[tuple[str, str]]:
    for g in range(groups):
        prefix = f"Group {g}: " + " ".join(f"word{g}x{i}" for i in range(60))
        yield prefix + " first question?", prefix + " second question?"


def test_kv_routing_from_the_engines_own_events(
    stack: Stack, upstreams: Callable[..., list[Upstream]]
) -> None:
    """Two servers hashing blocks with their own random seeds: the sidecar re-keys their events,
    and the second request of each shared-prefix group goes where the first one's blocks are."""
    ups = upstreams(2)
    sidecar(stack, ups)  # no --model-path: model and tokenizer from the servers' /v1/models root
    frontend, url = stack.frontend("--router-mode", "kv", "--kv-cache-block-size", "16")
    wait_instances(url, 2, model=SERVED)
    oai = client(url)
    pairs = list(group_prompts(6))
    for first, _ in pairs:
        assert cached_tokens(oai, first) == 0
    # A frontend started now has no routing history: it places by the events (through the dump).
    frontend.stop()
    _, url = stack.frontend("--router-mode", "kv", "--kv-cache-block-size", "16")
    wait_instances(url, 2, model=SERVED)
    oai = client(url)
    hits = [cached_tokens(oai, second) for _, second in pairs]
    assert all(h >= 48 for h in hits), hits  # the shared prefix (>= 3 blocks of 16) was cached


def test_frontend_upstreams_chat_and_a_stream_moved_when_its_server_dies(
    stack: Stack, upstreams: Callable[..., list[Upstream]]
) -> None:
    """`turbine frontend --upstream MODEL=URL` (the sidecar inside the frontend): chat and streams
    work, and a server killed mid-stream hands the stream to the other one (--migration-limit)."""
    ups = upstreams(2, "--token-delay-s", "0.03")
    args = ["--model-path", str(bundled_model_path()), "--migration-limit", "2"]
    for up in ups:
        args += ["--upstream", f"tiny={up.url}"]
    _, url = stack.frontend(*args)
    wait_instances(url, 2, model="tiny")
    oai = client(url)
    chat = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi there"}], max_tokens=5
    )
    assert chat.choices[0].message.content and chat.usage is not None
    assert chat.usage.completion_tokens == 5
    prompt = "Tell a long story about a lighthouse keeper"
    stream = oai.completions.create(model="tiny", prompt=prompt, max_tokens=60, stream=True)
    text = ""
    killed = False
    for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        if not killed and len(text) > 10:
            victim = next(u for u in ups if u.running() == 1)
            victim.proc.signal(signal.SIGKILL)
            killed = True
    assert killed
    # Generation is a function of the context: the migrated text equals an uninterrupted run's.
    whole = oai.completions.create(model="tiny", prompt=prompt, max_tokens=60)
    assert text == whole.choices[0].text


def test_unreachable_upstream_answers_503_until_it_comes(stack: Stack, tmp_path: Path) -> None:
    """Also: the upstream comes from --upstream-file."""
    port = free_port()
    listing = tmp_path / "upstreams.txt"
    listing.write_text(f"# model=url, one per line\n\ntiny=http://127.0.0.1:{port}  # the only one\n")
    frontend, url = stack.frontend("--model-path", str(bundled_model_path()), "--upstream-file", str(listing))
    wait_instances(url, 1, model="tiny")
    oai = client(url)
    with pytest.raises(openai.APIStatusError) as info:
        oai.completions.create(model="tiny", prompt="hello", max_tokens=2)
    assert info.value.status_code == 503
    assert info.value.response.headers.get("retry-after") == "1"
    wait_until(lambda: "retrying with backoff" in frontend.log(), 10)
    # The server comes up on that port: the sidecar notices (its backoff is at most a few seconds).
    argv = [sys.executable, "-m", "tests.unit.engines.upstream.vllm_like", "--port", str(port)]
    up = stack._start("upstream", argv)
    wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/v1/models", timeout=1)[0] == 200, 20, up)

    def answers() -> bool:
        try:
            return bool(oai.completions.create(model="tiny", prompt="hello", max_tokens=2).choices[0].text)
        except openai.APIStatusError:
            return False

    wait_until(answers, 20, interval=0.2)
