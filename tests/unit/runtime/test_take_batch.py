import asyncio

import msgspec
import pytest

from turbine.runtime.transport import framing
from turbine.runtime.transport.base import take_batch

pytestmark = pytest.mark.unit


def _data(n: int) -> framing.Data:
    return framing.Data(1, msgspec.Raw(msgspec.msgpack.encode(n)))


async def test_takes_every_queued_data_frame_and_stops_at_the_first_other() -> None:
    queue: asyncio.Queue[object] = asyncio.Queue()
    for item in (_data(2), _data(3), framing.End(1), _data(9)):
        queue.put_nowait(item)
    batch, last = take_batch(_data(1), queue)
    assert [msgspec.msgpack.decode(b) for b in batch] == [1, 2, 3]
    assert last == framing.End(1)
    assert queue.qsize() == 1


async def test_a_dry_queue_ends_the_batch_without_a_terminal_item() -> None:
    queue: asyncio.Queue[object] = asyncio.Queue()
    assert take_batch(_data(1), queue) == ([msgspec.msgpack.encode(1)], None)
    assert take_batch(framing.End(1), queue) == ([], framing.End(1))
