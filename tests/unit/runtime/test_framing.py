import msgspec
import pytest

from turbine.runtime.transport import framing

pytestmark = pytest.mark.unit


def _frames() -> list[framing.Frame]:
    return [
        framing.Request(1, "generate", msgspec.Raw(msgspec.msgpack.encode({"a": 1}))),
        framing.Data(1, msgspec.Raw(msgspec.msgpack.encode([1, 2, 3]))),
        framing.End(1),
        framing.Error(2, framing.ERROR_ENGINE, "boom"),
        framing.Cancel(3),
        framing.Ping(),
    ]


def test_round_trip_every_frame_kind() -> None:
    wire = b"".join(framing.encode_frame(f) for f in _frames())
    decoded = framing.FrameDecoder().feed(wire)
    # Whole frames, payload bytes included (msgspec.Raw compares by content).
    assert decoded == _frames()
    assert isinstance(decoded[0], framing.Request)
    assert msgspec.msgpack.decode(decoded[0].payload) == {"a": 1}
    assert decoded[3] == framing.Error(2, "engine", "boom")


def test_byte_at_a_time_yields_the_same_frames() -> None:
    wire = b"".join(framing.encode_frame(f) for f in _frames())
    decoder = framing.FrameDecoder()
    out: list[framing.Frame] = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert out == _frames()
    assert decoder.buffered == 0


def test_encode_into_matches_encode_frame() -> None:
    buf = bytearray()
    for frame in _frames():
        framing.encode_frames_into(buf, frame)
    assert bytes(buf) == b"".join(framing.encode_frame(f) for f in _frames())


def test_partial_frame_stays_buffered() -> None:
    wire = framing.encode_frame(framing.End(7))
    decoder = framing.FrameDecoder()
    assert decoder.feed(wire[:-1]) == []
    assert decoder.buffered == len(wire) - 1
    assert decoder.feed(wire[-1:]) == [framing.End(7)]


def test_oversized_length_prefix_is_refused() -> None:
    with pytest.raises(framing.FrameError, match="exceeds"):
        framing.FrameDecoder().feed((framing.MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"x")


def test_garbage_body_is_refused() -> None:
    with pytest.raises(framing.FrameError, match="malformed"):
        framing.FrameDecoder().feed(b"\x00\x00\x00\x02\xc1\xc1")
