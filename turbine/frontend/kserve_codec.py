"""Pure parts of the KServe v2 edge: BYTES tensor (de)serialization and request parameters.

No protobuf here: `kserve.py` turns messages into plain values, and these functions check and
convert them, raising `InvalidRequest` (gRPC INVALID_ARGUMENT) for anything a client got wrong.

A BYTES tensor in `raw_input_contents` / `raw_output_contents` is, per element, a 4-byte
little-endian length followed by that many bytes (what tritonclient and Triton send).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from turbine.errors import InvalidRequest

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
BYTES = "BYTES"

ParamValue = bool | int | float | str

_LEN = struct.Struct("<I")


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Split a serialized BYTES tensor into its elements."""
    items: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + _LEN.size > len(raw):
            raise InvalidRequest("malformed BYTES tensor: truncated element length")
        (size,) = _LEN.unpack_from(raw, offset)
        offset += _LEN.size
        if offset + size > len(raw):
            raise InvalidRequest("malformed BYTES tensor: element longer than the tensor data")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    return items


def encode_bytes_tensor(items: Iterable[bytes]) -> bytes:
    """Serialize BYTES tensor elements, each with its 4-byte little-endian length prefix."""
    return b"".join(_LEN.pack(len(item)) + item for item in items)


def element_count(shape: Iterable[int]) -> int:
    dims = list(shape)
    if any(d < 0 for d in dims):
        raise InvalidRequest(f"tensor shape {dims} has a negative dimension")
    return math.prod(dims)


def text_from_elements(elements: list[bytes], shape: Iterable[int]) -> str:
    """The one prompt of a `text_input` tensor (a batch of one), as UTF-8 text."""
    dims = list(shape)
    count = element_count(dims)
    if count != 1 or len(elements) != 1:
        raise InvalidRequest(
            f"'{TEXT_INPUT}' must hold exactly one element (shape {dims}, {len(elements)} element(s)); "
            "send one prompt per request"
        )
    try:
        return elements[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"'{TEXT_INPUT}' is not valid UTF-8") from None


class SamplingParams(NamedTuple):
    """Request parameters that Turbine understands; unknown ones are ignored, as Triton does."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    # None: the RPC decides (ModelInfer: one response; ModelStreamInfer: one response per delta).
    streaming: bool | None = None


def _int(name: str, value: ParamValue) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"parameter '{name}' must be an integer (int64_param)", param=name)
    return value


def _float(name: str, value: ParamValue) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"parameter '{name}' must be a number (double_param)", param=name)
    return float(value)


def _bool(name: str, value: ParamValue) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"parameter '{name}' must be a boolean (bool_param)", param=name)
    return value


def _stop(value: ParamValue) -> list[str]:
    """A stop string, or a JSON list of them (a string parameter starting with '[')."""
    if not isinstance(value, str):
        raise InvalidRequest("parameter 'stop' must be a string (string_param)", param="stop")
    if value.startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            decoded = None
        if isinstance(decoded, list) and all(isinstance(s, str) for s in decoded):
            return list(decoded)
    return [value]


def sampling_params(params: Mapping[str, ParamValue]) -> SamplingParams:
    """Read and type-check the sampling parameters of a request's `parameters` map."""
    get = params.get
    return SamplingParams(
        max_tokens=_int("max_tokens", v) if (v := get("max_tokens")) is not None else None,
        temperature=_float("temperature", v) if (v := get("temperature")) is not None else None,
        top_p=_float("top_p", v) if (v := get("top_p")) is not None else None,
        seed=_int("seed", v) if (v := get("seed")) is not None else None,
        stop=_stop(v) if (v := get("stop")) is not None else None,
        ignore_eos=_bool("ignore_eos", v) if (v := get("ignore_eos")) is not None else False,
        min_tokens=_int("min_tokens", v) if (v := get("min_tokens")) is not None else 0,
        streaming=_bool("streaming", v) if (v := get("streaming")) is not None else None,
    )
