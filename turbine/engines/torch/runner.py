"""The torch engine's executor: a scheduled step → tensors → one forward → sampled tokens.

`execute()` snapshots what the step needs from the scheduler's sequences on the event loop (token
ids, positions, block tables, sampling knobs), then runs the forward and the sampler on the runner's
own thread, so the loop keeps serving while the model computes (torch releases the GIL in kernels).
Logits are computed only for sequences whose context the step completes: a prefill chunk that is not
a prompt's last produces no token.

On CUDA, a pure decode step of greedy rows queues the next decode step on the GPU before it waits for
its own tokens (run-ahead): the next step's token ids are this step's argmax, copied on the GPU, and
its positions and slots are one further in the same blocks. While the GPU runs it, the host delivers
this step's tokens and schedules the next one. If that schedule is exactly what was queued (same
rows, tokens, positions, slots and block tables), the queued launch is its result; otherwise the
queued work is dropped. A dropped launch can only have written K/V one slot past a sequence's
accepted tokens, in its own still-partial last block: the next real step writes the same slot with
the same values, or the block was freed (partial blocks are never in the prefix cache) and anything
that reuses it writes later on the same stream. This hides the host's per-step work (scheduling,
delivery, the thread hop) behind the GPU's, which is what bounds batch-1 decode of small models.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from turbine.engines.core.block_manager import BlockManager
from turbine.engines.core.scheduler import Sampled, Seq, StepPlan
from turbine.engines.torch.attention import build_meta
from turbine.engines.torch.buckets import bucket, buckets
from turbine.engines.torch.cuda_graphs import DecodeGraphs, Launched
from turbine.engines.torch.grammar import Guides, constrain
from turbine.engines.torch.logits_processors import TokenCounts, row_adjust
from turbine.engines.torch.model import LlamaModel
from turbine.engines.torch.sampler import RowParams, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a knob unset gets (the model's generation_config, else vLLM's)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0


@dataclass
class _Step:
    input_ids: list[int]
    positions: list[int]
    chunks: list[tuple[list[int], int, int]]
    sample_rows: list[int]
    """Row of the last new token of each sequence that samples, in `sample_ids` order."""
    sample_ids: list[int]
    params: list[RowParams]
    continues: bool = True
    """Every sequence may still produce a token after this step's (max_tokens allows it)."""


@dataclass
class _Ahead:
    """A decode step queued on the GPU before the scheduler asked for it."""

    launched: Launched
    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    tables: list[list[int]]

    def matches(
        self, input_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]]
    ) -> bool:
        return (
            input_ids == self.input_ids
            and positions == self.positions
            and slots == self.slots
            and tables == self.tables
        )


