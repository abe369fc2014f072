"""A closed-loop OpenAI load generator: N concurrent clients, each sending its next request as soon
as the previous one finished. Measures latency, time to first token and output tokens per request."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass(frozen=True)
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float
    output_tokens: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    worker: str = ""
    error: str = ""
    text: str = ""
    overlap_blocks: int = 0


@dataclass
class RunResult:
    concurrency: int
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def failures(self) -> int:
        return len(self.results) - len(self.ok)

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(r.output_tokens for r in self.ok) / self.wall_s if self.wall_s else 0.0

    def latency_ms(self, q: float) -> float:
        return percentile([r.latency_s for r in self.ok], q) * 1000

    def ttft_ms(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.ok], q) * 1000


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[min(998, max(0, int(q * 1000) - 1))]


async def one_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], *, stream: bool
) -> RequestResult:
    start = time.perf_counter()
    ttft = 0.0
    tokens = 0
    usage: dict[str, Any] = {}
    text: list[str] = []
    try:
        async with session.post(
            url, data=orjson.dumps({**body, "stream": stream}), headers={"Content-Type": "application/json"}
        ) as resp:
            worker = resp.headers.get("x-turbine-worker", "")
            overlap = int(resp.headers.get("x-turbine-overlap-blocks", "0"))
            if resp.status != 200:
                return RequestResult(False, time.perf_counter() - start, 0.0, 0, error=await resp.text())
            if not stream:
                payload = orjson.loads(await resp.read())
                usage = payload.get("usage") or {}
                choice = (payload.get("choices") or [{}])[0]
                text.append(choice.get("text") or (choice.get("message") or {}).get("content") or "")
                tokens = usage.get("completion_tokens", 0)
                ttft = time.perf_counter() - start
            else:
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    chunk = orjson.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if chunk.get("choices"):
                        if not ttft:
                            ttft = time.perf_counter() - start
                        tokens += 1
                        choice = chunk["choices"][0]
                        text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                if usage:
                    tokens = usage.get("completion_tokens", tokens)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return RequestResult(False, time.perf_counter() - start, 0.0, 0, error=repr(exc))
    details = usage.get("prompt_tokens_details") or {}
    return RequestResult(
        True,
        time.perf_counter() - start,
        ttft,
        tokens,
        usage.get("prompt_tokens", 0),
        details.get("cached_tokens", 0),
        worker,
        text="".join(text),
        overlap_blocks=overlap,
    )


async def run_closed_loop(
    url: str,
    bodies: Sequence[dict[str, Any]],
    *,
    concurrency: int,
    stream: bool,
    new_connection_per_request: bool = False,
    on_done: Callable[[RequestResult], None] | None = None,
) -> RunResult:
    """Send every body once, `concurrency` at a time, in order of a shared queue."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    connector = aiohttp.TCPConnector(limit=0, force_close=new_connection_per_request)
    timeout = aiohttp.ClientTimeout(total=600)
    run = RunResult(concurrency, 0.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                result = await one_request(session, url, body, stream=stream)
                run.results.append(result)
                if on_done is not None:
                    on_done(result)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - start
    return run


async def run_conversations(
    url: str,
    conversations: Sequence[tuple[list[dict[str, Any]], list[str]]],
    *,
    model: str,
    concurrency: int,
    max_tokens: int,
    on_done: Callable[[RequestResult], None] | None = None,
) -> RunResult:
    """Multi-turn chats: each conversation is (opening messages, later user turns). Turns of one
    conversation are sequential and carry the previous answers; `concurrency` conversations at once."""
    queue: asyncio.Queue[tuple[list[dict[str, Any]], list[str]]] = asyncio.Queue()
    for conv in conversations:
        queue.put_nowait(conv)
    run = RunResult(concurrency, 0.0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def client() -> None:
            while not queue.empty():
                opening, turns = queue.get_nowait()
                messages = list(opening)
                for i in range(len(turns) + 1):
                    if i:
                        messages.append({"role": "user", "content": turns[i - 1]})
                    body = {
                        "model": model,
                        "messages": messages,
                        "max_tokens": max_tokens,
                        "ignore_eos": True,
                        "stream_options": {"include_usage": True},
                    }
                    result = await one_request(session, url, body, stream=True)
                    run.results.append(result)
                    if on_done is not None:
                        on_done(result)
                    if not result.ok:
                        break
                    messages = [*messages, {"role": "assistant", "content": result.text}]

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        run.wall_s = time.perf_counter() - start
    return run
