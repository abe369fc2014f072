"""--router-mode direct, --router-min-initial-workers and --migration-max-seq-len, end to end."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal

import openai
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import MODEL, Proc, Stack, first_tokens, free_port, http, metric_sum, wait_until
from tests.e2e.test_kserve import text_input

pytestmark = pytest.mark.e2e

MOCKER = ("--engine", "mocker", "--block-size", "16")


def _instance_ids(worker: Proc, count: int) -> list[str]:
    """The hex instance ids a worker process logged when it started serving."""
    found: list[str] = []

    def logged() -> bool:
        found[:] = re.findall(r"worker ([0-9a-f]+) serving", worker.log())
        return len(found) == count

    wait_until(logged, 20, worker)
    return found


def _health(url: str) -> tuple[int, dict[str, object]]:
    status, _, body = http("GET", url + "/health", timeout=2)
    return status, json.loads(body)


def _decisions(url: str) -> dict[str, float]:
    """Requests routed per worker, from /metrics."""
    _, _, body = http("GET", url + "/metrics")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "turbine_routing_decisions":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["worker"]] = sample.value
    return out


def test_direct_mode_sends_each_request_to_the_named_worker(stack: Stack) -> None:
    grpc_port = free_port()
    _, url = stack.frontend("--router-mode", "direct", "--kserve-grpc-server", "--grpc-port", str(grpc_port))
    worker = stack.worker(*MOCKER, "--num-workers", "2")
    ids = _instance_ids(worker, 2)
    wait_until(lambda: _health(url)[1]["models"] == {MODEL: 2}, 20)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    for _ in range(3):
        for instance in ids:
            raw = oai.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                extra_headers={"x-worker-instance-id": instance},
            )
            assert raw.headers["x-turbine-worker"] == instance
            assert raw.parse().choices[0].finish_reason == "length"
    chunks = list(
        oai.completions.create(
            model=MODEL,
            prompt="a story",
            max_tokens=3,
            stream=True,
            extra_headers={"x-worker-instance-id": ids[1]},
        )
    )
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)

    # No header, or a worker that does not exist: 404 in OpenAI's shape; a malformed id: 400.
    for headers in ({}, {"x-worker-instance-id": "123abc"}):
        with pytest.raises(openai.NotFoundError) as missing:
            oai.completions.create(model=MODEL, prompt="hi", max_tokens=1, extra_headers=headers)
        assert missing.value.code == "worker_instance_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(
            model=MODEL, prompt="hi", max_tokens=1, extra_headers={"x-worker-instance-id": "worker-1"}
        )
    assert bad.value.param == "x-worker-instance-id"

    # The KServe gRPC edge takes the same header as call metadata.
    before = _decisions(url)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    try:
        for _ in range(3):
            client.infer(
                MODEL, [text_input()], parameters={"max_tokens": 2}, headers={"x-worker-instance-id": ids[0]}
            )
        with pytest.raises(InferenceServerException) as grpc_missing:
            client.infer(MODEL, [text_input()], parameters={"max_tokens": 2})
    finally:
        client.close()
    assert grpc_missing.value.status() == "StatusCode.NOT_FOUND"
    after = _decisions(url)
    assert after[ids[0]] - before.get(ids[0], 0) == 3
    assert after.get(ids[1], 0) == before.get(ids[1], 0)


def test_min_initial_workers_holds_readiness_and_requests(stack: Stack) -> None:
    _, url = stack.frontend("--router-min-initial-workers", "2")
    stack.worker(*MOCKER)
    wait_until(lambda: _health(url)[1]["models"] == {MODEL: 1}, 20)
    status, body = _health(url)
    assert (status, body["status"]) == (503, "waiting_for_workers")
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as waiting:
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert waiting.value.status_code == 503
    assert waiting.value.response.headers["Retry-After"] == "1"
    assert "waiting for 2 worker(s)" in waiting.value.message

    stack.worker(*MOCKER)
    wait_until(lambda: _health(url) == (200, {"status": "healthy", "models": {MODEL: 2}}), 20)
    assert oai.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices[0].finish_reason == "length"


def _stream(url: str, prompt: list[int]) -> tuple[str, str]:
    """(worker, SSE body) of one streamed completion, read to its end."""
    body = json.dumps(
        {"model": MODEL, "prompt": prompt, "max_tokens": 60, "stream": True, "ignore_eos": True}
    ).encode()
    status, headers, raw = http("POST", url + "/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 200, raw
    return headers["x-turbine-worker"], raw.decode()


def test_migration_max_seq_len_fails_long_streams_and_migrates_short_ones(stack: Stack) -> None:
    _, url = stack.frontend("--migration-limit", "3", "--migration-max-seq-len", "400")
    victim = stack.worker(*MOCKER, "--speedup-ratio", "1", ttl=2.0)
    victim_id = _instance_ids(victim, 1)[0]
    stack.worker(*MOCKER, "--speedup-ratio", "1", ttl=2.0)
    wait_until(lambda: _health(url)[1]["models"] == {MODEL: 2}, 20)
    long, short = list(range(100, 500)), list(range(100, 120))  # 400 + generated > 400; 20 + 60 < 400
    # Round-robin alternates workers: L L S S L L S S puts long and short prompts on both.
    prompts = [long, long, short, short] * 2
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = []
        for i, prompt in enumerate(prompts):
            futures.append(pool.submit(_stream, url, prompt))
            # Routed in this order: the next one goes out once the frontend has this one.
            wait_until(lambda n=i + 1: metric_sum(url, "turbine_inflight_requests") == n, 10)
        wait_until(lambda: first_tokens(url) == len(prompts), 30)  # every stream is under way
        victim.signal(signal.SIGKILL)
        results = [(len(p), *f.result()) for p, f in zip(prompts, futures, strict=True)]
    on_victim = [(n, body) for n, worker, body in results if worker == victim_id]
    assert {n for n, _ in on_victim} == {400, 20}
    for n, worker, body in results:
        finished = '"finish_reason":"length"' in body
        if worker == victim_id and n == 400:
            assert '"error"' in body and not finished, body[-300:]  # too long to migrate: failed
        else:
            assert finished and '"error"' not in body, body[-300:]  # migrated (or never broken)
