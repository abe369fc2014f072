"""The pure KServe codec: BYTES tensors as tritonclient serializes them, and request parameters."""

from __future__ import annotations

import struct

import pytest

from turbine.errors import InvalidRequest
from turbine.frontend import kserve_codec as codec
from turbine.frontend.kserve import read_text_input, request_params
from turbine.frontend.kserve_proto import grpc_service_pb2 as pb

pytestmark = pytest.mark.unit

Tensor = pb.ModelInferRequest.InferInputTensor


def test_bytes_tensor_round_trip() -> None:
    items = [b"hello", b"", "h\u00e9llo \u2603".encode()]
    raw = codec.encode_bytes_tensor(items)
    assert raw[:4] == struct.pack("<I", 5)
    assert raw[4:9] == b"hello"
    assert codec.decode_bytes_tensor(raw) == items
    assert codec.decode_bytes_tensor(b"") == []


@pytest.mark.parametrize("raw", [b"\x05\x00", b"\x05\x00\x00\x00abc", b"\x01\x00\x00\x00a\x02"])
def test_malformed_bytes_tensor(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="malformed BYTES tensor"):
        codec.decode_bytes_tensor(raw)


def test_text_from_elements() -> None:
    assert codec.text_from_elements([b"hi"], [1]) == "hi"
    assert codec.text_from_elements([b"hi"], [1, 1]) == "hi"
    with pytest.raises(InvalidRequest, match="exactly one element"):
        codec.text_from_elements([b"a", b"b"], [2])
    with pytest.raises(InvalidRequest, match="exactly one element"):
        codec.text_from_elements([b"a"], [2])
    with pytest.raises(InvalidRequest, match="negative"):
        codec.text_from_elements([b"a"], [-1])
    with pytest.raises(InvalidRequest, match="UTF-8"):
        codec.text_from_elements([b"\xff"], [1])


def test_sampling_params() -> None:
    assert codec.sampling_params({}) == codec.SamplingParams()
    params = codec.sampling_params(
        {
            "max_tokens": 5,
            "temperature": 1,
            "top_p": 0.5,
            "seed": 7,
            "stop": "\n",
            "ignore_eos": True,
            "min_tokens": 2,
            "streaming": False,
            "unknown": "ignored",
        }
    )
    assert params == codec.SamplingParams(
        max_tokens=5,
        temperature=1.0,
        top_p=0.5,
        seed=7,
        stop=["\n"],
        ignore_eos=True,
        min_tokens=2,
        streaming=False,
    )
    assert codec.sampling_params({"stop": '["a", "b"]'}).stop == ["a", "b"]
    assert codec.sampling_params({"stop": "[not json"}).stop == ["[not json"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_tokens", "5"),
        ("max_tokens", 5.0),
        ("max_tokens", True),
        ("temperature", "hot"),
        ("temperature", False),
        ("stop", 3),
        ("ignore_eos", 1),
        ("streaming", "yes"),
    ],
)
def test_sampling_param_types(name: str, value: codec.ParamValue) -> None:
    with pytest.raises(InvalidRequest, match=f"parameter '{name}'") as err:
        codec.sampling_params({name: value})
    assert err.value.param == name
    assert err.value.grpc_code == "INVALID_ARGUMENT"


def _request(**kwargs: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m", **kwargs)  # type: ignore[arg-type]


def test_read_text_input_raw_and_typed() -> None:
    raw = _request(inputs=[Tensor(name="text_input", datatype="BYTES", shape=[1])])
    raw.raw_input_contents.append(codec.encode_bytes_tensor([b"hello"]))
    assert read_text_input(raw) == "hello"

    typed = _request(
        inputs=[
            Tensor(
                name="text_input",
                datatype="BYTES",
                shape=[1, 1],
                contents=pb.InferTensorContents(bytes_contents=[b"typed"]),
            )
        ]
    )
    assert read_text_input(typed) == "typed"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "is required"),
        ([Tensor(name="text_input", datatype="INT32", shape=[1])], "datatype BYTES"),
        ([Tensor(name="other", datatype="BYTES", shape=[1])], "unexpected input"),
    ],
)
def test_read_text_input_rejects(inputs: list[Tensor], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        read_text_input(_request(inputs=inputs))


def test_read_text_input_rejects_unknown_output_and_raw_mismatch() -> None:
    req = _request(
        inputs=[
            Tensor(
                name="text_input",
                datatype="BYTES",
                shape=[1],
                contents=pb.InferTensorContents(bytes_contents=[b"x"]),
            )
        ]
    )
    req.outputs.add(name="logits")
    with pytest.raises(InvalidRequest, match="unknown output"):
        read_text_input(req)
    mismatch = _request(inputs=[Tensor(name="text_input", datatype="BYTES", shape=[1])])
    mismatch.raw_input_contents.extend([b"", b""])
    with pytest.raises(InvalidRequest, match="one entry per input"):
        read_text_input(mismatch)


def test_request_params_from_infer_parameters() -> None:
    req = _request()
    req.parameters["max_tokens"].int64_param = 4
    req.parameters["temperature"].double_param = 0.5
    req.parameters["stop"].string_param = "."
    req.parameters["ignore_eos"].bool_param = True
    req.parameters["unset"].CopyFrom(pb.InferParameter())
    assert request_params(req) == codec.SamplingParams(
        max_tokens=4, temperature=0.5, stop=["."], ignore_eos=True
    )
