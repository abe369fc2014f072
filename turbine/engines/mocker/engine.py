"""MockerEngine: a GPU-free engine that behaves like vLLM serving an 8B model on one H100.

It simulates what routers and frontends can observe of a real engine: a paged KV cache with prefix
caching (and its KV events), continuous batching with chunked prefill and preemption, step times
from `timing.TimingModel` divided by `speedup_ratio`, load metrics, and deterministic output tokens.

The request side (streams, cancellation, KV events, load metrics) is `EngineCore`, shared with the
torch engine; this module is the mocker's executor: a step "runs" by sleeping for its simulated time.

Output tokens are a pure function of the token context: the token at position p is
XXH3(seed, index of p's block, chained hash of the last full block before p, the tokens after it
up to p), mapped into
`token_id_range`, with seed = `sampling.seed` (0 when unset). Identical requests therefore stream
identical tokens, different prompts diverge, and a request migrated with its generated tokens appended
to the prompt (and max_tokens reduced) continues exactly where it left off on any worker with the
same block size. Seeding from a hash of the prompt would break that last property, since migration
changes the prompt.

Logprobs (when the request asks for them) are a pure function of the same inputs, so a migrated
stream's logprobs equal an uninterrupted one's too: see `mock_logprobs`.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from turbine.engines.base import EventSink
from turbine.engines.core.engine import EngineCore, Executor
from turbine.engines.core.scheduler import Sampled, SchedulerConfig, Seq, StepPlan
from turbine.engines.embedding import hash_embedding
from turbine.engines.mocker.timing import TimingModel

_pack_block = struct.Struct("<QQQ").pack
_EOS_SALT = 0x5EED_E05
_LOGPROB_SALT = 0x1069_9F0B


@dataclass(frozen=True)
class MockerConfig:
    """Mocker settings; names follow `python -m dynamo.mocker`'s flags."""

    block_size: int = 64
    """Tokens per KV block; must match the router's block size for KV-aware routing."""
    num_gpu_blocks: int = 16384
    """KV blocks in the simulated cache."""
    max_num_seqs: int = 256
    """Most sequences running at once."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step (prefill chunks plus decodes)."""
    speedup_ratio: float = 1.0
    """Divides every simulated step time; 1e6 makes the mocker effectively instant."""
    enable_prefix_caching: bool = True
    """Reuse cached blocks across requests (and publish KV events for them)."""
    eos_probability: float = 0.0
    """Chance, per generated token, that the model ends the sequence (subject to min_tokens)."""
    token_id_range: tuple[int, int] = (1000, 32000)
    """[low, high) of generated token ids: ordinary tokens of the served tokenizer, no specials."""
    load_publish_interval_s: float = 1.0
    """Least time between two LoadMetrics publications; also the idle heartbeat period."""
    timing: TimingModel = field(default_factory=TimingModel)
    """Step-time coefficients, before speedup_ratio."""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MockerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.speedup_ratio <= 0:
            raise ValueError(f"MockerConfig.speedup_ratio must be positive, got {self.speedup_ratio}")
        if not 0.0 <= self.eos_probability <= 1.0:
            raise ValueError(f"MockerConfig.eos_probability must be in [0, 1], got {self.eos_probability}")
        low, high = self.token_id_range
        if not 0 <= low < high <= 1 << 32:
            raise ValueError(f"MockerConfig.token_id_range must satisfy 0 <= low < high, got {low, high}")
        if self.load_publish_interval_s < 0:
            raise ValueError("MockerConfig.load_publish_interval_s must be >= 0")


def mock_logprobs(
    context: bytes, token: int, k: int, token_id_range: tuple[int, int]
) -> tuple[float, list[tuple[int, float]]]:
    """The simulated model's distribution at one position, as (sampled token's logprob, top k).

    `context` identifies the position (seed, position, token context: what the sampled token was
    drawn from), so the result is a pure function of the request's seed and the token sequence so far.
    The simulated model samples greedily: the sampled token is the most likely one, with probability
    in [0.5, 0.99), and is the first of the top k; alternative i (1-based) takes a share of the
    remaining mass below half of the previous one's, so the list is strictly descending, every logprob
    is < 0 and the probabilities sum to less than 1. Alternatives are distinct ordinary token ids
    (fewer than k only when `token_id_range` is that small).
    """
    h = xxhash.xxh3_64_intdigest(context, _LOGPROB_SALT)
    p0 = 0.5 + 0.49 * (h & 0xFFFF_FFFF) / 2.0**32
    lp0 = math.log(p0)
    if not k:
        return lp0, []
    top = [(token, lp0)]
    rest = 1.0 - p0
    low, high = token_id_range
    span = high - low
    seen = {token}
    for i in range(1, min(k, span)):
        hi = xxhash.xxh3_64_intdigest(context, _LOGPROB_SALT + i)
        candidate = low + hi % span
        while candidate in seen:
            candidate = low + (candidate - low + 1) % span
        seen.add(candidate)
        jitter = 0.5 + 0.5 * (hi >> 32) / 2.0**32  # [0.5, 1)
        top.append((candidate, math.log(rest * 0.5**i * jitter)))
    return lp0, top


