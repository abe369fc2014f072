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


# English-like text from a large vocabulary: words built from English syllables (~30k distinct), drawn
# with Zipf's law among a few hundred frequent function words, in capitalised sentences with commas.
# Unlike WORDS, a prompt is nearly all new text to the tokenizer's caches and to the template, as real
# chat traffic is, and its tokens per word vary as they do for English under a BPE tokenizer.
_ONSETS = (
    "", "b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "h", "j", "k",
    "l", "m", "n", "p", "pl", "pr", "qu", "r", "s", "sc", "sh", "sk", "sl", "sm", "sn", "sp", "st", "str",
    "sw", "t", "th", "tr", "v", "w", "wh", "y",
)  # fmt: skip
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oa", "oo", "ou", "y")
_CODAS = (
    "", "b", "ck", "d", "ft", "g", "ld", "lk", "ll", "lt", "m", "mp", "n", "nd", "ng", "nk", "nt", "p", "r",
    "rd", "rk", "rm", "rn", "rt", "s", "sh", "sk", "st", "t", "th", "x",
)  # fmt: skip
_SUFFIXES = ("", "", "", "", "", "", "s", "s", "ed", "ing", "er", "ly", "tion", "ness", "ment", "al")
_FUNCTION_WORDS = (
    "the", "of", "and", "to", "a", "in", "is", "that", "it", "for", "was", "on", "are", "as", "with", "be",
    "at", "this", "have", "from", "or", "by", "not", "but", "what", "all", "were", "when", "we", "there",
    "can", "an", "your", "which", "their", "said", "if", "do", "will", "each", "about", "how", "up", "out",
    "them", "then", "she", "many", "some", "so", "these", "would", "other", "into", "has", "more", "her",
    "two", "like", "him", "see", "time", "could", "no", "make", "than", "first", "been", "its", "who",
    "now", "people", "my", "made", "over", "did", "down", "only", "way", "find", "use", "may", "water",
    "long", "little", "very", "after", "words", "called", "just", "where", "most", "know", "should",
    "please", "explain", "why", "because", "between", "through", "while", "before", "under", "again",
)  # fmt: skip
ENGLISH_VOCABULARY_SIZE = 30_000


class EnglishText:
    """Deterministic English-like sentences over ENGLISH_VOCABULARY_SIZE words (a seed's vocabulary is
    fixed; the text drawn from it depends on the caller's `rng`)."""

    def __init__(self, seed: int = 0, vocabulary: int = ENGLISH_VOCABULARY_SIZE) -> None:
        vocab_rng = random.Random(seed)
        words = dict.fromkeys(_FUNCTION_WORDS)
        while len(words) < vocabulary:
            syllables = vocab_rng.choice((1, 1, 1, 1, 2, 2, 2, 3))
            stem = "".join(
                vocab_rng.choice(_ONSETS) + vocab_rng.choice(_NUCLEI) + vocab_rng.choice(_CODAS)
                for _ in range(syllables)
            )
            words[stem + vocab_rng.choice(_SUFFIXES)] = None
        self.words = tuple(words)
        # Zipf: the word of rank r is drawn with weight 1/r (function words rank first, as in English).
        total = 0.0
        cumulative: list[float] = []
        for rank in range(1, len(self.words) + 1):
            total += 1.0 / rank
            cumulative.append(total)
        self._cumulative = cumulative

    def sentence(self, rng: random.Random) -> str:
        count = rng.randint(6, 22)
        words = rng.choices(self.words, cum_weights=self._cumulative, k=count)
        if count > 10 and rng.random() < 0.5:
            cut = rng.randint(4, count - 4)
            words[cut] += ","
        text = " ".join(words)
        return text[0].upper() + text[1:] + rng.choice((".", ".", ".", "?", "!"))

    def text(self, rng: random.Random, words: int) -> str:
        """Sentences until at least `words` words."""
        sentences: list[str] = []
        count = 0
        while count < words:
            sentence = self.sentence(rng)
            sentences.append(sentence)
            count += sentence.count(" ") + 1
        return " ".join(sentences)
