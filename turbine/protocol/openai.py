"""OpenAI request shapes at the edge, decoded and type-checked by msgspec (no pydantic on the hot path).

Unknown fields are ignored, as OpenAI-compatible servers do; known fields are type-checked, and a
type error names the field (`$.temperature`) so the 400 can say which parameter is wrong. Range
checks live in the preprocessor, which knows the model's limits.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str
    # A string, or a list of content parts ({"type": "text", "text": ...}).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Unbuilt(msgspec.Struct, frozen=True, kw_only=True):
    """Request fields Turbine does not build, decoded only so that a request setting one is refused
    with a 400 naming it (see `refused_field`) instead of being served as if it were absent.
    A feature that gets built moves its field out of here and out of the `UNBUILT_*` tables."""

    # OpenAI's.
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    metadata: Any = None
    modalities: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    safety_identifier: Any = None
    service_tier: Any = None
    store: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    # vLLM's.
    use_beam_search: Any = None
    length_penalty: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Any = None
    add_special_tokens: Any = None
    priority: Any = None
    request_id: Any = None
    logits_processors: Any = None
    return_tokens_as_token_ids: Any = None
    return_token_ids: Any = None
    cache_salt: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    mm_processor_kwargs: Any = None
    # vLLM's structured-output options that are not built (the constraints themselves are).
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structural_tag: Any = None


# Unbuilt field → the values that ask for nothing beyond what Turbine does anyway (null always
# does); any other value is refused.
UNBUILT_COMMON: dict[str, tuple[Any, ...]] = {
    "audio": (),
    "function_call": (),
    "functions": (),
    "metadata": ({},),
    "modalities": (["text"],),
    "moderation": (),
    "prediction": (),
    "prompt_cache_key": (),
    "prompt_cache_options": (),
    "prompt_cache_retention": (),
    "reasoning_effort": (),
    "safety_identifier": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "verbosity": (),
    "web_search_options": (),
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (),
    "prompt_logprobs": (),
    "priority": (0,),
    "request_id": (),
    "logits_processors": (),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "cache_salt": (),
    "kv_transfer_params": (),
    "vllm_xargs": (),
    "mm_processor_kwargs": (),
    "guided_decoding_backend": (),
    "guided_whitespace_pattern": (),
    "structural_tag": (),
}
# Chat only (vLLM's): add_special_tokens defaults to false there, and `echo` / the template options.
UNBUILT_CHAT: dict[str, tuple[Any, ...]] = {
    **UNBUILT_COMMON,
    "add_special_tokens": (False,),
    "best_of": (1,),
    "echo": (False,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "documents": (),
    "chat_template": (),
}
# Completions only: `best_of` (beyond n) and `suffix` (insertion) are not built.
UNBUILT_COMPLETION: dict[str, tuple[Any, ...]] = {
    **UNBUILT_COMMON,
    "add_special_tokens": (True,),
    "suffix": ("",),
    "response_format": ({"type": "text"},),
}


class _Sampling(_Unbuilt, frozen=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style extra fields.
    min_p: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    # Sample among the k most likely tokens only (vLLM's extra; -1 or 0: no limit).
    top_k: int | None = None
    # Penalties and biases, validated by the preprocessor (turbine/preprocess/knobs.py) and
    # honoured by engines whose card lists them (others refuse them).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM's: > 1 discourages tokens already in the prompt or output.
    repetition_penalty: float | None = None
    # Token id (as a string) → bias in [-100, 100].
    logit_bias: dict[str, float] | None = None
    # vLLM's: words never to generate, and the only token ids that may be generated.
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    # vLLM's structured outputs (turbine/preprocess/guided.py): one of json / json_object / regex /
    # choice / grammar, or the older guided_* spellings; engines whose card lacks
    # "guided_decoding" refuse them.
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(_Sampling, frozen=True):
    # vLLM's chat extras that are not built (see UNBUILT_CHAT).
    best_of: Any = None
    echo: Any = None
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    documents: Any = None
    chat_template: Any = None
    messages: list[ChatMessage] = msgspec.field(default_factory=list)
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}.
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's name for extra template variables.
    chat_template_kwargs: dict[str, Any] | None = None
    # Chat's logprobs: a flag, plus how many alternatives per token (needs logprobs=true).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # {"type": "text" | "json_object" | "json_schema", ...}: structured output, which only engines
    # whose card lists "guided_decoding" can enforce (others answer 400, never ignore it).
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling, frozen=True):
    # Text, token ids, or a batch: a list of texts or of token id lists (n choices per prompt).
    prompt: str | list[Any] | None = None
    echo: bool = False
    # Legacy completions' logprobs: the number of alternatives per token (None = no logprobs).
    logprobs: int | None = None
    # Not built (see UNBUILT_COMPLETION): `best_of` beyond `n`, `suffix`, and vLLM's
    # `response_format` on completions.
    best_of: int | None = None
    suffix: str | None = None
    response_format: Any = None


def refused_field(req: ChatCompletionRequest | CompletionRequest) -> str | None:
    """The first field `req` sets that Turbine does not build (to a value that asks for something),
    or None."""
    table = UNBUILT_CHAT if isinstance(req, ChatCompletionRequest) else UNBUILT_COMPLETION
    for name, harmless in table.items():
        value = getattr(req, name)
        if value is not None and not any(value == h and type(value) is type(h) for h in harmless):
            return name
    if isinstance(req, CompletionRequest) and req.best_of is not None and req.best_of != (req.n or 1):
        return "best_of"
    return None


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    return _chat_decoder.decode(body)


def decode_completion_request(body: bytes) -> CompletionRequest:
    return _completion_decoder.decode(body)


class ResponsesRequest(msgspec.Struct, frozen=True):
    """OpenAI Responses API (non-stateful): translated onto a chat request by the frontend."""

    model: str
    # A string (one user message), or a list of message items
    # `{"role": ..., "content": str | [{"type": "input_text", "text": ...}]}`.
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    user: str | None = None
    # {"format": {"type": "text" | "json_object" | "json_schema", ...}}: as chat's response_format.
    text: dict[str, Any] | None = None


class EmbeddingRequest(msgspec.Struct, frozen=True):
    model: str
    # A string, a list of strings, a list of token ids, or a list of token id lists.
    input: str | list[Any] | None = None
    encoding_format: str = "float"
    user: str | None = None


_responses_decoder = msgspec.json.Decoder(ResponsesRequest)
_embedding_decoder = msgspec.json.Decoder(EmbeddingRequest)


def decode_responses_request(body: bytes) -> ResponsesRequest:
    return _responses_decoder.decode(body)


def decode_embedding_request(body: bytes) -> EmbeddingRequest:
    return _embedding_decoder.decode(body)


# ---------------------------------------------------------------------------------------- answers
# What the routes answer, for /openapi.json (the frontend writes the bodies with orjson; a unit test
# decodes its bodies into these).


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatTopLogprob(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    # The token's UTF-8 bytes (None where it has no text of its own).
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob, frozen=True):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(msgspec.Struct, frozen=True):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    # None when the reply is only tool calls (or only reasoning).
    content: str | None
    tool_calls: list[dict[str, Any]] = []
    # Named by --reasoning-field-name.
    reasoning_content: str = ""


class ChatChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class _Answer(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(_Answer, frozen=True, kw_only=True):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class CompletionLogprobs(msgspec.Struct, frozen=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    # Characters of the choice's text before each token.
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(_Answer, frozen=True, kw_only=True):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class Model(msgspec.Struct, frozen=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(msgspec.Struct, frozen=True):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(msgspec.Struct, frozen=True):
    error: ErrorDetail
