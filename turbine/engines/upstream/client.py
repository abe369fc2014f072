"""HTTP to one upstream server: model info, the token-mode probe, /metrics, streamed completions.

Every failure to reach the server, and a stream that breaks before its finish reason, raises
`UpstreamUnavailable` (retriable: the frontend retries another worker, or migrates a stream that
had started with `--migration-limit`). Answers the server gives (4xx for a request it refuses) are
returned as they are. Closing a stream's generator closes the HTTP response, and servers abort a
request whose client went away (vLLM, SGLang and llama.cpp all do).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from turbine.engines.upstream.http1 import Http1Pool
from turbine.errors import UpstreamUnavailable

# vLLM routes a request to one of its data-parallel ranks by this header.
DP_RANK_HEADER = "X-data-parallel-rank"


@dataclass(frozen=True, slots=True)
class UpstreamModel:
    """What `/v1/models` says about the served model."""

    id: str
    # vLLM: the model path or hub id it loaded, and its context length; None where not reported.
    root: str | None = None
    max_model_len: int | None = None


class UpstreamClient:
    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        api_key: str | None = None,
        dp_rank: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # An OpenAI-style base URL may already end in /v1.
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self._session = session
        self.dp_rank = dp_rank
        self._headers: dict[str, str] = {}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        if dp_rank is not None:
            self._headers[DP_RANK_HEADER] = str(dp_rank)
        # Streamed completions (the hot path) over plain HTTP go through a pool of keep-alive
        # connections of our own (http1.py); https:// ones through aiohttp.
        url = urlsplit(self.base_url)
        self._pool: Http1Pool | None = None
        if url.scheme == "http" and url.hostname:
            self._pool = Http1Pool(url.hostname, url.port or 80)
            lines = [f"POST {url.path}/v1/completions HTTP/1.1", f"Host: {url.netloc}"]
            lines += ["Content-Type: application/json", "Accept: text/event-stream"]
            lines += [f"{name}: {value}" for name, value in self._headers.items()]
            self._head = ("\r\n".join(lines) + "\r\n").encode("latin-1")

    def _fail(self, exc: BaseException) -> UpstreamUnavailable:
        return UpstreamUnavailable(f"upstream {self.base_url}: {type(exc).__name__}: {exc}")

    async def model(self, timeout_s: float) -> UpstreamModel:
        try:
            async with self._session.get(
                f"{self.base_url}/v1/models",
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                if resp.status != 200:
                    raise UpstreamUnavailable(f"upstream {self.base_url}: /v1/models answered {resp.status}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise self._fail(exc) from None
        data = body.get("data") if isinstance(body, Mapping) else None
        if not isinstance(data, list) or not data or not isinstance(data[0], Mapping):
            raise UpstreamUnavailable(f"upstream {self.base_url}: /v1/models lists no model")
        first = data[0]
        root, length = first.get("root"), first.get("max_model_len")
        return UpstreamModel(
            str(first.get("id", "")),
            root if isinstance(root, str) else None,
            length if isinstance(length, int) and length > 0 else None,
        )

    async def answers(self, timeout_s: float) -> bool:
        """Whether the server's HTTP side answers at all within `timeout_s` (any status): a
        process check that asks nothing of the model, so a server busy computing (or one that
        queues model calls behind the running completion, as llama-cpp-python does) still
        passes, and only a frozen or unreachable one fails."""
        try:
            async with self._session.get(
                f"{self.base_url}/health",
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ):
                return True
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def accepts_token_ids(self, model: str, token_ids: list[int], timeout_s: float) -> bool:
        """Whether `/v1/completions` takes a list of token ids as its prompt (one token generated)."""
        body = {"model": model, "prompt": token_ids, "max_tokens": 1, "temperature": 0.0}
        try:
            async with self._session.post(
                f"{self.base_url}/v1/completions",
                json=body,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                await resp.read()
                # Servers that take strings only refuse ints with 422 (llama-cpp-python <= 0.3.x
                # validation) or fail them with 500 (0.3.36): either way, not token mode.
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._fail(exc) from None

    async def metrics(self, timeout_s: float) -> str | None:
        """The Prometheus text at /metrics; None when the server has none (404; llama.cpp's
        llama-server answers 501 unless started with --metrics)."""
        try:
            async with self._session.get(
                f"{self.base_url}/metrics",
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                if resp.status in (404, 501):
                    return None
                if resp.status != 200:
                    raise UpstreamUnavailable(f"upstream {self.base_url}: /metrics answered {resp.status}")
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._fail(exc) from None

    async def stream_completion(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """The `data:` objects of a streamed `/v1/completions`, until `[DONE]`.

        A 4xx answer is yielded once as `{"error": ...}` (the request is bad for this server); a
        5xx, a refused connection or a stream cut short raises `UpstreamUnavailable`.
        """
        if self._pool is None:
            async with contextlib.aclosing(self._stream_aiohttp(body)) as events:
                async for data in events:
                    yield data
            return
        encoded = orjson.dumps(body)
        head = self._head + b"Content-Length: %d\r\n\r\n" % len(encoded)
        try:
            resp, conn = await self._pool.request(head, encoded)
        except OSError as exc:
            raise self._fail(exc) from None
        try:
            if resp.status != 200:
                text = (await resp.read()).decode("utf-8", "replace")
                if resp.status >= 500:
                    raise UpstreamUnavailable(
                        f"upstream {self.base_url} answered {resp.status}: {text[:200]}"
                    )
                yield {"error": {"message": f"upstream answered {resp.status}: {text[:500]}"}}
                return
            async with contextlib.aclosing(sse_events(resp.chunks())) as sse:
                async for event in sse:
                    if event is None:  # [DONE]
                        await _drain_events(sse)
                        return
                    yield event
            raise UpstreamUnavailable(f"upstream {self.base_url}: the stream ended before [DONE]")
        except OSError as exc:
            raise self._fail(exc) from None
        finally:
            self._pool.release(conn, resp)

    async def _stream_aiohttp(self, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """`stream_completion` over aiohttp, for https:// upstreams."""
        try:
            async with self._session.post(
                f"{self.base_url}/v1/completions",
                json=body,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            ) as resp:
                if resp.status >= 500:
                    text = (await resp.text())[:200]
                    raise UpstreamUnavailable(f"upstream {self.base_url} answered {resp.status}: {text}")
                if resp.status != 200:
                    text = (await resp.text())[:500]
                    yield {"error": {"message": f"upstream answered {resp.status}: {text}"}}
                    return
                async for line in resp.content:
                    data = _event(line)
                    if data is _DONE:
                        await _drain(resp)
                        return
                    if data is not None:
                        yield data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._fail(exc) from None

    def silence(self, now: float) -> float:
        """Seconds since a streamed completion in flight last heard from the server (always 0
        over https://, whose streams aiohttp keeps)."""
        return 0.0 if self._pool is None else self._pool.silence(now)

    def abort_streams(self) -> int:
        """Cut every streamed completion in flight: each raises `UpstreamUnavailable`."""
        return 0 if self._pool is None else self._pool.abort_busy()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


