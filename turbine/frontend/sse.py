"""Server-sent event streams of every API on the HTTP edge (OpenAI chunks, Responses events,
Anthropic events): one response per stream, whose failure after the headers is reported in-band."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping

from aiohttp import web

from turbine.errors import TurbineError

log = logging.getLogger(__name__)

HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def send_events(
    request: web.Request,
    events: AsyncGenerator[bytes, None],
    error: Callable[[TurbineError], bytes],
    stream_id: str,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Answer `request` with `events` (each chunk one write, empty ones skipped). The headers are
    gone by the time a generation fails, so a TurbineError from `events` ends the stream with the
    API's error event, `error(exc)`, rather than a status."""
    resp = web.StreamResponse(headers={**HEADERS, **(headers or {})})
    await resp.prepare(request)
    async with contextlib.aclosing(events):
        try:
            async for chunk in events:
                if chunk:
                    await resp.write(chunk)
        except TurbineError as exc:
            log.warning("stream %s failed: %s", stream_id, exc.message)
            await resp.write(error(exc))
    await resp.write_eof()
    return resp
