"""One model's request path: preprocessed request → route → dispatch (with retry) → text deltas."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import msgspec

from turbine.config import FrontendConfig
from turbine.errors import EngineError, ServiceUnavailable, WorkerDraining, WorkerStalled, WorkerUnreachable
from turbine.frontend.canary import Canary
from turbine.frontend.forced_calls import framed
from turbine.frontend.python_engine import PythonEngine
from turbine.postprocess.detokenizer import ByteLevelTable
from turbine.postprocess.logprobs import TokenStrings
from turbine.postprocess.parsers.output import (
    OutputParser,
    ParsedText,
    ParserSettings,
    make_output_parser,
    special_token_filter,
)
from turbine.postprocess.postprocessor import Postprocessor, TextDelta
from turbine.preprocess.preprocessor import Prepared, Preprocessor
from turbine.protocol.instance import Instance
from turbine.protocol.model_card import EMBED_ENDPOINT, ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import EngineOutput, FinishReason
from turbine.router.base import Decision, Router
from turbine.router.front import NO_HINTS, RouteHints, Routing, RoutingSettings
from turbine.router.health import HealthSettings, Quarantine
from turbine.router.kv_events import make_followers
from turbine.router.kv_router import KvRouter, LoadRouter
from turbine.router.replica_sync import ReplicaSync
from turbine.runtime.events.base import EventPlane
from turbine.runtime.transport.base import RequestPlaneClient

log = logging.getLogger(__name__)

_encode = msgspec.msgpack.Encoder().encode
_decode_output = msgspec.msgpack.Decoder(EngineOutput).decode
_decode_vectors = msgspec.msgpack.Decoder(list[list[float]]).decode


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    """How the frontend serves every model: built once from its config where the registry is made,
    read by the registry (which models, from where, how to preprocess) and by each model's pipeline
    (routing, migration, health checks, replica sync)."""

    namespace: str
    only_model: str | None = None
    """`--model-name`: serve this model only."""
    model_path_override: str | None = None
    """`--model-path`: load tokenizer and template from here rather than from the card's path."""
    migration_limit: int = 0
    tokenizer_cache_entries: int = 0
    exclude_tools_when_tool_choice_none: bool = False
    parser_overrides: ParserSettings = dataclasses.field(default_factory=ParserSettings)
    """`--tool-call-parser` / `--reasoning-parser`: win over every card's."""
    routing: RoutingSettings = dataclasses.field(default_factory=RoutingSettings)
    health: HealthSettings = dataclasses.field(default_factory=HealthSettings)
    replica_id: int | None = None
    """This frontend's id among router replicas that share load (None: it shares none)."""

    @classmethod
    def from_config(cls, cfg: FrontendConfig, replica_id: int | None = None) -> PipelineSettings:
        return cls(
            namespace=cfg.namespace,
            only_model=cfg.model_name,
            model_path_override=cfg.model_path,
            migration_limit=cfg.migration_limit,
            tokenizer_cache_entries=cfg.tokenizer_cache_entries,
            exclude_tools_when_tool_choice_none=cfg.exclude_tools_when_tool_choice_none,
            parser_overrides=ParserSettings(cfg.tool_call_parser, cfg.reasoning_parser),
            routing=RoutingSettings.from_config(cfg),
            health=HealthSettings(
                cfg.request_stall_timeout_s, cfg.health_check_interval_s, cfg.health_check_timeout_s
            ),
            replica_id=replica_id,
        )


