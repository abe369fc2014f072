"""Prompt material shared by the benchmarks: a fixed vocabulary of ordinary words, so prompts are
deterministic for a seed and tokenize to a predictable length with the bundled tokenizer."""

from __future__ import annotations

import random

from turbine.preprocess.tokenizer import Tokenizer

WORDS = (
    "inference", "cache", "token", "router", "worker", "prefix", "stream", "latency", "batch", "model",
    "request", "frontend", "queue", "block", "decode", "prefill", "memory", "throughput", "client", "server",
    "cluster", "kernel", "tensor", "layer", "weight", "attention", "schedule", "policy", "replica", "shard",
    "region", "metric", "trace", "span", "budget", "window", "context", "system", "prompt", "answer",
    "question",
)  # fmt: skip


def random_words(rng: random.Random, count: int) -> str:
    """`count` words drawn from WORDS (about one token each with the bundled tokenizer)."""
    return " ".join(rng.choice(WORDS) for _ in range(count))


class SizedText:
    """Texts of about a given number of tokens under a tokenizer (counted per word, not guessed)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # Tokens each word adds after a space (byte-level BPE: " word" is how it appears mid-text).
        self._cost = {w: len(tokenizer.encode(" " + w)) for w in WORDS}

    def text(self, rng: random.Random, tokens: int, head: str = "") -> str:
        words = [head] if head else []
        count = len(self.tokenizer.encode(head)) if head else 0
        while count < tokens:
            word = rng.choice(WORDS)
            words.append(word)
            count += self._cost[word]
        return " ".join(words)
