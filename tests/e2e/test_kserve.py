"""The KServe v2 gRPC edge (`--kserve-grpc-server`), driven by the official tritonclient[grpc] client
against a real frontend and mocker worker, with HTTP serving beside it."""

from __future__ import annotations

import json
import queue
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import MODEL, Stack, free_port, http, wait_instances, wait_until

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"


@pytest.fixture
def served(stack: Stack) -> Iterator[tuple[triton.InferenceServerClient, str]]:
    grpc_port = free_port()
    _, url = stack.frontend("--kserve-grpc-server", "--grpc-port", str(grpc_port))
    stack.worker("--engine", "mocker", "--speedup-ratio", "5")
    wait_instances(url, 1)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    try:
        yield client, url
    finally:
        client.close()


def text_input(text: str = PROMPT) -> triton.InferInput:
    tensor = triton.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return tensor


def params_of(response: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, param in response.parameters.items():
        out[key] = getattr(param, param.WhichOneof("parameter_choice"))
    return out


def http_completion(url: str, **body: Any) -> dict[str, Any]:
    status, _, raw = http(
        "POST",
        url + "/v1/completions",
        json.dumps({"model": MODEL, "prompt": PROMPT, **body}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200, raw
    result: dict[str, Any] = json.loads(raw)
    return result


def test_health_and_metadata(served: tuple[triton.InferenceServerClient, str]) -> None:
    client, url = served
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("no-such-model")

    server = client.get_server_metadata()
    assert server.name == "turbine"
    assert server.version

    meta = client.get_model_metadata(MODEL)
    assert meta.name == MODEL
    assert [(t.name, t.datatype) for t in meta.inputs] == [("text_input", "BYTES")]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("text_output", "BYTES")]

    config = client.get_model_config(MODEL).config
    assert config.name == MODEL
    assert [i.name for i in config.input] == ["text_input"]
    assert [o.name for o in config.output] == ["text_output"]
    assert config.model_transaction_policy.decoupled

    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no-such-model")
    assert err.value.status() == "StatusCode.NOT_FOUND"

    # HTTP keeps serving beside gRPC.
    assert http("GET", url + "/v1/models")[0] == 200


def test_unary_infer_matches_http(served: tuple[triton.InferenceServerClient, str]) -> None:
    client, url = served
    result = client.infer(
        MODEL, [text_input()], parameters={"max_tokens": 9, "seed": 11, "temperature": 0.5}, request_id="r1"
    )
    out = result.as_numpy("text_output")
    assert out is not None and out.shape == (1,)
    text = out[0].decode()
    response = result.get_response()
    assert response.id == "r1"
    assert response.model_name == MODEL
    params = params_of(response)
    assert params["completion_tokens"] == 9
    assert params["finish_reason"] == "length"
    assert params["prompt_tokens"] > 0

    # The same request over HTTP gives the same text: shared preprocessing and sampling options.
    body = http_completion(url, max_tokens=9, seed=11, temperature=0.5)
    assert body["choices"][0]["text"] == text
    assert body["usage"]["completion_tokens"] == 9


def test_stream_infer(served: tuple[triton.InferenceServerClient, str]) -> None:
    client, _ = served
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(
            MODEL, [text_input()], request_id="s1", parameters={"max_tokens": 7, "seed": 3}
        )
        deltas: list[str] = []
        final: dict[str, Any] = {}
        while True:
            result, error = responses.get(timeout=20)
            assert error is None, error
            response = result.get_response()
            assert response.id == "s1"
            deltas.append(result.as_numpy("text_output")[0].decode())
            params = params_of(response)
            if params.get("triton_final_response"):
                final = params
                break
        assert len(deltas) > 1  # token by token
        assert final["completion_tokens"] == 7
        assert final["finish_reason"] == "length"

        # An error travels in the stream's error_message, and the stream stays usable.
        client.async_stream_infer("no-such-model", [text_input()], request_id="s2")
        result, error = responses.get(timeout=20)
        assert result is None and "no-such-model" in str(error)

        # streaming=false on the stream: one response holding the whole text.
        client.async_stream_infer(
            MODEL, [text_input()], parameters={"max_tokens": 7, "seed": 3, "streaming": False}
        )
        result, error = responses.get(timeout=20)
        assert error is None, error
        assert result.as_numpy("text_output")[0].decode() == "".join(deltas)
        assert params_of(result.get_response())["triton_final_response"] is True
    finally:
        client.stop_stream()


def test_errors_are_status_codes(served: tuple[triton.InferenceServerClient, str]) -> None:
    client, _ = served

    def status_of(model: str, inputs: list[triton.InferInput], **params: Any) -> str:
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, inputs, parameters=params or None)
        return str(err.value.status())

    assert status_of("no-such-model", [text_input()]) == "StatusCode.NOT_FOUND"

    wrong_dtype = triton.InferInput("text_input", [1], "INT32")
    wrong_dtype.set_data_from_numpy(np.array([1], dtype=np.int32))
    assert status_of(MODEL, [wrong_dtype]) == "StatusCode.INVALID_ARGUMENT"

    other = triton.InferInput("prompt", [1], "BYTES")
    other.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    assert status_of(MODEL, [other]) == "StatusCode.INVALID_ARGUMENT"
    assert status_of(MODEL, []) == "StatusCode.INVALID_ARGUMENT"

    batch = triton.InferInput("text_input", [2], "BYTES")
    batch.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    assert status_of(MODEL, [batch]) == "StatusCode.INVALID_ARGUMENT"

    # Parameters are validated like the HTTP edge's.
    assert status_of(MODEL, [text_input()], max_tokens="ten") == "StatusCode.INVALID_ARGUMENT"
    assert status_of(MODEL, [text_input()], temperature=5.0) == "StatusCode.INVALID_ARGUMENT"
    assert status_of(MODEL, [text_input()], streaming=True) == "StatusCode.INVALID_ARGUMENT"

    # After all that, it still serves.
    result = client.infer(MODEL, [text_input()], parameters={"max_tokens": 3})
    assert params_of(result.get_response())["completion_tokens"] == 3


def _samples(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    status, _, body = http("GET", url + "/metrics")
    assert status == 200
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name
    }


def test_grpc_requests_are_counted(served: tuple[triton.InferenceServerClient, str]) -> None:
    client, url = served
    for _ in range(2):
        client.infer(MODEL, [text_input()], parameters={"max_tokens": 4})
    for model, params in (("no-such-model", {}), (MODEL, {"temperature": 5.0})):
        with pytest.raises(InferenceServerException):
            client.infer(model, [text_input()], parameters=params or None)
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL, [text_input()], parameters={"max_tokens": 5})
        while True:
            result, error = responses.get(timeout=20)
            assert error is None, error
            if params_of(result.get_response()).get("triton_final_response"):
                break
        client.async_stream_infer("no-such-model", [text_input()])
        assert responses.get(timeout=20)[1] is not None
    finally:
        client.stop_stream()

    def requests() -> dict[tuple[str, str, str], float]:
        return {
            (labels["model"], labels["endpoint"], labels["status"]): value
            for labels, value in ((dict(k), v) for k, v in _samples(url, "turbine_requests_total").items())
        }

    expected = {
        (MODEL, "grpc_infer", "OK"): 2.0,
        ("no-such-model", "grpc_infer", "NOT_FOUND"): 1.0,
        (MODEL, "grpc_infer", "INVALID_ARGUMENT"): 1.0,
        (MODEL, "grpc_stream_infer", "OK"): 1.0,
        ("no-such-model", "grpc_stream_infer", "NOT_FOUND"): 1.0,
    }
    # A stream's request is counted just after its last response is queued: wait for it.
    wait_until(lambda: requests() == expected, 10)
    labels = (("model", MODEL),)
    # Served requests (not the refused ones) are timed and measured as HTTP ones are.
    assert _samples(url, "turbine_time_to_first_token_seconds_count")[labels] == 3
    assert _samples(url, "turbine_request_duration_seconds_count")[labels] == 3
    assert _samples(url, "turbine_input_sequence_tokens_count")[labels] == 3
    assert _samples(url, "turbine_output_sequence_tokens_sum")[labels] == 4 + 4 + 5
    assert _samples(url, "turbine_inflight_requests")[labels] == 0
    assert sum(_samples(url, "turbine_routing_decisions_total").values()) == 3


def test_sigterm_stops_both_servers(stack: Stack) -> None:
    grpc_port = free_port()
    proc, _ = stack.frontend("--kserve-grpc-server", "--grpc-port", str(grpc_port))
    client = triton.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    try:
        assert client.is_server_live()
    finally:
        client.close()
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert "KServe gRPC API on" in proc.log()


def test_metrics_on_their_own_port_in_grpc_mode(stack: Stack) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    _, url = stack.frontend(
        "--kserve-grpc-server", "--grpc-port", str(grpc_port), "--grpc-metrics-port", str(metrics_port)
    )
    stack.worker("--engine", "mocker", "--speedup-ratio", "100")
    wait_instances(url, 1)
    status, _, body = http("GET", f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200
    assert f'turbine_live_workers{{model="{MODEL}"}} 1.0' in body.decode()