class Generation:
    """The state of one request as it streams: which worker, token counts, and its text deltas."""

    __slots__ = ("_deltas", "decision", "migrations", "post", "prompt_tokens")

    def __init__(
        self,
        pipeline: ModelPipeline,
        request: PreprocessedRequest,
        stop_strings: list[str],
        hints: RouteHints = NO_HINTS,
        parser: OutputParser | None = None,
        special: Callable[[str], str] | None = None,
        named_call: bool = False,
        forced_markup: tuple[str, str] | None = None,
    ) -> None:
        """`parser`: the choice's reasoning/tool-call parser; `special`: set when the parsers' markers
        are special tokens, which then stay in the text and this removes the other special tokens;
        `named_call`: the output is a forced call of a named function (finishes with "stop");
        `forced_markup`: a forced call's markup, which the parser sees around the engine's output
        (`forced_calls.py`)."""
        self.prompt_tokens = len(request.token_ids)
        self.post = Postprocessor(
            pipeline.preprocessor.tokenizer.hf,
            stop_strings,
            pipeline.token_strings,
            skip_special_tokens=special is None,
            byte_table=pipeline.byte_table,
        )
        self.decision: Decision | None = None
        self.migrations = 0
        deltas = pipeline.dispatch(self, request, hints)
        if forced_markup is not None:
            deltas = framed(deltas, *forced_markup)
        self._deltas = (
            deltas if parser is None and special is None else _parsed(deltas, parser, special, named_call)
        )

    @property
    def completion_tokens(self) -> int:
        return self.post.completion_tokens

    @property
    def cached_tokens(self) -> int:
        return self.post.cached_tokens

    def usage(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    async def first(self) -> TextDelta:
        """Wait for the first delta (so errors before any output can still become an HTTP status)."""
        return await self._deltas.__anext__()

    def __aiter__(self) -> AsyncIterator[TextDelta]:
        return self._deltas

    async def aclose(self) -> None:
        await self._deltas.aclose()


class ModelPipeline:
    """Owns one model's preprocessor, router and live instance set."""

    def __init__(
        self,
        card: ModelDeploymentCard,
        preprocessor: Preprocessor,
        router: Router,
        client: RequestPlaneClient,
        settings: PipelineSettings,
        *,
        parsers: ParserSettings | None = None,
        engine: PythonEngine | None = None,
        events: EventPlane | None = None,
        sync_events: EventPlane | None = None,
    ) -> None:
        """`parsers`: those chat output goes through (the card's, or the frontend's overrides);
        `engine`: an in-process engine that serves instead of the workers; `events`: the shared event
        plane KV routers follow (None: the request plane); `sync_events`: where replica sync runs
        instead of `events` (the local channel between the processes of a --num-processes
        frontend)."""
        self.name = card.name
        self._engine = engine
        # The parsers chat output goes through (the card's, or the frontend's overrides).
        self.parsers = parsers or ParserSettings()
        # with tools? → the special-token filter its parsers need (None: skip special tokens).
        self._special: dict[bool, Callable[[str], str] | None] = {}
        self.card = card
        self.created = int(time.time())
        self.preprocessor = preprocessor
        # Token id → string/bytes for logprobs, decoded once per id for all of the model's requests.
        self.token_strings = TokenStrings(preprocessor.tokenizer.hf)
        # Byte-level tokenizers detokenize through a table shared by every request (or None).
        self.byte_table = ByteLevelTable.build(preprocessor.tokenizer.hf)
        self.router = router
        # Readiness, direct mode, session affinity and the router queue, around the router.
        self.routing = Routing(card.name, router, settings.routing)
        self._client = client
        self._migration_limit = settings.migration_limit
        self._instances: dict[int, Instance] = {}
        self._ids: list[int] = []
        # Workers routing skips for now: refused (briefly), stalled (until they answer a probe) or
        # failing canaries (until one passes).
        checks = settings.health
        self.health = Quarantine(card.name, getattr(client, "probe", None), checks.stall_timeout_s)
        self._canary: Canary | None = None
        if checks.check_interval_s > 0:
            probe_ids = preprocessor.tokenizer.hf.encode("Hello", add_special_tokens=False).ids or [0]
            self._canary = Canary(
                card.name,
                client,
                lambda: self._instances,
                self.health,
                list(probe_ids),
                checks.check_interval_s,
                checks.check_timeout_s,
            )
            self._canary.start()
        # A KV router fed by events follows the workers' events (one stream per worker over the
        # request plane, or one subscription on the shared event plane); other routers need none.
        self._followers = (
            make_followers(client, router, events, card.namespace, card.name)
            if isinstance(router, KvRouter) and router.wants_events
            else None
        )
        # --router-replica-sync: this frontend's routing load and its peers' meet on the event plane.
        # Session bindings travel the same way. `sync_events`, when given, carries it instead (the
        # local channel between the processes of one --num-processes frontend).
        sync_plane = sync_events if sync_events is not None else events
        self._replica_sync: ReplicaSync | None = None
        counting = router if isinstance(router, KvRouter | LoadRouter) else None
        replica_id = settings.replica_id
        if (
            replica_id is not None
            and sync_plane is not None
            and (counting is not None or self.routing.sessions is not None)
        ):
            self._replica_sync = ReplicaSync(
                sync_plane,
                card.namespace,
                card.name,
                replica_id,
                counting,
                on_batch=self.routing.apply_peer_batch,
            )
            self.routing.announce_with(self._replica_sync.publish)
            self._replica_sync.start()

    # ------------------------------------------------------------------ instances (from discovery)

    def set_instances(self, instances: dict[int, Instance], cards: dict[int, ModelDeploymentCard]) -> None:
        self._instances = dict(instances)
        self._ids = sorted(self._instances)
        self.health.retain(self._ids)
        self.routing.update_instances({i: cards[i] for i in self._ids})
        if self._followers is not None:
            self._followers.sync(self._instances)

    async def close(self) -> None:
        """Stop following workers' events (the model left, or the frontend is stopping)."""
        self.routing.close()
        await self.health.close()
        if self._canary is not None:
            await self._canary.close()
        if self._followers is not None:
            await self._followers.close()
        if self._replica_sync is not None:
            await self._replica_sync.close()

    @property
    def instance_ids(self) -> list[int]:
        return self._ids

    # ------------------------------------------------------------------------------- requests

    def generate(self, prepared: Prepared, hints: RouteHints = NO_HINTS) -> Generation:
        """The request's single generation (its first choice when n > 1)."""
        return Generation(self, prepared.request, prepared.stop_strings, hints)

    def generate_choices(self, prepared: Prepared, hints: RouteHints = NO_HINTS) -> list[Generation]:
        """One generation per choice (`n`), each routed on its own; chat output goes through the
        model's reasoning and tool-call parsers."""
        if not prepared.parse_output:
            return [Generation(self, request, prepared.stop_strings, hints) for request in prepared.choices()]
        with_tools = prepared.tools is not None
        if with_tools not in self._special:
            markers = self.parsers.markers(with_tools)
            hf = self.preprocessor.tokenizer.hf
            self._special[with_tools] = special_token_filter(hf, markers) if markers else None
        special = self._special[with_tools]
        return [
            Generation(
                self,
                request,
                prepared.stop_strings,
                hints,
                make_output_parser(self.parsers, prepared.tools),
                special,
                prepared.named_call,
                prepared.forced_markup,
            )
            for request in prepared.choices()
        ]

    async def embed(self, batch: list[list[int]], hints: RouteHints = NO_HINTS) -> list[list[float]]:
        """One vector per token id list, from one instance the router picks (another on failure)."""
        payload = _encode(batch)
        probe = PreprocessedRequest(
            f"embd-{uuid.uuid4().hex}", self.name, batch[0], SamplingOptions(), StopConditions(max_tokens=1)
        )
        excluded: set[int] = set()
        while self._candidates(excluded):
            decision = await self.routing.route(probe, hints, lambda: self._candidates(excluded))
            instance = self._instances[decision.instance_id]
            try:
                async with contextlib.aclosing(
                    self._client.stream(instance.address, EMBED_ENDPOINT, payload)
                ) as s:
                    async for frames in s:
                        return _decode_vectors(frames[0])
                raise WorkerUnreachable(f"worker {instance.instance_id:x} sent no embeddings")
            except (WorkerUnreachable, WorkerDraining) as exc:
                log.warning("embed: %s; retrying on another worker", exc.message)
                excluded.add(instance.instance_id)
                self._skip(instance, exc)
            finally:
                self.routing.finish(probe.request_id, decision)
        raise ServiceUnavailable(f"no worker of model '{self.name}' could take the request")

    def _candidates(self, excluded: set[int]) -> list[int]:
        if not excluded and not self.health:
            return self._ids  # the common case, without a copy per request
        now = time.monotonic()
        live = [i for i in self._ids if i not in excluded]
        healthy = [i for i in live if self.health.healthy(i, now)]
        return healthy or live

    def _skip(self, instance: Instance, exc: WorkerUnreachable | WorkerDraining) -> None:
        if isinstance(exc, WorkerStalled):
            self.health.stalled(instance.instance_id, instance.address)
        else:
            self.health.unreachable(instance.instance_id)

    async def dispatch(
        self, gen: Generation, request: PreprocessedRequest, hints: RouteHints
    ) -> AsyncGenerator[TextDelta, None]:
        """`request`'s text deltas from a worker the router picks: before any output, a worker that
        cannot take it is skipped for another; after, the stream migrates (`--migration-limit`).
        `gen` is the generation they are for: its postprocessor makes the deltas, and the routing
        decision and migrations are recorded on it (`Generation` starts this, one per choice)."""
        if self._engine is not None:
            async for delta in _python_engine_deltas(self._engine, gen, request):
                yield delta
            return
        original = request
        payload = _encode(request)
        post = gen.post
        excluded: set[int] = set()
        generated: list[int] = []
        max_seq_len = self.routing.settings.migration_max_seq_len
        while True:
            if not self._candidates(excluded):
                if excluded:
                    raise ServiceUnavailable(f"no worker of model '{self.name}' could take the request")
                raise ServiceUnavailable(f"model '{self.name}' has no live workers")
            decision = await self.routing.route(request, hints, lambda: self._candidates(excluded))
            instance = self._instances[decision.instance_id]
            gen.decision = decision
            started = False
            canary = self._canary
            try:
                stream = self._client.stream(instance.address, instance.endpoint, payload)
                async with contextlib.aclosing(stream) as batches:
                    async for batch in batches:
                        if canary is not None:
                            canary.served(instance.instance_id)  # it produces: no canary this round
                        if not started:
                            started = True
                            self.routing.first_token(request.request_id, decision)
                        # Each frame is its own delta (its own SSE event), also when several
                        # arrived together: a client sees every step's token as the step made it.
                        for frame in batch:
                            out = _decode_output(frame)
                            if out.error is not None:
                                raise EngineError(f"worker {instance.instance_id:x}: {out.error}")
                            generated += out.token_ids
                            delta = post.process(out)
                            if delta.finish_reason is not None:
                                yield delta
                                return
                            if delta.text or delta.logprobs:
                                yield delta
                raise WorkerUnreachable(f"worker {instance.instance_id:x} ended the stream without finishing")
            except (WorkerUnreachable, WorkerDraining) as exc:
                excluded.add(instance.instance_id)
                self._skip(instance, exc)
                if started:
                    if gen.migrations >= self._migration_limit:
                        raise
                    seq_len = len(original.token_ids) + len(generated)
                    if max_seq_len is not None and seq_len > max_seq_len:
                        log.warning(
                            "request %s: %s; not migrating %d tokens (--migration-max-seq-len %d)",
                            request.request_id,
                            exc.message,
                            seq_len,
                            max_seq_len,
                        )
                        raise
                    # Migration: the client keeps its stream; another worker continues from the
                    # tokens generated so far (the prompt grows by them, the budget shrinks).
                    gen.migrations += 1
                    request = _continuation(original, generated)
                    payload = _encode(request)
                    log.warning(
                        "request %s: %s; migrating after %d token(s) (%d/%d)",
                        request.request_id,
                        exc.message,
                        len(generated),
                        gen.migrations,
                        self._migration_limit,
                    )
                else:
                    # Nothing came back yet, so another worker can take the request as it is.
                    log.warning("request %s: %s; retrying on another worker", request.request_id, exc.message)
            finally:
                self.routing.finish(request.request_id, decision)
                if self._canary is not None:
                    self._canary.served(instance.instance_id)


async def _python_engine_deltas(
    engine: PythonEngine, gen: Generation, request: PreprocessedRequest
) -> AsyncGenerator[TextDelta, None]:
    outputs = engine(request)
    try:
        async for out in outputs:
            if out.error is not None:
                raise EngineError(f"python engine: {out.error}")
            delta = gen.post.process(out)
            if delta.text or delta.logprobs or delta.finish_reason is not None:
                yield delta
            if delta.finish_reason is not None:
                return
        raise EngineError("python engine ended the stream without a finish reason")
    finally:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()


async def _parsed(
    deltas: AsyncGenerator[TextDelta, None],
    parser: OutputParser | None,
    special: Callable[[str], str] | None,
    named_call: bool = False,
) -> AsyncGenerator[TextDelta, None]:
    """The choice's deltas through its parser: reasoning and tool calls split off the text, text that
    may be markup held back; a stream that produced calls and stopped finishes with "tool_calls"
    (with "stop" when the call was forced by naming the function, as OpenAI's does)."""
    try:
        async for delta in deltas:
            text = delta.text if special is None else special(delta.text)
            finish = delta.finish_reason
            if parser is None:
                parsed = ParsedText(text)
            else:
                parsed = parser.feed(text)
                if finish is not None:
                    tail = parser.finish()
                    parsed = ParsedText(
                        parsed.content + tail.content,
                        parsed.reasoning + tail.reasoning,
                        parsed.calls + tail.calls,
                    )
                    if parser.called and finish is FinishReason.STOP and not named_call:
                        finish = FinishReason.TOOL_CALLS
            if parsed.content or parsed.reasoning or parsed.calls or delta.logprobs or finish is not None:
                yield TextDelta(parsed.content, finish, delta.logprobs, parsed.reasoning, parsed.calls)
    finally:
        await deltas.aclose()


def _continuation(original: PreprocessedRequest, generated: list[int]) -> PreprocessedRequest:
    stop = original.stop
    n = len(generated)
    # Penalties over the output keep counting what was generated before the move.
    sampling = msgspec.structs.replace(
        original.sampling, prior_output_tokens=original.sampling.prior_output_tokens + n
    )
    return msgspec.structs.replace(
        original,
        token_ids=[*original.token_ids, *generated],
        sampling=sampling,
        stop=msgspec.structs.replace(
            stop, max_tokens=max(1, stop.max_tokens - n), min_tokens=max(0, stop.min_tokens - n)
        ),
    )
