"""What the frontend sends a worker: a tokenized, validated request."""

from __future__ import annotations

import msgspec


class GuidedDecoding(msgspec.Struct, frozen=True, omit_defaults=True):
    """A constraint on the output: the engine samples only tokens the grammar allows, and ends (EOS)
    only where the grammar is complete.

    `kind` is one of GUIDED_KINDS; `spec` its text: a JSON schema (JSON text), a regular expression,
    a JSON list of the allowed strings (choice), or a grammar in Lark or GBNF syntax. `param` names
    the request field it came from, for errors.
    """

    kind: str
    spec: str
    param: str = "response_format"


GUIDED_KINDS = ("json_schema", "regex", "choice", "grammar")


class SamplingOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """Sampling knobs passed through to the engine; `None` means the engine's default."""

    temperature: float | None = None
    top_p: float | None = None
    # vLLM's extra: drop tokens below min_p × the most likely token's probability.
    min_p: float | None = None
    seed: int | None = None
    # Per-token log probabilities wanted back: None = none; k >= 0 = the sampled token's logprob
    # plus the k most likely alternatives (0..20, validated by the frontend).
    logprobs: int | None = None
    # Sample among the k most likely tokens only; None = no limit.
    top_k: int | None = None
    # Structured output / enforced tool choice; None = unconstrained.
    guided: GuidedDecoding | None = None
    # Penalties (0 / 0 / 1: off). presence and frequency (OpenAI's) count the generated tokens;
    # repetition (vLLM's) divides the logits of tokens seen in the prompt or the output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # (token id, bias) pairs added to the logits (OpenAI's logit_bias, validated to [-100, 100]).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's bad_words: the words as sent (for upstream servers), and the token sequences each becomes
    # (with and without a leading space); the last token of a sequence is banned once the tokens
    # before it end the text so far.
    bad_words: tuple[str, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    # vLLM's allowed_token_ids: sample only among these (empty: any).
    allowed_token_ids: tuple[int, ...] = ()
    # How many of the request's last prompt tokens were generated earlier (a stream migrated to
    # another worker continues from them): presence and frequency penalties count them as output.
    prior_output_tokens: int = 0


# The sampling knobs beyond the basic ones; each is also the name of the capability an engine lists
# in its card (`ModelDeploymentCard.capabilities`) when it honours it. Frontends refuse the others
# with a 400 naming them.
SAMPLING_KNOBS = (
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "bad_words",
    "allowed_token_ids",
)


def knobs_used(s: SamplingOptions) -> list[str]:
    """The SAMPLING_KNOBS `s` sets to something other than "off"."""
    used = {
        "presence_penalty": s.presence_penalty != 0.0,
        "frequency_penalty": s.frequency_penalty != 0.0,
        "repetition_penalty": s.repetition_penalty != 1.0,
        "logit_bias": bool(s.logit_bias),
        "bad_words": bool(s.bad_words),
        "allowed_token_ids": bool(s.allowed_token_ids),
    }
    return [k for k in SAMPLING_KNOBS if used[k]]


class StopConditions(msgspec.Struct, frozen=True, omit_defaults=True):
    """When the engine must stop generating.

    `max_tokens` is always resolved by the frontend (never None on the wire). Stop *strings* are not
    here: they are applied by the frontend's postprocessor on detokenized text.
    """

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    # Extra token ids that end generation (user-supplied), on top of the model's EOS ids.
    stop_token_ids: tuple[int, ...] = ()


class PreprocessedRequest(msgspec.Struct, frozen=True):
    """A request after templating and tokenization, ready for any worker of `model`."""

    request_id: str
    model: str
    token_ids: list[int]
    sampling: SamplingOptions
    stop: StopConditions
    # The model's end-of-sequence ids; ending on one yields finish_reason "stop" unless ignore_eos.
    eos_token_ids: tuple[int, ...] = ()
