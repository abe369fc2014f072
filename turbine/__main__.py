"""`turbine {up,frontend,worker,bench}`: the command-line entry point."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: turbine <command> [options]

commands:
  up          a frontend plus a worker serving SmolLM2-135M-Instruct on :8000 (torch engine;
              --engine mocker for simulated workers)
  frontend    the OpenAI HTTP frontend (watches discovery for workers)
  worker      a worker serving an engine (torch, mocker, echo, scripted, or upstream
              OpenAI-compatible servers with --engine openai --upstream-url URL)
  bench       the benchmarks (`turbine bench` lists them): markdown + PNG reports

`turbine <command> --help` lists a command's options; each has a TURBINE_* environment variable.
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "up":
        from turbine.up import main as up_main

        return up_main(rest)
    if command == "frontend":
        from turbine.frontend.main import main as frontend_main

        return frontend_main(rest)
    if command == "worker":
        from turbine.worker.main import main as worker_main

        return worker_main(rest)
    if command == "bench":
        from turbine.bench.cli import main as bench_main

        return bench_main(rest)
    print(f"turbine: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
