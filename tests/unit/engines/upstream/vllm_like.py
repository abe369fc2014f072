"""A small real HTTP server speaking vLLM's OpenAI-compatible surface, for tests of the upstream
engine where vLLM itself cannot run (no GPU): `/v1/models` (with `root` and `max_model_len`),
streamed `/v1/completions` taking token ids (`return_token_ids` → `token_ids` per chunk, usage with
`prompt_tokens_details.cached_tokens`), `/metrics` with vLLM's gauge names, and a prefix cache whose
blocks it announces as vLLM does: msgpack map-encoded `BlockStored`/`BlockRemoved` with sha256
block hashes chained from a per-process random seed, on a ZMQ PUB socket with a replay ROUTER.

`text_only=True` behaves like llama-cpp-python's server instead: string prompts only (422 for a list
of ints), no token ids back, no /metrics (404).

Generated tokens are a pure function of the context (like the mocker's), so a stream continued
elsewhere after a failure produces the same text. Run as a process for end-to-end tests:
`python -m tests.unit.engines.upstream.vllm_like --port P [--kv-events tcp://... --kv-replay ...]`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.unit.engines.upstream import engine_structs as es
from tests.unit.engines.upstream.publisher import TestPublisher
from turbine.models import bundled_model_path
from turbine.preprocess.tokenizer import load_model_files

TOKEN_RANGE = (300, 3000)


def next_token(context: list[int]) -> int:
    lo, hi = TOKEN_RANGE
    return lo + (sum(context[-3:]) * 31 + len(context) * 7) % (hi - lo)


class VllmLike:
    def __init__(
        self,
        *,
        model: str = "served-model",
        root: Path | None = None,
        text_only: bool = False,
        block_size: int = 16,
        num_blocks: int = 256,
        token_delay_s: float = 0.0,
        kv_events: str | None = None,
        kv_replay: str | None = None,
    ) -> None:
        self.model = model
        self.root = root or bundled_model_path()
        self.tokenizer = load_model_files(self.root).tokenizer
        self.text_only = text_only
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.token_delay_s = token_delay_s
        self.seed = os.urandom(8)  # vLLM seeds its block hashes per process unless PYTHONHASHSEED is set
        self.cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.bodies: list[dict[str, Any]] = []
        self.running = 0
        self.aborted = 0
        self.die_after_tokens: int | None = None  # cut every stream after this many tokens
        self._kv_events, self._kv_replay = kv_events, kv_replay
        self.publisher: TestPublisher | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/metrics", self._metrics)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        if self._kv_events is not None:
            self.publisher = TestPublisher(self._kv_events, self._kv_replay)

    async def _on_cleanup(self, app: web.Application) -> None:
        if self.publisher is not None:
            await self.publisher.close()

    async def _models(self, request: web.Request) -> web.Response:
        entry: dict[str, Any] = {"id": self.model, "object": "model", "owned_by": "vllm"}
        if not self.text_only:
            entry.update(root=str(self.root), max_model_len=8192)
        return web.json_response({"object": "list", "data": [entry]})

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.text_only:
            raise web.HTTPNotFound()
        usage = len(self.cache) / self.num_blocks
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="{self.model}"}} {self.running}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="{self.model}"}} 0\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="{self.model}"}} {usage}\n'
        )
        return web.Response(text=text, content_type="text/plain")

    # ----------------------------------------------------------------------------- prefix cache

    async def _cache_prompt(self, prompt: list[int]) -> int:
        """Cache the prompt's full blocks; returns the cached tokens found before (a prefix)."""
        bs = self.block_size
        hashes: list[bytes] = []
        parent = self.seed
        for i in range(len(prompt) // bs):
            block = prompt[i * bs : (i + 1) * bs]
            parent = hashlib.sha256(parent + json.dumps(block).encode()).digest()
            hashes.append(parent)
        hit = 0
        while hit < len(hashes) and hashes[hit] in self.cache:
            hit += 1
        new = [i for i, h in enumerate(hashes) if h not in self.cache]
        for h in hashes:
            self.cache[h] = None
            self.cache.move_to_end(h)
        events: list[Any] = []
        if new:
            first = new[0]
            events.append(
                es.MapBlockStored(
                    list(hashes[first:]),
                    hashes[first - 1] if first else None,
                    prompt[first * bs : len(hashes) * bs],
                    bs,
                )
            )
        evicted: list[int | bytes] = []
        while len(self.cache) > self.num_blocks:
            evicted.append(self.cache.popitem(last=False)[0])
        if evicted:
            events.append(es.MapBlockRemoved(evicted))
        if events and self.publisher is not None:
            await self.publisher.publish(es.map_batch(events, rank=0))
        return hit * bs

    # ------------------------------------------------------------------------------ generation

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if self.text_only or not all(isinstance(t, int) for t in prompt):
                return web.json_response({"detail": "prompt must be a string"}, status=422)
            ids = list(prompt)
        elif isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=False).ids)
        else:
            return web.json_response({"error": {"message": "bad prompt"}}, status=400)
        max_tokens = int(body.get("max_tokens") or 16)
        cached = await self._cache_prompt(ids)
        want_ids = bool(body.get("return_token_ids")) and not self.text_only
        if not body.get("stream"):
            out: list[int] = []
            for _ in range(max_tokens):
                out.append(next_token(ids + out))
            whole = {"index": 0, "text": self.tokenizer.decode(out), "finish_reason": "length"}
            return web.json_response({"choices": [whole]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.running += 1
        context = list(ids)
        try:
            for i in range(max_tokens):
                if self.die_after_tokens is not None and i >= self.die_after_tokens:
                    assert request.transport is not None
                    request.transport.abort()  # the server "dies": the connection drops
                    return resp
                token = next_token(context)
                context.append(token)
                choice: dict[str, Any] = {
                    "index": 0,
                    "text": self.tokenizer.decode([token]),
                    "finish_reason": "length" if i == max_tokens - 1 else None,
                }
                if want_ids:
                    choice["token_ids"] = [token]
                if body.get("logprobs") is not None and want_ids:
                    choice["logprobs"] = {
                        "tokens": [f"token_id:{token}"],
                        "token_logprobs": [-0.5],
                        "top_logprobs": [{f"token_id:{token}": -0.5, "token_id:301": -1.5}],
                    }
                await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
            usage = {
                "prompt_tokens": len(ids),
                "completion_tokens": max_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted += 1
            raise
        finally:
            self.running -= 1
        return resp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="served-model")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    parser.add_argument("--kv-events")
    parser.add_argument("--kv-replay")
    parser.add_argument("--text-only", action="store_true")
    args = parser.parse_args()
    server = VllmLike(
        model=args.model,
        text_only=args.text_only,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        token_delay_s=args.token_delay_s,
        kv_events=args.kv_events,
        kv_replay=args.kv_replay,
    )
    web.run_app(server.app(), host="127.0.0.1", port=args.port, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
