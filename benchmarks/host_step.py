"""The torch engine's host work per decode step, with the forward taken out: what a GPU waits for
between steps when the model is small and the batch large.

On a GPU a 1B model's decode step over 128 sequences takes a few milliseconds; the host's share of a
step (scheduling, the executor's snapshot of the step's rows and sampling knobs, completing the step
and delivering every token) grows with the batch, and wherever it is not hidden behind the GPU (steps
that carry a prefill chunk) it adds to every step. This measures that share on any machine: the
torch engine in-process on a tiny random Llama with SmolLM2's vocabulary size, on the CPU, its
forward and sampler replaced by a stub that returns a token per sampled row at once, tokens
delivered to a sink as the worker delivers them (`generate_into`), at batch 32 / 128 / 256.

The baseline, in the same run: the same engine loop with an executor that does nothing but return
the tokens (no snapshot of the step, no sampling knobs): the scheduler and delivery alone, which
every engine (mocker included) pays. "executor" is the difference in CPU time per token (the work;
wall time adds the hand-offs to the runner thread, whose latency on a small VM varies run to run).

    .venv/bin/python benchmarks/host_step.py [--steps 600] [--rounds 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from turbine.bench.machine import cpu_class
from turbine.engines.base import NullEventSink
from turbine.engines.core.scheduler import Sampled, Seq, StepPlan
from turbine.engines.torch.engine import TorchEngine, TorchEngineConfig, load_model
from turbine.engines.torch.random_model import llama_config, write_model_dir
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import EngineOutput

VOCAB = 49152
"""SmolLM2's vocabulary."""

KNOBS: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 0.8, "top_p": 0.95},
}


def _token(seq_id: int) -> Sampled:
    return Sampled(1000 + seq_id % 4000)


class _Bare:
    """The baseline executor: a token for every row that samples, nothing else."""

    async def execute(self, plan: StepPlan, scheduled_at: float) -> Callable[[Seq], Sampled]:
        await asyncio.sleep(0)
        return lambda seq: _token(seq.seq_id)

    def release(self, seq: Seq) -> None:
        pass


def _stub_forward(engine: TorchEngine) -> None:
    """The engine's own executor, its forward and sampler (`_run`, on the runner thread) a stub."""
    executor: Any = engine.executor()
    executor._run = lambda step: {sid: _token(sid) for sid in step.sample_ids}


def _requests(batch: int, steps: int, knobs: dict[str, Any], seed: int) -> list[PreprocessedRequest]:
    rng = random.Random(seed)
    return [
        PreprocessedRequest(
            request_id=f"r{seed}-{i}",
            model="m",
            token_ids=[rng.randrange(100, VOCAB - 100) for _ in range(rng.randint(300, 700))],
            sampling=SamplingOptions(seed=None, **knobs),
            stop=StopConditions(max_tokens=steps, ignore_eos=True),
            eos_token_ids=(2,),
        )
        for i in range(batch)
    ]


async def _one(
    engine: TorchEngine, batch: int, steps: int, knobs: dict[str, Any], seed: int
) -> tuple[float, float]:
    """CPU seconds (the process's, all threads: work, not waiting) and wall seconds per delivered
    token over `batch` sequences decoding `steps` tokens each."""
    delivered = 0

    def sink(out: EngineOutput) -> None:
        nonlocal delivered
        delivered += len(out.token_ids)

    requests = _requests(batch, steps, knobs, seed)  # drawn before the clocks start
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(engine.generate_into(r, sink) for r in requests))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert delivered == batch * steps, (delivered, batch * steps)
    return cpu / delivered, wall / delivered


def measure(model_dir: Path, batch: int, steps: int, knobs: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median over `rounds` interleaved rounds of µs per token: CPU and wall time of the engine with
    the stubbed forward, and of the bare loop."""
    cfg = TorchEngineConfig(
        model_dir=model_dir,
        device="cpu",
        dtype="float32",
        max_num_seqs=batch,
        max_num_batched_tokens=8192,
        kv_cache_memory_bytes=256 << 20,  # ~500k tokens of the tiny model: every sequence fits
        progress=False,
    )
    loaded = load_model(cfg)

    async def run() -> dict[str, float]:
        torch_engine = TorchEngine(cfg, loaded, worker_id=1, events=NullEventSink())
        bare = TorchEngine(cfg, loaded, worker_id=2, events=NullEventSink())
        bare_executor = _Bare()
        bare.executor = lambda: bare_executor  # type: ignore[method-assign]
        _stub_forward(torch_engine)
        for engine in (torch_engine, bare):
            await engine.start()
        times: dict[str, list[tuple[float, float]]] = {"engine": [], "bare": []}
        try:
            for r in range(rounds):
                times["engine"].append(await _one(torch_engine, batch, steps, knobs, r))
                times["bare"].append(await _one(bare, batch, steps, knobs, r))
        finally:
            for engine in (torch_engine, bare):
                await engine.stop()
        out: dict[str, float] = {}
        for name, pairs in times.items():
            out[f"{name}_cpu"] = statistics.median(c for c, _ in pairs) * 1e6
            out[f"{name}_wall"] = statistics.median(w for _, w in pairs) * 1e6
        return out

    return asyncio.run(run())


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['knobs']}\nbatch {r['batch']}" for r in rows]
    bare = [r["bare_cpu_us"] for r in rows]
    executor = [r["engine_cpu_us"] - r["bare_cpu_us"] for r in rows]
    ax.bar(labels, bare, label="scheduler + delivery (bare loop)")
    ax.bar(labels, executor, bottom=bare, label="torch executor's host work")
    ax.set_ylabel("CPU µs per token")
    ax.set_title("host work per decode token, forward stubbed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="32,128,256")
    parser.add_argument("--steps", type=int, default=600, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(
            Path(tmp), llama_config("tiny", vocab_size=VOCAB, max_position_embeddings=2048)
        )
        for knobs_name, knobs in KNOBS.items():
            for batch in (int(b) for b in args.batches.split(",")):
                result = measure(model_dir, batch, args.steps, knobs, args.rounds)
                row: dict[str, Any] = {"knobs": knobs_name, "batch": batch}
                row.update({f"{name}_us": value for name, value in result.items()})
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_report(args, rows)


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_step.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# Host work per decode step (forward stubbed)",
        "",
        f"{cpu_class()}, Python {platform.python_version()}; "
        f"{args.steps} tokens per sequence after a 300-700-token prompt, median of {args.rounds} "
        "interleaved rounds. CPU: the process's CPU time (all threads) per token, the work done; "
        "wall: elapsed time per token, which adds the waits for the runner thread (noisy on a "
        "small VM). Command: `.venv/bin/python benchmarks/host_step.py`.",
        "",
        "| knobs | batch | engine CPU µs/token | bare loop CPU µs/token | executor CPU µs/token "
        "| engine wall µs/token | bare wall µs/token | engine wall ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['knobs']} | {r['batch']} | {r['engine_cpu_us']:.2f} | {r['bare_cpu_us']:.2f} | "
            f"{r['engine_cpu_us'] - r['bare_cpu_us']:.2f} | {r['engine_wall_us']:.2f} | "
            f"{r['bare_wall_us']:.2f} | {r['engine_wall_us'] * r['batch'] / 1000:.2f} |"
        )
    lines += ["", "![host step](host_step.png)", ""]
    (args.out / "host_step.md").write_text("\n".join(lines))
    plot(rows, args.out / "host_step.png")


if __name__ == "__main__":
    main()
