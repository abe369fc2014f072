"""Incremental, UTF-8-safe detokenization of a token stream.

Byte-level tokenizers split multi-byte characters (emoji, CJK) across tokens, so decoding each token
on its own yields U+FFFD halves. This holds back text until the character is complete, and decodes a
small window of preceding tokens with each step so that decoders whose output depends on neighbours
(SentencePiece's leading-space rule, for one) produce the same text as decoding the whole sequence.

Implementation: `tokenizers.decoders.DecodeStream`, which runs that window algorithm (vLLM's
prefix/read offsets) in Rust: cheaper per token than the same window in Python (two `decode` calls
per token). DecodeStream takes a single id faster as an int than as a one-element list, hence the
special case in `add`.

Byte-level BPE tokenizers (GPT-2's alphabet: Llama 3, Qwen, SmolLM, Mistral Nemo ...) take a faster
path. Their decoder is context-free: each token is a fixed byte string, and decoding a sequence is
decoding the concatenated bytes as UTF-8 with U+FFFD for invalid bytes. So a `ByteLevelTable`, one
per tokenizer and shared by every request, maps each id to its text once, and a stream emits that
text as it is, holding bytes back in an incremental UTF-8 decoder only while a character is split
across tokens. In the server DecodeStream was a visible share of a streaming chat request's
frontend CPU; a table hit is a dictionary lookup. The table checks itself against
`tokenizers`' own decode on probe sequences when built, and is not used if they disagree.
"""

from __future__ import annotations

import codecs
import random

import tokenizers
from tokenizers import decoders
from tokenizers.decoders import DecodeStream

__all__ = ["BYTE_DECODER", "ByteLevelTable", "IncrementalDetokenizer"]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in character of each byte → byte."""
    values = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(values)
    extra = 0
    for b in range(256):
        if b not in values:
            values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(values, chars, strict=True)}


BYTE_DECODER = _byte_decoder()
_PROBE_TEXTS = ("Hello, world! naïve café — 😀👍🏽 日本語 Ελληνικά\n\tdef f(x): return x", "🎉🎉 ok")


class ByteLevelTable:
    """What a byte-level tokenizer's decoder makes of each id, computed once per id for all requests.

    The rule is the decoder's own: a token string whose characters are all in the byte alphabet
    stands for those bytes; any other (an added token such as `<|im_start|>`) for its UTF-8.
    Special tokens are dropped when skipped. Build with `build`. Entries are filled on first use;
    the dicts are only ever added to, which is safe under the GIL.
    """

    __slots__ = ("_raw", "_special", "_tokenizer", "_whole")

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tokenizer = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self._special = frozenset(i for i, tok in added.items() if tok.special)
        self._raw: dict[int, bytes] = {}
        # (id, skip_special_tokens) → the token's text when its bytes are whole UTF-8 on their own,
        # else None (they must go through the incremental decoder).
        self._whole: dict[tuple[int, bool], str | None] = {}

    @classmethod
    def build(cls, tokenizer: tokenizers.Tokenizer) -> ByteLevelTable | None:
        """The table for `tokenizer`, or None when its decoder is not plain byte-level or the table
        does not reproduce `tokenizer.decode` on the probes."""
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            return None
        table = cls(tokenizer)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        rng = random.Random(0)
        probes = [tokenizer.encode(t, add_special_tokens=False).ids for t in _PROBE_TEXTS]
        probes += [[rng.randrange(size) for _ in range(24)] for _ in range(64)]
        probes.append(sorted(tokenizer.get_added_tokens_decoder()))
        for ids in probes:
            for skip in (True, False):
                stream = _ByteLevelStream(table, skip)
                text = "".join(stream.add(ids[i : i + 1]) for i in range(len(ids))) + stream.flush()
                if text != tokenizer.decode(ids, skip_special_tokens=skip):
                    return None
        return table

    def raw(self, token_id: int, skip_special_tokens: bool) -> bytes:
        if skip_special_tokens and token_id in self._special:
            return b""
        hit = self._raw.get(token_id)
        if hit is None:
            piece = self._tokenizer.id_to_token(token_id)
            if piece is None:
                hit = b""  # an id outside the vocabulary decodes to nothing, as in `tokenizers`
            elif all(c in BYTE_DECODER for c in piece):
                hit = bytes([BYTE_DECODER[c] for c in piece])
            else:
                hit = piece.encode("utf-8")
            self._raw[token_id] = hit
        return hit

    def whole(self, token_id: int, skip_special_tokens: bool) -> str | None:
        key = (token_id, skip_special_tokens)
        try:
            return self._whole[key]
        except KeyError:
            pass
        raw = self.raw(token_id, skip_special_tokens)
        try:
            text: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        self._whole[key] = text
        return text


class _ByteLevelStream:
    """One sequence's stream through a `ByteLevelTable`."""

    __slots__ = ("_decoder", "_held", "_skip", "_table")

    def __init__(self, table: ByteLevelTable, skip_special_tokens: bool) -> None:
        self._table = table
        self._skip = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = False  # bytes of an incomplete character wait in the decoder

    def add(self, token_ids: list[int]) -> str:
        table, skip = self._table, self._skip
        if not self._held:
            if len(token_ids) == 1:
                text = table.whole(token_ids[0], skip)
                if text is not None:
                    return text
            else:
                texts = [table.whole(i, skip) for i in token_ids]
                if None not in texts:
                    return "".join(texts)  # type: ignore[arg-type]  # no None is left here
        raw = b"".join([table.raw(i, skip) for i in token_ids])
        text = self._decoder.decode(raw)
        self._held = bool(self._decoder.getstate()[0])
        return text

    def flush(self) -> str:
        if not self._held:
            return ""
        self._held = False
        text: str = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


