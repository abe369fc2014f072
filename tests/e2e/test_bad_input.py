"""Every kind of bad input gets a 4xx in OpenAI's error shape, and never disturbs other requests."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.conftest import MODEL, Stack, http, wait_instances

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("bad_input")]

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    stack = Stack(tmp_path_factory.mktemp("bad-input"))
    try:
        _, url = stack.frontend("--max-request-body-bytes", "65536")
        stack.worker("--engine", "mocker", "--speedup-ratio", "100")
        wait_instances(url, 1)
        yield url
    finally:
        stack.stop()


def _post(url: str, path: str, body: object | bytes) -> tuple[int, dict[str, object]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, out = http("POST", url + path, raw, JSON)
    return status, json.loads(out)


def _chat(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


CASES = [
    ("malformed json", "/v1/chat/completions", b"{not json", 400, None),
    ("empty body", "/v1/chat/completions", b"", 400, None),
    ("json array", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", _chat(messages=[]), 400, "messages"),
    ("missing model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, None),
    ("unknown model", "/v1/chat/completions", _chat(model="nope"), 404, "model"),
    ("messages wrong type", "/v1/chat/completions", _chat(messages="hello"), 400, "messages"),
    ("temperature wrong type", "/v1/chat/completions", _chat(temperature="hot"), 400, "temperature"),
    ("temperature too high", "/v1/chat/completions", _chat(temperature=3.5), 400, "temperature"),
    ("negative temperature", "/v1/chat/completions", _chat(temperature=-1), 400, "temperature"),
    ("top_p zero", "/v1/chat/completions", _chat(top_p=0), 400, "top_p"),
    ("top_p above one", "/v1/chat/completions", _chat(top_p=1.5), 400, "top_p"),
    ("max_tokens zero", "/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", "/v1/chat/completions", _chat(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens over context", "/v1/chat/completions", _chat(max_tokens=10**6), 400, "messages"),
    (
        "max_completion_tokens zero",
        "/v1/chat/completions",
        _chat(max_completion_tokens=0),
        400,
        "max_completion_tokens",
    ),
    ("n too large", "/v1/chat/completions", _chat(n=17), 400, "n"),
    ("n zero", "/v1/chat/completions", _chat(n=0), 400, "n"),
    ("stop wrong type", "/v1/chat/completions", _chat(stop=5), 400, "stop"),
    ("min over max", "/v1/chat/completions", _chat(min_tokens=10, max_tokens=2), 400, "min_tokens"),
    (
        "bad message part",
        "/v1/chat/completions",
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        None,
    ),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("prompt wrong type", "/v1/completions", {"model": MODEL, "prompt": 12}, 400, "prompt"),
    ("token id out of vocab", "/v1/completions", {"model": MODEL, "prompt": [1, 10**9]}, 400, "prompt"),
    ("mixed prompt batch", "/v1/completions", {"model": MODEL, "prompt": ["a", [1, 2]]}, 400, "prompt"),
    ("empty prompt in a batch", "/v1/completions", {"model": MODEL, "prompt": ["a", ""]}, 400, "prompt"),
    ("unknown model completions", "/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("prompt over context", "/v1/completions", {"model": MODEL, "prompt": "word " * 10000}, 400, "prompt"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error(
    served: str, name: str, path: str, body: object, status: int, param: str | None
) -> None:
    got, payload = _post(served, path, body)
    assert got == status, payload
    error = payload["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param


def test_over_large_body_is_413(served: str) -> None:
    status, payload = _post(served, "/v1/completions", {"model": MODEL, "prompt": "x" * 100_000})
    assert status == 413
    assert payload["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_unknown_route_and_method(served: str) -> None:
    status, _, body = http("GET", served + "/v1/nothing")
    assert status == 404 and "error" in json.loads(body)
    status, _, body = http("GET", served + "/v1/chat/completions")
    assert status == 405 and "error" in json.loads(body)


def test_openai_client_sees_typed_errors(served: str) -> None:
    oai = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=9)


def test_bad_requests_do_not_disturb_concurrent_streams(served: str) -> None:
    oai = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)

    def good() -> str | None:
        chunks = list(
            oai.completions.create(
                model=MODEL, prompt="steady", max_tokens=64, extra_body={"ignore_eos": True}, stream=True
            )
        )
        return chunks[-1].choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good) for _ in range(4)]
        bads = [pool.submit(_post, served, c[1], c[2]) for c in CASES for _ in range(2)]
        assert all(b.result()[0] < 500 for b in bads)
        assert [g.result() for g in goods] == ["length"] * 4


def test_no_workers_is_503(tmp_path_factory: pytest.TempPathFactory) -> None:
    stack = Stack(tmp_path_factory.mktemp("no-workers"))
    try:
        _, url = stack.frontend()
        worker = stack.worker("--engine", "echo")
        wait_instances(url, 1)
        # Kill the only worker: until its lease expires, discovery still lists an unreachable instance.
        worker.popen.kill()
        worker.wait(5)
        status, payload = _post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert status == 503, payload
        assert "worker" in payload["error"]["message"]  # type: ignore[index]
    finally:
        stack.stop()
