"""Output-parser cost per streamed token: what `--tool-call-parser` / `--reasoning-parser` add to the
frontend's work on each delta.

Workload: a 40-sentence answer followed by one Hermes tool call (optionally after a `<think>` block),
tokenized with the bundled tokenizer and fed one token's text at a time, as a stream of one-token
deltas reaches the parser. Reported: microseconds per token for each parser combination, next to a
plain `str.find` per token as the machine's yardstick (the numbers move with load on shared hosts).

    .venv/bin/python benchmarks/parsers.py [--rounds 300]
"""

from __future__ import annotations

import argparse
import time

import tokenizers

from turbine.models import bundled_model_path
from turbine.postprocess.parsers.output import ParserSettings, make_output_parser

ANSWER = "Some answer text here, with a few more words in it. " * 40
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
CASES = {
    "hermes": (ParserSettings("hermes", None), ANSWER + CALL),
    "qwen3 (reasoning)": (ParserSettings(None, "qwen3"), "<think>" + ANSWER + "</think>" + ANSWER),
    "hermes + qwen3": (ParserSettings("hermes", "qwen3"), "<think>" + ANSWER + "</think>" + ANSWER + CALL),
    "qwen3_coder": (ParserSettings("qwen3_coder", None), ANSWER + CALL),
}


def _pieces(tok: tokenizers.Tokenizer, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False).ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    tok = tokenizers.Tokenizer.from_file(str(bundled_model_path() / "tokenizer.json"))
    base = _pieces(tok, ANSWER)
    start = time.perf_counter()
    for _ in range(args.rounds):
        for piece in base:
            piece.find("<")
    yardstick = (time.perf_counter() - start) / args.rounds / len(base) * 1e6
    print("| parsers | tokens | us/token |\n|---|---|---|")
    print(f"| (str.find yardstick) | {len(base)} | {yardstick:.2f} |")
    for name, (settings, text) in CASES.items():
        pieces = _pieces(tok, text)
        start = time.perf_counter()
        for _ in range(args.rounds):
            out = make_output_parser(settings, tools=[])
            assert out is not None
            for piece in pieces:
                out.feed(piece)
            out.finish()
        per_token = (time.perf_counter() - start) / args.rounds / len(pieces) * 1e6
        print(f"| {name} | {len(pieces)} | {per_token:.2f} |")


if __name__ == "__main__":
    main()