class IncrementalDetokenizer:
    """Turns one sequence's token ids, as they arrive, into text deltas. One instance per sequence.

    The concatenation of every `add` result and the final `flush` equals decoding all the ids at once.
    Not thread-safe; meant to be driven by the one task that owns the response stream.
    """

    __slots__ = ("_context_id", "_fast", "_pending", "_skip_special_tokens", "_stream", "_tokenizer")

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        skip_special_tokens: bool = True,
        table: ByteLevelTable | None = None,
    ) -> None:
        """`table`: the tokenizer's `ByteLevelTable`, when it has one (the fast path)."""
        self._fast = None if table is None else _ByteLevelStream(table, skip_special_tokens)
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only without a table: building one per request would be wasted on the fast path.
        self._stream = None if table is not None else DecodeStream(skip_special_tokens=skip_special_tokens)
        # Ids added since the stream last produced text: an incomplete character (or skipped special
        # tokens). Kept only so `flush` can write out what the stream never released.
        self._pending: list[int] = []
        # The last id of the last add that produced text, so `flush` decodes `_pending` in context.
        # Only the id is kept, not the caller's list, which the caller may reuse.
        self._context_id: int | None = None

    def add(self, token_ids: list[int]) -> str:
        """Append ids; return the text they complete ("" while a character is still incomplete)."""
        if not token_ids:
            return ""
        if self._fast is not None:
            return self._fast.add(token_ids)
        # A single id (the common case) goes in as an int: the binding's list path is slower.
        step = token_ids[0] if len(token_ids) == 1 else token_ids
        assert self._stream is not None
        text = self._stream.step(self._tokenizer, step)
        if text is None:
            self._pending.extend(token_ids)
            return ""
        if self._pending:
            self._pending.clear()
        self._context_id = token_ids[-1]
        return text

    def flush(self) -> str:
        """End of stream: the text still held back, with U+FFFD for any incomplete character.

        Matches what decoding the whole sequence gives for a sequence that ends mid-character, except
        with byte-fallback decoders (Llama-style `<0x..>` tokens) when a complete one-byte character
        came right before the cut: whole-sequence decoding turns it into U+FFFD along with the
        incomplete bytes, but the stream had already released it as text.
        """
        if self._fast is not None:
            return self._fast.flush()
        if not self._pending:
            return ""
        pending, self._pending = self._pending, []
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        context = [] if self._context_id is None else [self._context_id]
        before = decode(context, skip_special_tokens=skip)
        after = decode(context + pending, skip_special_tokens=skip)
        # Decoding in context keeps a leading space that some decoders strip at sequence start; fall back
        # to decoding alone if the context's own text does not survive as a prefix (invalid bytes).
        if after.startswith(before):
            return after[len(before) :]
        return decode(pending, skip_special_tokens=skip)
