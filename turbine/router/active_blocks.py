"""KV blocks that routed, unfinished requests make each worker allocate, each distinct block once.

A request reuses its cached prefix (the worker holds those blocks whether or not it is routed
there) and allocates the rest: the blocks it computes and its partial tail. Counting every
request's whole prompt instead makes a worker serving one hot prefix look many times busier than
it is, and pushes that prefix's requests away from the only cache that holds it. Each worker keeps
a reference count per block hash of its active requests' computed blocks (two concurrent requests
computing the same new prefix count it once) plus each request's private tail blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class _Request:
    __slots__ = ("hashes", "private", "worker")

    def __init__(self, worker: int, hashes: Sequence[int], private: int) -> None:
        self.worker = worker
        self.hashes = hashes
        self.private = private


class ActiveBlocks:
    def __init__(self) -> None:
        self._requests: dict[str, _Request] = {}
        self._refs: dict[int, dict[int, int]] = {}
        self._private: dict[int, int] = {}

    def add(self, request_id: str, worker: int, hashes: Sequence[int], private_blocks: int) -> None:
        """Count a routed request; an id already counted (a retry elsewhere) is moved, not doubled."""
        if request_id in self._requests:
            self.remove(request_id)
        refs = self._refs.get(worker)
        if refs is None:
            refs = self._refs[worker] = {}
        for h in hashes:
            refs[h] = refs.get(h, 0) + 1
        self._private[worker] = self._private.get(worker, 0) + private_blocks
        self._requests[request_id] = _Request(worker, hashes, private_blocks)

    def remove(self, request_id: str) -> None:
        """Stop counting a request (finished, failed or cancelled). Unknown ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        refs = self._refs.get(req.worker)
        if refs is None:
            # The worker's tables went with the last request that counted something: this one
            # counted nothing (no computed block, no tail), so there is nothing to release.
            return
        for h in req.hashes:
            n = refs[h] - 1
            if n:
                refs[h] = n
            else:
                del refs[h]
        self._private[req.worker] -= req.private
        if not refs and not self._private[req.worker]:
            del self._refs[req.worker]
            del self._private[req.worker]

    def count(self, worker: int) -> int:
        """Distinct active blocks on `worker`, plus its requests' private blocks."""
        return len(self._refs.get(worker, ())) + self._private.get(worker, 0)

    def new_blocks(self, worker: int, hashes: Sequence[int]) -> int:
        """How many of `hashes` are not already held by an active request on `worker`."""
        refs = self._refs.get(worker)
        if not refs:
            return len(hashes)
        return sum(1 for h in hashes if h not in refs)

    def extend_prefixes(
        self, hashes: Sequence[int], scores: dict[int, int], cached: Mapping[int, int]
    ) -> dict[int, int]:
        """`scores` (worker -> leading blocks of `hashes` it will hold) raised, on every worker with
        active blocks, to the end of the run of `hashes` its active requests are computing that
        starts where the worker's `cached` prefix (or its score, if longer) ends. Returns `scores`
        itself when nothing changes, else a new dict."""
        n = len(hashes)
        out = scores
        for worker, refs in self._refs.items():
            start = max(scores.get(worker, 0), cached.get(worker, 0))
            if start >= n or hashes[start] not in refs:
                continue
            end = start + 1
            while end < n and hashes[end] in refs:
                end += 1
            if out is scores:
                out = dict(scores)
            out[worker] = end
        return out

    def remove_worker(self, worker: int) -> None:
        for rid in [rid for rid, r in self._requests.items() if r.worker == worker]:
            del self._requests[rid]
        self._refs.pop(worker, None)
        self._private.pop(worker, None)

    def __len__(self) -> int:
        return len(self._requests)
