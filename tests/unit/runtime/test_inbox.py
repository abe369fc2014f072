import asyncio

import pytest

from turbine.runtime.inbox import Inbox

pytestmark = pytest.mark.unit


async def test_take_returns_everything_queued_in_order() -> None:
    inbox: Inbox[int] = Inbox()
    for i in range(3):
        inbox.put_nowait(i)
    assert await inbox.take() == [0, 1, 2]
    assert inbox.empty()


async def test_take_waits_for_the_next_put() -> None:
    inbox: Inbox[str] = Inbox()
    task = asyncio.create_task(inbox.take())
    await asyncio.sleep(0)
    assert not task.done()
    inbox.put_nowait("a")
    inbox.put_nowait("b")  # before the consumer runs: both come in one take
    assert await task == ["a", "b"]


async def test_a_cancelled_take_leaves_the_inbox_usable() -> None:
    inbox: Inbox[int] = Inbox()
    task = asyncio.create_task(inbox.take())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    inbox.put_nowait(1)  # no waiter left behind to wake
    assert await asyncio.wait_for(inbox.take(), 1) == [1]