class _MockExecutor:
    """A step takes the timing model's time; tokens are a pure function of the token context."""

    def __init__(self, config: MockerConfig) -> None:
        self.config = config
        # Per running sequence: [block index, tokens hashed, XXH3 state over `_context`'s bytes so
        # far]. A decode step then hashes the one new token instead of re-packing the block's tail,
        # which is most of what the simulated model costs per token.
        self._ctx: dict[int, list[Any]] = {}

    async def execute(self, plan: StepPlan, scheduled_at: float) -> Callable[[Seq], Sampled]:
        loop = asyncio.get_running_loop()
        duration = self.config.timing.step_seconds(plan.shape, self.config.speedup_ratio)
        # Sleep to the step's end measured from its start, so scheduling overhead is not added on
        # top; sleep(0) at least, so that consumers run between steps even at huge speedups.
        await asyncio.sleep(max(0.0, scheduled_at + duration - loop.time()))
        return self.sample

    def release(self, seq: Seq) -> None:
        self._ctx.pop(seq.seq_id, None)

    def _digest(self, seq: Seq, p: int) -> int:
        """`xxh3_64(_context(seq, p))`, from the sequence's running hash state where it has one."""
        bs = seq.block_size
        full = p // bs
        st = self._ctx.get(seq.seq_id)
        if st is None or st[0] != full or st[1] > p:
            parent = seq.hashes.sequence[full - 1] if full else 0
            st = [full, full * bs, xxhash.xxh3_64(_pack_block(seq.seed, full, parent))]
            self._ctx[seq.seq_id] = st
        covered = st[1]
        if covered < p:
            tokens = seq.tokens
            st[2].update(_pack_u32(tokens[covered]) if p - covered == 1 else _pack_tail(tokens[covered:p]))
            st[1] = p
        digest: int = st[2].intdigest()
        return digest

    def sample(self, seq: Seq) -> Sampled:
        """The simulated model: a deterministic token for position len(seq.tokens)."""
        p = len(seq.tokens)
        h = self._digest(seq, p)
        low, high = self.config.token_id_range
        span = high - low
        token = low + h % span
        if seq.min_tokens and seq.num_output < seq.min_tokens:
            # As with logit masking for min_tokens: never pick a token that would stop the sequence.
            stopping = seq.stop_token_ids if seq.ignore_eos else seq.stop_token_ids | seq.eos_token_ids
            for _ in range(span):
                if token not in stopping:
                    break
                token = low + (token - low + 1) % span
        p_eos = self.config.eos_probability
        eos = p_eos > 0.0 and (
            p_eos >= 1.0 or xxhash.xxh3_64_intdigest(_context(seq, p), _EOS_SALT) < p_eos * 2.0**64
        )
        k = seq.sampling.logprobs
        if k is None:
            return Sampled(token, eos)
        lp, alternatives = mock_logprobs(_context(seq, p), token, k, self.config.token_id_range)
        return Sampled(token, eos, lp, alternatives)


class MockerEngine(EngineCore):
    """Implements `turbine.engines.base.Engine`; see the module docstring for the simulation."""

    name = "mocker"

    def __init__(self, config: MockerConfig, worker_id: int, events: EventSink) -> None:
        super().__init__(
            worker_id=worker_id,
            events=events,
            block_size=config.block_size,
            num_blocks=config.num_gpu_blocks,
            scheduler=SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
            enable_prefix_caching=config.enable_prefix_caching,
            load_publish_interval_s=config.load_publish_interval_s,
        )
        self.config = config
        self._executor = _MockExecutor(config)

    def executor(self) -> Executor:
        return self._executor

    async def embed(self, token_ids: list[int]) -> list[float]:
        """A deterministic hash vector (see `turbine.engines.embedding`); no scheduling or KV use."""
        return hash_embedding(token_ids)


def _pack_tail(tokens: list[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


def _pack_u32(token: int) -> bytes:
    return token.to_bytes(4, "little")


def _context(seq: Seq, p: int) -> bytes:
    """What the token at position `p` is drawn from: the seed, the index of `p`'s block, the chained
    hash of the last full block before `p` and the tokens after it (so equal contexts give equal
    tokens on any worker). With the block index, the tail's length fixes `p`."""
    bs = seq.block_size
    full = p // bs
    parent = seq.hashes.sequence[full - 1] if full else 0
    return _pack_block(seq.seed, full, parent) + _pack_tail(seq.tokens[full * bs : p])