_DONE: dict[str, Any] = {}


def _event(line: bytes) -> dict[str, Any] | None:
    """One SSE line: its JSON object, `_DONE` for `[DONE]`, None for anything else (comments,
    keep-alives, event names, a server's stray non-JSON line)."""
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return _DONE
    try:
        data = orjson.loads(payload)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncGenerator[dict[str, Any] | None, None]:
    """The JSON objects of an SSE body's `data:` lines, and None for `[DONE]`; body chunks may
    split or join lines anyhow."""
    rest = b""
    async for chunk in chunks:
        lines = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
        rest = lines.pop()
        for line in lines:
            data = _event(line)
            if data is _DONE:
                yield None
            elif data is not None:
                yield data
    data = _event(rest)
    if data is _DONE:
        yield None
    elif data is not None:
        yield data


# How long the end of a response body may take to arrive after its `[DONE]` event.
DRAIN_TIMEOUT_S = 1.0


async def _drain_events(events: AsyncGenerator[dict[str, Any] | None, None]) -> None:
    """Read the body to its end (the chunked encoding's last chunk, typically) so that its
    connection can go back to the pool; one left unread is closed instead."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for _ in events:
                pass


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """`_drain_events` for an aiohttp response (aiohttp closes a connection whose response was
    not read to its end, and every request then pays for a new connection)."""
    if resp.content.at_eof():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await resp.content.read()
