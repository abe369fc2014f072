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
import json
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

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
        """The Prometheus text at /metrics; None when the server has none (404)."""
        try:
            async with self._session.get(
                f"{self.base_url}/metrics",
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                if resp.status == 404:
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
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        await _drain(resp)
                        return
                    try:
                        data = json.loads(payload)
                    except ValueError:
                        continue  # not JSON: a keep-alive or a server's stray line
                    if isinstance(data, dict):
                        yield data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._fail(exc) from None


# How long the end of a response body may take to arrive after its `[DONE]` event.
DRAIN_TIMEOUT_S = 1.0


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read what is left of the body (the chunked encoding's last chunk, typically) so that the
    connection goes back to the pool: aiohttp closes one whose response was not read to its end,
    and every request then pays for a new connection (and the server for accepting it)."""
    if resp.content.at_eof():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await resp.content.read()