class TorchExecutor:
    """Implements `turbine.engines.core.engine.Executor` with a real model."""

    run_ahead = True
    """Queue the next greedy decode step before this one's tokens are back (CUDA graphs only)."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        blocks: BlockManager,
        defaults: SamplingDefaults,
        *,
        decode_kernel: bool = False,
        graphs: DecodeGraphs | None = None,
        step_lock: threading.Lock | None = None,
        guides: Guides | None = None,
        prefill_kernel: bool = False,
        pad_steps: bool = False,
    ) -> None:
        """`prefill_kernel`: prefill chunks through the paged Triton kernel (CUDA), not gather + SDPA.
        `pad_steps`: pad every prefill or mixed step to a size of `buckets.py` (with a filler chunk on
        the scratch block) and its sampled rows likewise, once `warm_up` has run every such size."""
        self.model = model
        self.prefill_kernel = prefill_kernel
        self.pad_steps = pad_steps
        self._scratch: int | None = None
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.defaults = defaults
        self.decode_kernel = decode_kernel
        self.graphs = graphs
        self._step_lock = step_lock
        self.guides = guides
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-runner")
        self._generators: dict[int, torch.Generator] = {}
        self._steady: dict[int, RowParams] = {}
        """Each sequence's knobs while they stay the same from step to step (`_params`)."""
        self._counts = TokenCounts(model.arch.vocab_size, model.device)
        """Token counts of the sequences with penalties (logits_processors.py)."""
        self._ahead: _Ahead | None = None
        self.ahead_hits = 0
        """Steps served by a launch queued ahead (for tests and benchmarks)."""
        self.ahead_queued = 0
        self.graph_steps = 0
        self.eager_steps = 0

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        log.info(
            "torch runner: %d steps: %d decode steps by CUDA graph (%d of %d launches queued ahead "
            "used), %d eager (prefill, mixed, or no graph)",
            self.graph_steps + self.eager_steps,
            self.graph_steps,
            self.ahead_hits,
            self.ahead_queued,
            self.eager_steps,
        )
        if self.guides is not None:
            self.guides.close()

    async def execute(self, plan: StepPlan, scheduled_at: float) -> Callable[[Seq], Sampled]:
        step = self._snapshot(plan)
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._thread, self._locked_run, step)
        return lambda seq: results[seq.seq_id]

    def release(self, seq: Seq) -> None:
        self._generators.pop(seq.seq_id, None)
        self._steady.pop(seq.seq_id, None)
        self._counts.release(seq.seq_id)
        if self.guides is not None:
            self.guides.release(seq.seq_id)

    async def warm_up(self, scratch_block: int, full_step_tokens: int = 0, max_seqs: int = 1) -> list[int]:
        """Compile and capture, before serving, whatever the request path would otherwise meet
        first; returns the decode batch sizes captured as CUDA graphs. `full_step_tokens` > 0: also
        run a step of that many prefill tokens (the budget), so the allocator holds a full step's
        activations before the first request needs them; with `pad_steps`, a step of every padded
        size up to it, and the logits of every padded count of sampled rows up to `max_seqs`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, self._locked_warm_up, scratch_block, full_step_tokens, max_seqs
        )

    # ---- on the event loop ---------------------------------------------------------------------

    def _snapshot(self, plan: StepPlan) -> _Step:
        step = _Step([], [], [], [], [], [])
        input_ids, positions, chunks = step.input_ids, step.positions, step.chunks
        table_of = self.blocks.block_table
        continues = True
        for seq, num_new, _ in plan.chunks:
            start = seq.num_computed
            end = start + num_new
            tokens = seq.tokens
            if num_new == 1:  # a decode, most rows of most steps
                input_ids.append(tokens[start])
                positions.append(start)
            else:
                input_ids += tokens[start:end]
                positions += range(start, end)
            chunks.append((list(table_of(seq.seq_id)), start, num_new))
            if end == len(tokens):
                step.sample_rows.append(len(input_ids) - 1)
                step.sample_ids.append(seq.seq_id)
                step.params.append(self._params(seq))
                continues = continues and end - seq.prompt_len + 2 <= seq.max_tokens
        step.continues = continues
        return step

    def _params(self, seq: Seq) -> RowParams:
        """The row's knobs; the same object every step while nothing in them can change (no
        grammar, penalties or bias, past `min_tokens`), built anew otherwise."""
        params = self._steady.get(seq.seq_id)
        if params is None:
            params = self._new_params(seq)
            if params.guide is None and params.adjust is None and seq.num_output >= seq.min_tokens:
                self._steady[seq.seq_id] = params
        return params

    def _new_params(self, seq: Seq) -> RowParams:
        s, d = seq.sampling, self.defaults
        generator = None
        if s.seed is not None:
            generator = self._generators.get(seq.seq_id)
            if generator is None:
                generator = torch.Generator(device=self.model.device)
                generator.manual_seed(seq.seed)
                self._generators[seq.seq_id] = generator
        banned: list[int] = []
        if seq.num_output < seq.min_tokens:
            stopping = seq.stop_token_ids if seq.ignore_eos else seq.stop_token_ids | seq.eos_token_ids
            banned = sorted(t for t in stopping if 0 <= t < self.model.arch.vocab_size)
        return RowParams(
            temperature=d.temperature if s.temperature is None else s.temperature,
            top_p=d.top_p if s.top_p is None else s.top_p,
            top_k=d.top_k if s.top_k is None else s.top_k,
            min_p=d.min_p if s.min_p is None else s.min_p,
            generator=generator,
            logprobs=s.logprobs,
            banned=banned,
            adjust=row_adjust(seq, self._counts),
            guide=self.guides.row(seq) if self.guides is not None else None,
        )

    # ---- on the runner thread ------------------------------------------------------------------

    def _locked_run(self, step: _Step) -> dict[int, Sampled]:
        if self._step_lock is None:
            results = self._run(step)
        else:
            with self._step_lock:
                results = self._run(step)
        if self.guides is not None:
            self._speculate(self.guides, step, results)
        return results

    def _speculate(self, guides: Guides, step: _Step, results: dict[int, Sampled]) -> None:
        """Start the guided rows' next masks from the tokens just sampled (`Guides.speculate`)."""
        rows, tokens = [], []
        for sid, params in zip(step.sample_ids, step.params, strict=True):
            if params.guide is not None:
                rows.append(params.guide)
                tokens.append(results[sid].token_id)
        guides.speculate(rows, tokens)

    @torch.inference_mode()
    def _run(self, step: _Step) -> dict[int, Sampled]:
        model = self.model
        device = model.device
        graphs = self.graphs
        if self.guides is not None:
            self.guides.prepare([g for p in step.params if (g := p.guide) is not None])
        if graphs is not None and len(step.chunks) == len(step.input_ids):  # one token each: decode
            bs = self.blocks.block_size
            tables = [
                table[: pos // bs + 1] for (table, _, _), pos in zip(step.chunks, step.positions, strict=True)
            ]
            if graphs.fits(len(tables), max(len(t) for t in tables)):
                return self._graph_decode(graphs, step, tables)
        self._ahead = None
        self.eager_steps += 1
        chunks, input_ids, positions = step.chunks, step.input_ids, step.positions
        if self.pad_steps and self._scratch is not None:
            filler = bucket(len(input_ids)) - len(input_ids)
            if filler:
                chunks = chunks + self._filler(filler)
                input_ids = input_ids + [0] * filler
                positions = positions + [p for _, start, n in chunks[len(step.chunks) :] for p in range(n)]
        meta = build_meta(
            chunks,
            self.blocks.block_size,
            device,
            sliding_window=model.arch.sliding_window,
            decode_kernel=self.decode_kernel,
            gather_decodes=device.type == "cpu" and not self.decode_kernel,
            dtype=model.dtype,
            prefill_kernel=self.prefill_kernel,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        hidden = model.forward(ids, pos, self.kv_cache, meta)
        return self._sample(hidden, step)

    def _filler(self, tokens: int) -> list[tuple[list[int], int, int]]:
        """Prefill chunks of `tokens` tokens in all on the scratch block no sequence owns, none
        longer than the model's context: they pad a step, and their rows are never read."""
        assert self._scratch is not None
        bs = self.blocks.block_size
        longest = max(1, min(tokens, self.model.arch.max_position_embeddings - 1))
        lengths = [longest] * (tokens // longest)
        if tokens % longest:
            lengths.append(tokens % longest)
        return [([self._scratch] * -(-n // bs), 0, n) for n in lengths]

    def _locked_warm_up(self, scratch_block: int, full_step_tokens: int, max_seqs: int) -> list[int]:
        if self._step_lock is None:
            return self._warm_up(scratch_block, full_step_tokens, max_seqs)
        with self._step_lock:
            return self._warm_up(scratch_block, full_step_tokens, max_seqs)

    @torch.inference_mode()
    def _warm_up(self, scratch: int, full_step_tokens: int, max_seqs: int) -> list[int]:
        """A mixed step (a prefill from scratch, one after a cached prefix, a decode), a full-budget
        prefill step if asked (with `pad_steps`: one of every padded size, and the logits of every
        padded row count), and the decode kernel at every split count, all on the scratch block no
        sequence owns; then every CUDA graph."""
        model, bs = self.model, self.blocks.block_size
        self._scratch = scratch
        table = [scratch] * 4
        self._warm_step([(table, 0, bs + 3), (table, bs, 5), (table, 2 * bs, 1)])
        sizes = buckets(full_step_tokens) if self.pad_steps and full_step_tokens > 0 else [full_step_tokens]
        for size in sizes:
            if size > 0:
                self._warm_step(self._filler(size))
        if self.pad_steps:
            width, dtype = model.arch.hidden_size, model.dtype
            for rows in buckets(max_seqs, floor=8):
                model.logits(torch.zeros((rows, width), dtype=dtype, device=model.device))
        if model.device.type != "cuda":
            return []
        if self.decode_kernel:
            from turbine.engines.torch.triton_decode import paged_decode

            k, v = self.kv_cache[0]
            q = torch.zeros(
                (1, model.arch.num_heads, model.arch.head_dim), dtype=model.dtype, device=model.device
            )
            tables = torch.full((1, 16), scratch, dtype=torch.int32, device=model.device)
            lens = torch.full((1,), 16 * bs, dtype=torch.int32, device=model.device)
            for splits in (1, 2, 4, 8, 16):
                paged_decode(q, k, v, tables, lens, 1.0, splits=splits)
        sizes = self.graphs.capture_all() if self.graphs is not None else []
        torch.cuda.synchronize(model.device)
        return sizes

    def _warm_step(self, chunks: list[tuple[list[int], int, int]]) -> None:
        """One forward of `chunks` (block table, computed before, new tokens) and its last logits."""
        model = self.model
        positions = [p for _, start, n in chunks for p in range(start, start + n)]
        meta = build_meta(
            chunks,
            self.blocks.block_size,
            model.device,
            sliding_window=model.arch.sliding_window,
            decode_kernel=self.decode_kernel,
            gather_decodes=model.device.type == "cpu" and not self.decode_kernel,
            dtype=model.dtype,
            prefill_kernel=self.prefill_kernel,
        )
        ids = torch.zeros(len(positions), dtype=torch.long, device=model.device)
        pos = torch.tensor(positions, dtype=torch.long, device=model.device)
        model.logits(model.forward(ids, pos, self.kv_cache, meta)[-2:])

    def _graph_decode(self, graphs: DecodeGraphs, step: _Step, tables: list[list[int]]) -> dict[int, Sampled]:
        bs = self.blocks.block_size
        slots = [t[-1] * bs + pos % bs for t, pos in zip(tables, step.positions, strict=True)]
        ahead, self._ahead = self._ahead, None
        self.graph_steps += 1
        if ahead is not None and ahead.matches(step.input_ids, step.positions, slots, tables):
            launched = ahead.launched
            self.ahead_hits += 1
        else:
            launched = graphs.launch(step.input_ids, step.positions, slots, tables)
        if not all(p.plain_greedy for p in step.params):
            sampled = sample(launched.logits, step.params)
            return dict(zip(step.sample_ids, sampled, strict=True))
        if any(p.guide is not None for p in step.params):
            launched = _constrained(launched, step.params)
        nxt = [pos + 1 for pos in step.positions]
        if self.run_ahead and step.continues and all(p % bs for p in nxt):  # no new block needed
            nxt_slots = [slot + 1 for slot in slots]
            queued = graphs.launch(None, nxt, nxt_slots, tables, ids_from=launched)
            self._ahead = _Ahead(queued, [], nxt, nxt_slots, tables)
            self.ahead_queued += 1
        tokens = launched.greedy_tokens()
        if self._ahead is not None:
            self._ahead.input_ids = tokens
        return {sid: Sampled(tok) for sid, tok in zip(step.sample_ids, tokens, strict=True)}

    def _sample(self, hidden: torch.Tensor, step: _Step) -> dict[int, Sampled]:
        if not step.sample_rows:
            return {}
        wanted = step.sample_rows
        if self.pad_steps and len(wanted) > 1:  # one row takes the GEMV kernel, whatever its shape
            wanted = wanted + [wanted[-1]] * (bucket(len(wanted), floor=8) - len(wanted))
        if len(wanted) != hidden.shape[0] or wanted != list(range(len(wanted))):
            rows = torch.tensor(wanted, dtype=torch.long, device=hidden.device)
            hidden = hidden.index_select(0, rows)
        logits = self.model.logits(hidden)[: len(step.sample_rows)]
        sampled = sample(logits, step.params)
        return dict(zip(step.sample_ids, sampled, strict=True))


def _constrained(launched: Launched, params: list[RowParams]) -> Launched:
    """`launched` with the greedy tokens of its guided rows chosen under their grammars, still on
    the GPU: the next decode step can be queued from them before the host reads them (the rows'
    masks were computed while this step's forward ran)."""
    rows = [i for i, p in enumerate(params) if p.guide is not None]
    logits = constrain(launched.logits, rows, [g for p in params if (g := p.guide) is not None])
    tokens = torch.argmax(logits, dim=-1)
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    done: Any = torch.cuda.Event()  # type: ignore[no-untyped-call]
    done.record()
    return Launched(launched.batch, launched.hidden, logits, tokens, host, done)
