"""CUDA graphs for decode steps: one captured forward per padded batch size, replayed each step.

A decode step of a small model is mostly kernel-launch overhead when run eagerly (hundreds of small
kernels, each a few microseconds of CPU time to launch); a graph replays all of them with one launch.
Each graph reads its inputs from static buffers (token ids, positions, cache slots, block tables,
context lengths) that a step fills before `replay()`; a batch is padded up to the next captured size,
its padding rows writing their K/V to a scratch block no sequence owns. Graphs are captured lazily,
the first time a size is needed, and share one memory pool.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from turbine.engines.torch.attention import AttnMeta, DecodeBatch
from turbine.engines.torch.model import LlamaModel

BATCH_SIZES = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256]


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
    ) -> None:
        self.model = model
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
        self._host_buf = torch.zeros(total, dtype=torch.long).pin_memory()
        self._host = self._host_buf.numpy()
        buf = self._device_buf
        self.input_ids = buf[0:n]
        self.positions = buf[n : 2 * n]
        self.slots = buf[2 * n : 3 * n]
        self.lens = buf[3 * n : 4 * n]
        self.tables = buf[4 * n :].view(n, max_blocks_per_seq)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None

    def fits(self, batch: int, max_blocks: int) -> bool:
        return batch <= self.sizes[-1] and max_blocks <= self.max_blocks

    def run(
        self, input_ids: list[int], positions: list[int], slots: list[int], tables_in: list[list[int]]
    ) -> torch.Tensor:
        """Hidden states of a pure decode step (one token per sequence), [batch, hidden]."""
        batch = len(input_ids)
        size = self.sizes[bisect.bisect_left(self.sizes, batch)]
        graph, out = self._graphs.get(size) or self._capture(size)
        n, host = self._n, self._host
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
        self._device_buf[:used].copy_(self._host_buf[:used], non_blocking=True)
        graph.replay()
        return out[:batch]

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttnMeta(
            slot_mapping=self.slots[:size],
            seqs=[],
            decode=DecodeBatch(rows=None, block_tables=self.tables[:size], context_lens=self.lens[:size]),
        )
        return self.model.forward(self.input_ids[:size], self.positions[:size], self.kv_cache, meta)

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Padding rows of a warm-up write only the scratch block; warm up on a side stream (Triton
        # compiles and cuBLAS picks kernels there), then capture.
        self.slots[:size].fill_(self._scratch_slot)
        self.lens[:size].fill_(1)
        self.tables[:size].zero_()
        stream: Any = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(size)
        self._graphs[size] = (graph, out)
        return graph, out
