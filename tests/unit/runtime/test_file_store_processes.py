"""FileStore across real processes: a worker killed with SIGKILL vanishes once its lease runs out."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

import turbine
from turbine.runtime.discovery.base import WatchEvent, WatchKind
from turbine.runtime.discovery.file import FileStore

pytestmark = pytest.mark.integration

TTL = 1.0
REPO_ROOT = Path(turbine.__file__).resolve().parent.parent

# The child keeps its lease alive like a worker would, until it is killed without any chance to
# revoke it.
CHILD = f"""
import asyncio, sys
from pathlib import Path
from turbine.runtime.discovery.file import FileStore

async def main() -> None:
    store = FileStore(Path(sys.argv[1]))
    lease = await store.grant_lease({TTL})
    await store.put("turbine/instances/child", b"alive", lease)
    print("ready", flush=True)
    while await store.keep_alive(lease):
        await asyncio.sleep({TTL / 3})  # the keep-alive interval

asyncio.run(main())
"""


async def test_killed_process_disappears_after_its_ttl(tmp_path: Path) -> None:
    store = FileStore(tmp_path, 0.05)
    watch = store.watch_prefix("turbine/instances/")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path), cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 10) == b"ready\n"
        put = WatchEvent(WatchKind.PUT, "turbine/instances/child", b"alive")
        assert await asyncio.wait_for(anext(watch), 5) == put
        # Alive for well over a TTL while the child keeps the lease.
        await asyncio.sleep(TTL * 1.5)
        assert await store.get("turbine/instances/child") == b"alive"

        child.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await child.wait()
        gone = await asyncio.wait_for(anext(watch), TTL + 2)
        assert gone == WatchEvent(WatchKind.DELETE, "turbine/instances/child", None)
        # At most a TTL after its last keep-alive, plus a poll.
        assert time.monotonic() - killed_at <= TTL + 0.5
        assert await store.get("turbine/instances/child") is None
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await watch.aclose()
        await store.close()
