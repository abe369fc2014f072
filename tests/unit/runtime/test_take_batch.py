import msgspec
import pytest

from turbine.runtime.transport import framing
from turbine.runtime.transport.base import take_batch

pytestmark = pytest.mark.unit


def _data(n: int) -> framing.Data:
    return framing.Data(1, msgspec.Raw(msgspec.msgpack.encode(n)))


def test_takes_the_leading_data_frames_and_stops_at_the_first_other() -> None:
    batch, last = take_batch([_data(1), _data(2), _data(3), framing.End(1), _data(9)])
    assert [msgspec.msgpack.decode(b) for b in batch] == [1, 2, 3]
    assert last == framing.End(1)


def test_no_terminal_item_ends_the_batch_with_none() -> None:
    assert take_batch([_data(1)]) == ([msgspec.msgpack.encode(1)], None)
    assert take_batch([framing.End(1)]) == ([], framing.End(1))
