"""CUDA graphs for decode steps: one captured forward per padded batch size, replayed each step.

A decode step of a small model is mostly kernel-launch overhead when run eagerly (hundreds of small
kernels, each a few microseconds of CPU time to launch); a graph replays all of them with one launch.
Each graph reads its inputs from static buffers (token ids, positions, cache slots, block tables,
context lengths) that a step fills before `replay()`; a batch is padded up to the next captured size,
its padding rows writing their K/V to a scratch block no sequence owns. Every size is captured at
start-up (`capture_all`, largest first, so the smaller ones reuse its memory in the one pool they
share): a capture on the request path would stall every stream of the step.

A graph also computes the logits and the greedy tokens, and `launch()` only enqueues: the tokens
reach a pinned host buffer when the GPU gets there (`Launched.greedy_tokens()` waits). So the runner
can queue the next decode step behind this one, its token ids copied on the GPU from this step's
output, before the host has seen them (see `runner.py`). Two launches may be in flight at once; host
buffers alternate between two copies so that a queued launch never overwrites what the host is
about to read.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from turbine.engines.torch.attention import AttnMeta, DecodeBatch
from turbine.engines.torch.compile_watch import CompileWatch
from turbine.engines.torch.model import LlamaModel

BATCH_SIZES = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor
    logits: torch.Tensor
    tokens: torch.Tensor


@dataclass
class Launched:
    """A decode step enqueued on the GPU; views of its graph's outputs, valid until that graph's next
    replay."""

    batch: int
    hidden: torch.Tensor
    logits: torch.Tensor
    """Float32 logits, [batch, vocab]."""
    tokens: torch.Tensor
    """Greedy tokens on the GPU, [batch] (long)."""
    _host_tokens: torch.Tensor
    _done: torch.cuda.Event

    def greedy_tokens(self) -> list[int]:
        """Waits for the step, then its argmax token per row."""
        self._done.synchronize()
        tokens: list[int] = self._host_tokens[: self.batch].tolist()
        return tokens


class DecodeGraphs:
    """Owned by one runner thread; `run()` is called only from it."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        scratch_block: int,
        max_batch: int,
        max_blocks_per_seq: int,
        watch: CompileWatch | None = None,
    ) -> None:
        self.model = model
        self.watch = watch
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.sizes = [b for b in BATCH_SIZES if b < max_batch] + [max_batch]
        self.max_blocks = max_blocks_per_seq
        device = model.device
        n = self.sizes[-1]
        self._n = n
        self._scratch_slot = scratch_block * block_size
        # Every input in one int64 buffer, [ids | positions | slots | lens | tables], so a step fills a
        # pinned host copy and moves it with one transfer; the graphs read views of the device copy.
        total = 4 * n + n * max_blocks_per_seq
        self._device_buf = torch.zeros(total, dtype=torch.long, device=device)
        self._host_bufs = [torch.zeros(total, dtype=torch.long).pin_memory() for _ in range(2)]
        self._host_tokens = [torch.zeros(n, dtype=torch.long).pin_memory() for _ in range(2)]
        self._copied: list[Any] = [None, None]  # event after the last transfer out of each host buffer
        self._launches = 0
        buf = self._device_buf
        self.input_ids = buf[0:n]
        self.positions = buf[n : 2 * n]
        self.slots = buf[2 * n : 3 * n]
        self.lens = buf[3 * n : 4 * n]
        self.tables = buf[4 * n :].view(n, max_blocks_per_seq)
        self._graphs: dict[int, _Captured] = {}
        self._pool: Any = None

    def capture_all(self) -> list[int]:
        """Capture every batch size not captured yet, largest first; returns the sizes."""
        for size in reversed(self.sizes):
            if size not in self._graphs:
                self._capture(size)
        return list(self.sizes)

    def fits(self, batch: int, max_blocks: int) -> bool:
        return batch <= self.sizes[-1] and max_blocks <= self.max_blocks

    def run(
        self, input_ids: list[int], positions: list[int], slots: list[int], tables_in: list[list[int]]
    ) -> torch.Tensor:
        """Hidden states of a pure decode step (one token per sequence), [batch, hidden]."""
        return self.launch(input_ids, positions, slots, tables_in).hidden

    def launch(
        self,
        input_ids: list[int] | None,
        positions: list[int],
        slots: list[int],
        tables_in: list[list[int]],
        *,
        ids_from: Launched | None = None,
    ) -> Launched:
        """Enqueue a pure decode step (one token per sequence). Its token ids come from `input_ids`,
        or, when that is None, from the greedy tokens of the earlier launch `ids_from` (same rows),
        copied on the GPU without waiting for them."""
        batch = len(positions)
        size = self.sizes[bisect.bisect_left(self.sizes, batch)]
        captured = self._graphs.get(size) or self._capture(size)
        slot = self._launches % 2
        self._launches += 1
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the host buffer's previous transfer has left it
        host_buf = self._host_bufs[slot]
        n, host = self._n, host_buf.numpy()
        if input_ids is not None:
            host[:batch] = input_ids
        host[batch:size] = 0
        host[n : n + batch] = positions
        host[n + batch : n + size] = 0
        host[2 * n : 2 * n + batch] = slots
        host[2 * n + batch : 2 * n + size] = self._scratch_slot
        lens = host[3 * n : 4 * n]
        lens[:batch] = positions
        lens[:batch] += 1
        lens[batch:size] = 1
        tables = host[4 * n :].reshape(n, self.max_blocks)
        tables[:size] = 0
        for row, table in enumerate(tables_in):
            tables[row, : len(table)] = table
        # Only the rows of this size travel (the tables' rows are the buffer's tail).
        used = 4 * n + size * self.max_blocks
        self._device_buf[:used].copy_(host_buf[:used], non_blocking=True)
        if input_ids is None:
            assert ids_from is not None and ids_from.batch == batch
            self.input_ids[:batch].copy_(ids_from.tokens)
        copied: Any = torch.cuda.Event()  # type: ignore[no-untyped-call]
        copied.record()
        self._copied[slot] = copied
        captured.graph.replay()
        host_tokens = self._host_tokens[slot]
        host_tokens[:batch].copy_(captured.tokens[:batch], non_blocking=True)
        done: Any = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record()
        return Launched(
            batch,
            captured.hidden[:batch],
            captured.logits[:batch],
            captured.tokens[:batch],
            host_tokens,
            done,
        )

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttnMeta(
            slot_mapping=self.slots[:size],
            seqs=[],
            decode=DecodeBatch(rows=None, block_tables=self.tables[:size], context_lens=self.lens[:size]),
        )
        return self.model.forward(self.input_ids[:size], self.positions[:size], self.kv_cache, meta)

    def _capture(self, size: int) -> _Captured:
        if self.watch is not None:
            self.watch.record(f"a CUDA graph of decode batch {size}")
        # Padding rows of a warm-up write only the scratch block; warm up on a side stream (Triton
        # compiles and cuBLAS picks kernels there), then capture.
        self.slots[:size].fill_(self._scratch_slot)
        self.lens[:size].fill_(1)
        self.tables[:size].zero_()
        stream: Any = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                torch.argmax(self.model.logits(self._forward(size)), dim=-1)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self._forward(size)
            logits = self.model.logits(hidden)
            tokens = torch.argmax(logits, dim=-1)
        captured = _Captured(graph, hidden, logits, tokens)
        self._graphs[size] = captured
        return captured
