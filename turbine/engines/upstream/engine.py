"""`UpstreamEngine`: one instance of a model served by an OpenAI-compatible server (one DP rank).

Lifecycle (the Engine seam): `start()` probes the server once and starts the poll loop, which
every `poll_interval_s` checks `/v1/models` (health), picks the prompt mode once (`--upstream-mode
auto`: token ids if the server takes them, else text), reads `/metrics` for load, expires the
sent-prompt history, and publishes `LoadMetrics`. A server that does not answer is marked
unhealthy and polled again with a doubling backoff (0.25 s to 10 s); while it is unhealthy,
`generate` refuses at once with `UpstreamUnavailable`, which the frontend treats like a draining
worker: it tries another instance (and answers 503 with Retry-After when none can take the
request) and skips this one for a moment. A request that finds the server gone, or whose stream
breaks mid-way, raises the same retriable error (so `--migration-limit` moves a started stream)
and wakes the poll loop at once.

KV events: with the engine's own events (`apply_engine_events`, fed by the ZMQ subscriber) the
blocks are re-keyed onto Turbine's hashes (`rekey.py`); without them the prompts this engine sent
stand in (`history.py`). Either way they go out on the worker's `EventSink` as ordinary Turbine
`KvEventBatch`es numbered from 0, and `kv_dump` answers with the same state, so the frontend's
router cannot tell an upstream from a native worker. When a server comes back after being down,
its cache is empty: the state is cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

import tokenizers

from turbine.engines.base import EngineCapacity, EventSink, NullEventSink
from turbine.engines.upstream.client import UpstreamClient
from turbine.engines.upstream.guided import guided_capabilities
from turbine.engines.upstream.history import SentHistory
from turbine.engines.upstream.kv_codec import EngineEvent
from turbine.engines.upstream.metrics import EngineLoad, parse_load
from turbine.engines.upstream.params import UPSTREAM_KNOBS, Mode, Retokenizer, completion_body, parse_chunk
from turbine.engines.upstream.rekey import Rekeyer
from turbine.errors import UpstreamUnavailable
from turbine.protocol.kv_events import KvDump, KvEvent, KvEventBatch, LoadMetrics
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.response import EngineOutput, FinishReason

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 10.0
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class UpstreamSettings:
    block_size: int
    context_length: int
    mode: str = "auto"  # auto | token | text
    poll_interval_s: float = 1.0
    # Whether the engine's KV events are followed; if not, the sent-prompt history stands in.
    kv_events: bool = False
    history_ttl_s: float = 120.0
    # The sampling knobs the server honours (SAMPLING_KNOBS names), listed in the card's capabilities.
    sampling_knobs: tuple[str, ...] = UPSTREAM_KNOBS
    # --upstream-guided-decoding: the server's structured-output dialect (turbine.choices.GUIDED_DIALECTS).
    guided_decoding: str = "none"
    # --request-stall-timeout-s: requests in flight and no byte from the server for this long,
    # and it does not answer a probe either: it hangs, and its streams are cut (0: never).
    stall_timeout_s: float = 0.0


class UpstreamEngine:
    def __init__(
        self,
        client: UpstreamClient,
        tokenizer: tokenizers.Tokenizer,
        settings: UpstreamSettings,
        *,
        worker_id: int = 0,
        events: EventSink | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.worker_id = worker_id
        self._tokenizer = tokenizer
        self._events = events or NullEventSink()
        self.mode: Mode | None = None if settings.mode == "auto" else Mode(settings.mode)
        self.model_id: str | None = None
        self.healthy = False
        self.in_flight = 0
        self.engine_load: EngineLoad | None = None
        self._has_metrics = True
        self._rekeyer = Rekeyer(settings.block_size)
        blocks = max(1, settings.context_length // settings.block_size)
        self._history = SentHistory(settings.block_size, blocks, settings.history_ttl_s)
        self._next_event_id = 0
        self._wake = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._ever_healthy = False
        # A poll must not outlast the stall timeout, or a frozen server's unanswered /metrics
        # would hold back the stall check behind it.
        stall = settings.stall_timeout_s
        self._probe_timeout_s = min(PROBE_TIMEOUT_S, stall) if stall > 0 else PROBE_TIMEOUT_S
        # Called when the server answers again after being down (the sidecar restarts the KV
        # event subscriber of this rank).
        self.on_recovered: Callable[[], None] | None = None

    # ------------------------------------------------------------------------------ lifecycle

    def capacity(self) -> EngineCapacity:
        s = self.settings
        capabilities = (*s.sampling_knobs, *guided_capabilities(s.guided_decoding))
        return EngineCapacity(kv_block_size=s.block_size, capabilities=capabilities)

    def set_events(self, events: EventSink, worker_id: int) -> None:
        self._events = events
        self.worker_id = worker_id

    async def start(self) -> None:
        await self._check_once()
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="upstream-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    # ------------------------------------------------------------------------------- polling

    async def _check(self) -> None:
        # While requests stream and the server answered, they are the health check: llama-cpp-
        # python's server interrupts the running completion when any request that uses the model
        # arrives, /v1/models included (and with --interrupt_requests false it queues it behind).
        if not (self.healthy and self.in_flight):
            model = await self.client.model(self._probe_timeout_s)
            self.model_id = model.id
        if self.mode is None and self.model_id is not None:
            probe = self._tokenizer.encode("Hello", add_special_tokens=False).ids or [0]
            takes_ids = await self.client.accepts_token_ids(self.model_id, list(probe), PROBE_TIMEOUT_S)
            self.mode = Mode.TOKEN if takes_ids else Mode.TEXT
            log.info("upstream %s: %s mode", self.client.base_url, self.mode.value)
        if self._has_metrics:
            text = await self.client.metrics(self._probe_timeout_s)
            if text is None:
                self._has_metrics = False  # llama.cpp servers: in-flight count only
            else:
                self.engine_load = parse_load(text, self.client.dp_rank)

    async def _check_once(self) -> bool:
        try:
            await self._check()
        except UpstreamUnavailable as exc:
            if self.healthy and self.in_flight:
                # A server busy with our requests may answer a probe late (llama-cpp-python queues
                # it behind the running completion); the streams report real failures themselves.
                log.debug("%s while %d request(s) stream; not counted", exc.message, self.in_flight)
                return True
            if self.healthy or not self._ever_healthy:
                log.warning("%s; retrying with backoff", exc.message)
            self.healthy = False
            return False
        if not self.healthy:
            if self._ever_healthy:
                log.info("upstream %s answers again", self.client.base_url)
                # Its cache may be gone (a restart): start over (with events, the subscriber
                # also re-reads the new process's events from the start).
                self.reset_kv()
                if self.on_recovered is not None:
                    self.on_recovered()
            self.healthy = self._ever_healthy = True
        return True

    async def _poll(self) -> None:
        delay = BACKOFF_MIN_S
        while True:
            ok = await self._check_stall() and await self._check_once()
            wait = self.settings.poll_interval_s if ok else delay
            delay = BACKOFF_MIN_S if ok else min(delay * 2, BACKOFF_MAX_S)
            if not self.settings.kv_events:
                self._publish_kv(self._history.expire())
            self._publish_load()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def _check_stall(self) -> bool:
        """False when the server hangs with our requests in flight: nothing came back on any of
        them for the stall timeout, and its HTTP side does not answer either (a frozen or cut-off
        server; one busy with a long prefill or a queue still answers). Its streams are then
        cut, so each raises `UpstreamUnavailable` and the frontend moves it to another worker."""
        timeout = self.settings.stall_timeout_s
        if timeout <= 0 or not self.in_flight:
            return True
        silent_s = self.client.silence(asyncio.get_running_loop().time())
        if silent_s < timeout:
            return True
        if await self.client.answers(self._probe_timeout_s):
            return True
        self.healthy = False
        cut = self.client.abort_streams()
        log.warning(
            "upstream %s silent for %.1f s with %d request(s) in flight, and not answering: cut them",
            self.client.base_url,
            silent_s,
            cut,
        )
        return False

    def _publish_load(self) -> None:
        load = self.engine_load if self._has_metrics else None
        total = max(1, self.settings.context_length // self.settings.block_size)
        used = int(load.kv_usage * total) if load is not None and load.kv_usage is not None else 0
        running = max(load.running, self.in_flight) if load is not None else self.in_flight
        waiting = load.waiting if load is not None else 0
        self._events.publish_load(LoadMetrics(self.worker_id, used, total, waiting, running))

    # ----------------------------------------------------------------------------- KV events

    def _publish_kv(self, events: Sequence[KvEvent]) -> None:
        if events:
            self._events.publish_kv_events(KvEventBatch(self.worker_id, self._next_event_id, list(events)))
            self._next_event_id += 1

    def apply_engine_events(self, events: Sequence[EngineEvent]) -> None:
        """The engine's own events (this rank's), from the ZMQ subscriber."""
        self._publish_kv(self._rekeyer.apply(list(events)))

    def reset_kv(self) -> None:
        """The engine's cache state is unknown or gone (a lost stretch of events, a restart)."""
        self._publish_kv(self._rekeyer.clear() if self.settings.kv_events else self._history.clear())

    def kv_dump(self) -> KvDump:
        held = self._rekeyer.cached() if self.settings.kv_events else self._history.cached()
        return KvDump(self.worker_id, held, self._next_event_id, self.settings.block_size)

    # ------------------------------------------------------------------------------ generate

    def _unavailable(self, why: str) -> UpstreamUnavailable:
        self.healthy = False
        self._wake.set()  # check now rather than at the next interval
        return UpstreamUnavailable(f"upstream {self.client.base_url}: {why}")

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        mode, model = self.mode, self.model_id
        if not self.healthy or mode is None or model is None:
            raise UpstreamUnavailable(f"upstream {self.client.base_url} is not answering")
        body = completion_body(
            request,
            mode=mode,
            model=model,
            tokenizer=self._tokenizer,
            guided_dialect=self.settings.guided_decoding,
        )
        retok = Retokenizer(self._tokenizer)
        finish: FinishReason | None = None
        cached: int | None = None
        prefilled = False
        self.in_flight += 1
        try:
            chunks = self.client.stream_completion(body)
            async with contextlib.aclosing(chunks) as stream:
                async for data in stream:
                    chunk = parse_chunk(data, self._tokenizer)
                    if chunk.error is not None:
                        yield EngineOutput(finish_reason=FinishReason.ERROR, error=chunk.error)
                        return
                    if chunk.cached_tokens is not None:
                        cached = chunk.cached_tokens
                    exact = mode is Mode.TOKEN and chunk.token_ids is not None
                    ids = (chunk.token_ids or []) if exact else retok.feed(chunk.text)
                    if not prefilled and (ids or chunk.text or chunk.finish_reason is not None):
                        prefilled = True
                        if not self.settings.kv_events:
                            self._publish_kv(self._history.record(request.token_ids))
                    if chunk.finish_reason is not None:
                        finish = chunk.finish_reason
                    if ids:
                        # Logprobs only where the ids are the server's own (aligned one to one).
                        lps = chunk.logprobs if exact and chunk.logprobs is not None else None
                        if lps is not None and len(lps) != len(ids):
                            lps = None
                        tops = chunk.top_logprobs if lps is not None else None
                        yield EngineOutput(ids, logprobs=lps, top_logprobs=tops)
            if finish is None:
                raise self._unavailable("the stream ended without a finish reason")
            yield EngineOutput(retok.flush(), finish_reason=finish, cached_tokens=cached)
        except UpstreamUnavailable as exc:
            self.healthy = False
            self._wake.set()
            raise exc from None
        finally:
            self.in_flight -= 1
