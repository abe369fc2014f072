"""`turbine bench <name>`: the user-facing benchmarks, each a module of this package with `main(argv)`.

Every benchmark shows a progress bar while it runs and writes a markdown report with a PNG chart
(and, for most, the raw figures as JSON) under `--out` (default `benchmarks/results`). The modules
are imported only when named, so `turbine bench` needs no torch or matplotlib until one runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple, Protocol


class Benchmark(NamedTuple):
    module: str
    summary: str


BENCHMARKS: dict[str, Benchmark] = {
    "routing": Benchmark(
        "turbine.bench.routing", "every router mode on the same mock (or tiny torch) workers and prompts"
    ),
    "engine": Benchmark("turbine.bench.engine", "the torch engine against transformers' generate"),
    "serve": Benchmark("turbine.bench.serve", "a frontend and a torch worker through the HTTP API"),
    "structured": Benchmark(
        "turbine.bench.structured", "json_schema outputs against unconstrained ones, through the HTTP API"
    ),
    "vs-dynamo": Benchmark("turbine.bench.vs_dynamo", "frontend overhead against NVIDIA Dynamo's"),
    "upstream": Benchmark("turbine.bench.upstream", "Turbine in front of llama.cpp servers"),
    "scale": Benchmark("turbine.bench.scale", "frontend cost against workers, models and processes"),
}

USAGE = (
    "usage: turbine bench <name> [options]\n\nbenchmarks:\n"
    + "\n".join(f"  {name:<11} {b.summary}" for name, b in BENCHMARKS.items())
    + "\n\n`turbine bench <name> --help` lists a benchmark's options; each writes a markdown report and a"
    "\nPNG under --out (default benchmarks/results).\n"
)


class _Main(Protocol):
    def __call__(self, argv: Sequence[str] | None = None) -> int: ...


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    bench = BENCHMARKS.get(name)
    if bench is None:
        print(f"turbine bench: unknown benchmark {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        run: _Main = importlib.import_module(bench.module).main
    except ModuleNotFoundError as exc:
        print(
            f"turbine bench {name}: {exc.name} is not installed (pip install 'turbine[bench]'; "
            "the torch engine's benchmarks also need 'turbine[torch]')",
            file=sys.stderr,
        )
        return 2
    return run(rest)
