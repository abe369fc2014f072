"""The torch engine behind a real frontend, driven by the official `openai` client: a real model
(SmolLM2) answering, KV-aware routing on real caches, migration between torch workers, bad input."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam

from tests.conftest import TINY_LLAMA_CONTEXT
from tests.e2e.conftest import (
    SMALL_KV,
    TINY,
    Stack,
    StreamProgress,
    http,
    live_instances,
    tiny_torch_worker,
    wait_instances,
    wait_until,
)

pytestmark = pytest.mark.e2e

SMOLLM2 = "SmolLM2-135M-Instruct"


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.timeout(300)
def test_smollm2_answers_through_the_openai_client(
    stack: Stack, smollm2_gguf: Path, gguf_cache: Path, smollm2_dir: Path
) -> None:
    _, url = stack.frontend()
    # float32: the cached-prefix rerun below must give the same greedy text as the first run.
    worker = stack.worker(
        "--engine",
        "torch",
        "--model-path",
        str(smollm2_gguf),
        "--gguf-cache-dir",
        str(gguf_cache),
        "--dtype",
        "float32",
        *SMALL_KV,
        # The output parsers on a real model's text: only what parses becomes a call, no markup leaks.
        "--tool-call-parser",
        "hermes",
        "--reasoning-parser",
        "basic",
    )
    # Not ready while the worker loads its weights (it registers only once it can serve).
    status, _, body = http("GET", url + "/health")
    assert status == 503 and json.loads(body)["status"] == "no_workers", body
    wait_until(lambda: live_instances(url, SMOLLM2) == 1, 120, worker)
    assert http("GET", url + "/health")[0] == 200
    oai = _client(url)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the capital of France?"}
    ]
    out = oai.chat.completions.create(model=SMOLLM2, messages=messages, temperature=0)
    text = out.choices[0].message.content or ""
    assert "Paris" in text and out.choices[0].finish_reason == "stop", text
    chunks = oai.chat.completions.create(
        model=SMOLLM2,
        messages=messages,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    usage = streamed[-1].usage
    assert usage is not None and usage.completion_tokens == out.usage.completion_tokens  # type: ignore[union-attr]
    weather: ChatCompletionFunctionToolParam = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
    tooled = oai.chat.completions.create(
        model=SMOLLM2, messages=ask, tools=[weather], temperature=0, max_tokens=60
    )
    choice = tooled.choices[0]
    assert "<tool_call>" not in (choice.message.content or "") and "<think>" not in (
        choice.message.content or ""
    )
    for call in choice.message.tool_calls or []:
        assert call.type == "function"
        json.loads(call.function.arguments)
    expected = ("tool_calls",) if choice.message.tool_calls else ("stop", "length")
    assert choice.finish_reason in expected, tooled
    # A prompt of more than one 64-token block, twice: the second finds its full blocks cached.
    system = "You are a geography tutor. " + "Answer briefly, in one sentence, and be accurate. " * 12
    long: list[ChatCompletionMessageParam] = [{"role": "system", "content": system}, *messages]
    first = oai.chat.completions.create(model=SMOLLM2, messages=long, max_tokens=8, temperature=0)
    again = oai.chat.completions.create(model=SMOLLM2, messages=long, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    details = again.usage.prompt_tokens_details  # type: ignore[union-attr]
    assert details is not None and (details.cached_tokens or 0) >= 64


@pytest.mark.timeout(300)
def test_smollm2_in_bfloat16_answers_with_its_4bit_weights(
    stack: Stack, smollm2_gguf: Path, gguf_cache: Path, smollm2_dir: Path
) -> None:
    """The CPU's decode steps on the file's Q4_1 blocks (`--q4-max-rows`), prefill on the dequantized
    weights: the same right answer, streamed and not."""
    _, url = stack.frontend()
    worker = stack.worker(
        "--engine", "torch", "--model-path", str(smollm2_gguf), "--gguf-cache-dir", str(gguf_cache),
        "--device", "cpu", "--dtype", "bfloat16", "--q4-max-rows", "8", *SMALL_KV,
    )  # fmt: skip
    wait_until(lambda: live_instances(url, SMOLLM2) == 1, 120, worker)
    assert "use the 4-bit weights" in worker.log()
    oai = _client(url)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the capital of France?"}
    ]
    out = oai.chat.completions.create(model=SMOLLM2, messages=messages, temperature=0, max_tokens=24)
    text = out.choices[0].message.content or ""
    assert "Paris" in text, text
    streamed = oai.chat.completions.create(
        model=SMOLLM2, messages=messages, temperature=0, max_tokens=24, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_smollm2_answers_concurrent_requests_through_turbines_amx_kernel(
    stack: Stack, smollm2_gguf: Path, gguf_cache: Path, smollm2_dir: Path
) -> None:
    """`--cpu-kernels turbine`: decode steps of 4-8 rows run the 4-bit weights on Turbine's own AMX
    kernel (`csrc/cpu_q4.cpp`); eight concurrent greedy requests all get the right answer."""
    from turbine.engines.torch import cpu_kernels

    try:
        cpu_kernels.load()
    except cpu_kernels.KernelsUnavailable as exc:
        pytest.skip(f"Turbine's CPU kernels cannot run here: {exc}")
    _, url = stack.frontend()
    worker = stack.worker(
        "--engine", "torch", "--model-path", str(smollm2_gguf), "--gguf-cache-dir", str(gguf_cache),
        "--device", "cpu", "--dtype", "bfloat16", "--q4-max-rows", "16", "--cpu-kernels", "turbine",
        *SMALL_KV,
    )  # fmt: skip
    wait_until(lambda: live_instances(url, SMOLLM2) == 1, 120, worker)
    assert "Turbine's AMX kernel" in worker.log()
    oai = _client(url)
    questions = [
        "What is the capital of France?",
        "Which city is the capital of France?",
        "Tell me the capital of France.",
        "Name the capital of France.",
    ] * 2

    def ask(question: str) -> str:
        out = oai.chat.completions.create(
            model=SMOLLM2, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
        )
        return out.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, questions))
    assert all("Paris" in a for a in answers), answers


def test_kv_events_from_torch_workers_route_each_group_to_its_holder(
    stack: Stack, tiny_llama_dir: Path
) -> None:
    _, url = stack.frontend("--router-mode", "kv", "--kv-cache-block-size", "16")
    tiny_torch_worker(stack, tiny_llama_dir)
    tiny_torch_worker(stack, tiny_llama_dir)
    wait_instances(url, 2, timeout=60, model=TINY)
    oai = _client(url)
    holders: set[str] = set()
    for group in range(4):
        prefix = f"Group {group} shares this system prompt: " + " ".join(
            f"fact{group}x{i}" for i in range(60)
        )
        seen = []
        for question in range(3):
            raw = oai.completions.with_raw_response.create(
                model=TINY,
                prompt=f"{prefix} question {question}?",
                max_tokens=4,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            body = raw.parse()
            seen.append((raw.headers["x-turbine-worker"], body.usage.prompt_tokens_details.cached_tokens))  # type: ignore[union-attr]
        first_worker = seen[0][0]
        holders.add(first_worker)
        for worker, cached in seen[1:]:
            assert worker == first_worker, seen
            assert (cached or 0) >= 64, seen  # the shared prefix's full blocks came from the cache
    assert len(holders) == 2  # new prefixes spread over both workers


def _story(oai: openai.OpenAI, i: int, on_chunk: Callable[[], None] | None = None) -> tuple[str, str | None]:
    chunks = []
    for chunk in oai.completions.create(
        model=TINY,
        prompt=f"Story {i}: once upon a time",
        max_tokens=300,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        chunks.append(chunk)
        if on_chunk is not None:
            on_chunk()
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = next(
        (c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None
    )
    return text, finish


def test_greedy_streams_migrate_between_torch_workers_unchanged(stack: Stack, tiny_llama_dir: Path) -> None:
    _, url = stack.frontend("--migration-limit", "3")
    tiny_torch_worker(stack, tiny_llama_dir, ttl=2.0)
    victim = stack.procs[-1]
    tiny_torch_worker(stack, tiny_llama_dir, ttl=2.0)
    wait_instances(url, 2, timeout=60, model=TINY)
    oai = _client(url)
    # Kill the victim once every stream has its first tokens, not on a timer: on a fast machine a
    # timer can fire after the stories are done, and nothing migrates.
    progress = StreamProgress()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_story, oai, i, progress.counter(i)) for i in range(8)]
        wait_until(lambda: progress.all_past(8, 5), 60)
        victim.signal(signal.SIGKILL)
        results = [f.result() for f in futures]
    assert all(finish == "length" for _, finish in results)
    _, _, metrics = http("GET", url + "/metrics")
    migrated = [line for line in metrics.decode().splitlines() if line.startswith("turbine_migrations_total")]
    assert migrated and float(migrated[0].split()[-1]) > 0
    wait_until(lambda: live_instances(url, TINY) == 1, 15)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        reference = list(pool.map(lambda i: _story(oai, i), range(8)))
    assert [r[0] for r in results] == [r[0] for r in reference]


def test_a_prompt_longer_than_the_context_is_a_400(stack: Stack, tiny_llama_dir: Path) -> None:
    _, url = stack.frontend()
    tiny_torch_worker(stack, tiny_llama_dir)
    wait_instances(url, 1, timeout=60, model=TINY)
    body = {"model": TINY, "prompt": "word " * (TINY_LLAMA_CONTEXT + 100), "max_tokens": 5}
    status, _, raw = http(
        "POST", url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["code"] == "context_length_exceeded" and str(TINY_LLAMA_CONTEXT) in error["message"]


def _worker_exit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turbine.worker", "--engine", "torch", "--discovery-backend", "mem", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=None if env is None else {**os.environ, **env},
    )


def test_cpu_kernels_turbine_where_they_cannot_build_exits_2_with_one_line(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """`--cpu-kernels turbine` asks for Turbine's kernels or nothing: with a kernel cache that cannot
    be created (or on a CPU without AMX), the worker says why in one line and exits 2."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = _worker_exit(
        "--model-path", str(tiny_llama_dir), "--device", "cpu", "--dtype", "bfloat16",
        "--cpu-kernels", "turbine",
        env={"TURBINE_KERNEL_CACHE": str(blocker / "kernels")},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cpu-kernels turbine:" in lines[0], result.stderr


def test_a_missing_or_unsupported_model_exits_2_with_one_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    missing = _worker_exit("--model-path", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "nowhere" in missing.stderr
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gpt2 / name).write_bytes((tiny_llama_dir / name).read_bytes())
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    unsupported = _worker_exit("--model-path", str(gpt2))
    assert unsupported.returncode == 2, unsupported.stderr
    lines = unsupported.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPT2LMHeadModel is not supported" in lines[0], unsupported.stderr
