"""Sans-IO framing of the request plane: length prefix + msgpack, no sockets here.

One connection per (frontend, worker) pair multiplexes many streams, each named by a stream id the
client picks. Client → worker: Request, Cancel. Worker → client: Data*, then End or Error. Both ways: Ping.
Payloads are already-encoded msgpack (`msgspec.Raw`), so relaying a frame never re-encodes it.
"""

from __future__ import annotations

import struct

import msgspec

from turbine.errors import InvalidRequest

# A frame bigger than this is a protocol violation (or an attack), not a request: refuse it
# rather than buffer it. 64 MiB fits a 1M-token prompt with room to spare.
MAX_FRAME_BYTES = 64 * 1024 * 1024
_LEN = struct.Struct(">I")


class Request(msgspec.Struct, frozen=True, tag=0, array_like=True):
    stream_id: int
    endpoint: str
    payload: msgspec.Raw


class Data(msgspec.Struct, frozen=True, tag=1, array_like=True):
    stream_id: int
    payload: msgspec.Raw


class End(msgspec.Struct, frozen=True, tag=2, array_like=True):
    stream_id: int


class Error(msgspec.Struct, frozen=True, tag=3, array_like=True):
    stream_id: int
    # One of the ERROR_* codes below; the client maps it onto the error tree.
    code: str
    message: str


class Cancel(msgspec.Struct, frozen=True, tag=4, array_like=True):
    stream_id: int


class Ping(msgspec.Struct, frozen=True, tag=5, array_like=True):
    """A heartbeat, sent both ways on a connection at a fixed interval (and by the worker as soon
    as a connection opens): a peer silent for longer than the stall timeout is frozen or cut off.
    Stream 0 is no stream (clients number theirs from 1), so a receiver that dispatches frames by
    stream id drops it without looking at its type."""

    stream_id: int = 0


Frame = Request | Data | End | Error | Cancel | Ping

ERROR_DRAINING = "draining"
ERROR_ENGINE = "engine"
ERROR_BAD_REQUEST = "bad_request"
ERROR_UNKNOWN_ENDPOINT = "unknown_endpoint"


class FrameError(InvalidRequest):
    """The peer sent bytes that are not a valid frame; the connection must be closed."""


_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Frame] = msgspec.msgpack.Decoder(Frame)


def encode_frame(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return _LEN.pack(len(body)) + body


def encode_frames_into(buf: bytearray, frame: Frame) -> None:
    """Append one frame to `buf` (for coalescing many frames into one socket write)."""
    start = len(buf)
    buf += b"\0\0\0\0"
    _encoder.encode_into(frame, buf, start + 4)
    _LEN.pack_into(buf, start, len(buf) - start - 4)


class FrameDecoder:
    """Feed it bytes as they arrive; it returns every complete frame, in order."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > MAX_FRAME_BYTES:
                raise FrameError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
            if end - pos - 4 < size:
                break
            body = bytes(buf[pos + 4 : pos + 4 + size])
            try:
                frames.append(_decoder.decode(body))
            except msgspec.DecodeError as exc:
                raise FrameError(f"malformed frame: {exc}") from exc
            pos += 4 + size
        if pos:
            del buf[:pos]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)
