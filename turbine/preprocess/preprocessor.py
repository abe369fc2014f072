"""OpenAI request → PreprocessedRequest: template, tokenize, validate against the model's limits."""

from __future__ import annotations

import concurrent.futures
from typing import Any, NamedTuple

import msgspec

from turbine.errors import InvalidRequest
from turbine.preprocess.chat_template import ChatTemplate
from turbine.preprocess.knobs import sampling_knobs
from turbine.preprocess.tokenizer import ModelFiles, Tokenizer
from turbine.preprocess.tools import ToolPlan, plan_tools, template_tool_calls
from turbine.protocol.openai import ChatCompletionRequest, ChatMessage, CompletionRequest, refused_field
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions

# Choices per request (`n`): each is a separate generation on some worker.
MAX_N = 16
# `seed` must fit the request plane's 64-bit integers (choice i > 0 uses seed + i).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Most alternatives per token: chat's `top_logprobs` (as OpenAI's) and legacy completions' `logprobs`.
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
# Choices per completions request over a batch of prompts (prompts × n).
MAX_BATCH_CHOICES = 128


class Prepared(NamedTuple):
    """A request ready to route, plus what only the frontend needs to finish it."""

    request: PreprocessedRequest
    stop_strings: list[str]
    stream: bool
    include_usage: bool
    n: int = 1
    # Chat only: the output goes through the model's reasoning/tool-call parsers (the frontend's
    # `postprocess.parsers`), with `tools` the tools calls are parsed against (None: no tool parsing).
    parse_output: bool = False
    tools: list[dict[str, Any]] | None = None
    # The output is forced to be one call of a named function (tool_choice names it): as OpenAI's,
    # such a choice finishes with "stop", not "tool_calls".
    named_call: bool = False
    # A forced call's markup the frontend writes around the engine's output, whose constraint is
    # the call's JSON alone (an upstream that takes JSON schemas only; frontend/forced_calls.py):
    # (opening, already at the end of the prompt; closing).
    forced_markup: tuple[str, str] | None = None
    # Completions with a batch of prompts: the requests of the prompts after the first.
    batch: tuple[PreprocessedRequest, ...] = ()

    def choices(self) -> list[PreprocessedRequest]:
        """One engine request per choice, `n` per prompt, prompt by prompt (choice index
        p * n + i). Choice i > 0 of a prompt gets its own id and seed (seed + i), so the choices
        differ from each other yet stay reproducible for a given seed."""
        out = []
        for base in (self.request, *self.batch):
            out.append(base)
            for i in range(1, self.n):
                sampling = msgspec.structs.replace(base.sampling, seed=(base.sampling.seed or 0) + i)
                out.append(
                    msgspec.structs.replace(base, request_id=f"{base.request_id}-{i}", sampling=sampling)
                )
        return out


_BAD_PROMPT = (
    "'prompt' must be a non-empty string, list of token ids, list of strings or list of token id lists"
)


def _completion_prompts(prompt: str | list[Any] | None) -> list[str | list[int]]:
    """A completions `prompt` → the prompts of the batch (one for a string or a token id list)."""
    bad = InvalidRequest(_BAD_PROMPT, param="prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif not prompt:
        raise bad
    elif all(type(t) is int for t in prompt):
        prompts = [prompt]
    elif all(isinstance(p, str) for p in prompt) or all(
        isinstance(p, list) and all(type(t) is int for t in p) for p in prompt
    ):
        prompts = list(prompt)
    else:
        raise bad
    if any(not p for p in prompts):
        raise bad
    if len(prompts) > MAX_BATCH_CHOICES:
        raise InvalidRequest(f"at most {MAX_BATCH_CHOICES} prompts per request", param="prompt")
    return prompts


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls is not None:
        out["tool_calls"] = template_tool_calls(message.tool_calls)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


# Chat message roles OpenAI accepts; anything else is a 400 there, so here too.
CHAT_ROLES = ("system", "assistant", "user", "function", "tool", "developer")


def _check_roles(messages: list[ChatMessage]) -> None:
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequest(
                f"Invalid value: {message.role!r}. Supported values are: "
                + ", ".join(repr(r) for r in CHAT_ROLES),
                param=f"messages[{i}].role",
                code="invalid_value",
            )


def _check_contents(messages: list[ChatMessage]) -> None:
    """Content is required except on an assistant message that carries tool calls (OpenAI's rule);
    checked here so a template never meets a null it would fail on."""
    for i, message in enumerate(messages):
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise InvalidRequest(
                f"Invalid value for 'content': messages[{i}] ({message.role}) needs content, a string "
                "or a list of content parts; only an assistant message with tool_calls may omit it.",
                param=f"messages[{i}].content",
                code="invalid_value",
            )


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if any(not s for s in stops):
        raise InvalidRequest("stop strings must be non-empty", param="stop")
    return stops


def _refuse_unbuilt(req: ChatCompletionRequest | CompletionRequest) -> None:
    """A field Turbine does not build is refused, never ignored."""
    name = refused_field(req)
    if name is not None:
        raise InvalidRequest(
            f"Unsupported parameter: '{name}' is not supported by this server.",
            param=name,
            code="unsupported_parameter",
        )


def _chat_logprobs(req: ChatCompletionRequest) -> int | None:
    """Chat's `logprobs`/`top_logprobs` → alternatives per token (None: no logprobs), as OpenAI
    validates them: `top_logprobs` within [0, 20], and only together with `logprobs: true`."""
    top = req.top_logprobs
    if top is not None:
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be within [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
        if not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    if not req.logprobs:
        return None
    return top or 0


class Preprocessor:
    """One per model. Stateless per request; safe to use from many requests at once."""

    def __init__(
        self,
        model: str,
        files: ModelFiles,
        executor: concurrent.futures.Executor | None,
        context_length: int | None = None,
        tokenizer_cache_entries: int = 0,
        exclude_tools_when_tool_choice_none: bool = False,
    ) -> None:
        self.model = model
        self._exclude_tools_when_none = exclude_tools_when_tool_choice_none
        self.files = files
        self.tokenizer = Tokenizer(files.tokenizer, cache_entries=tokenizer_cache_entries)
        self.template = (
            ChatTemplate(files.chat_template, files.bos_token, files.eos_token)
            if files.chat_template
            else None
        )
        self.context_length = context_length or files.context_length
        self._executor = executor
        self._eos_ids = tuple(files.eos_token_ids)

    async def chat(
        self, req: ChatCompletionRequest, request_id: str, *, assistant_prefix: str = ""
    ) -> Prepared:
        """`assistant_prefix`: text the answer continues (a prefill), written after the generation
        prompt."""
        _refuse_unbuilt(req)
        logprobs = _chat_logprobs(req)
        tools = self._plan_tools(req)
        prompt = self.chat_prompt(req, assistant_prefix, tools)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        self._check_can_fit(prompt, max_tokens, "messages")
        token_ids = await self.tokenizer.encode_async(prompt, self._executor)
        prepared = self._finish(req, request_id, token_ids, max_tokens, param, "messages", logprobs)
        return prepared._replace(parse_output=True, tools=tools.parse_tools)

    def _plan_tools(self, req: ChatCompletionRequest) -> ToolPlan:
        return plan_tools(req.tools, req.tool_choice, exclude_when_none=self._exclude_tools_when_none)

    async def chat_token_ids(self, req: ChatCompletionRequest, assistant_prefix: str = "") -> list[int]:
        """The prompt's token ids, however long (for counting)."""
        return await self.tokenizer.encode_async(self.chat_prompt(req, assistant_prefix), self._executor)

    def chat_prompt(
        self, req: ChatCompletionRequest, assistant_prefix: str = "", tools: ToolPlan | None = None
    ) -> str:
        """The prompt text: messages checked, rendered with the template (with the tools `tools`
        lets it see; planned from the request when not given), the prefix appended."""
        if not req.messages:
            raise InvalidRequest("'messages' must contain at least one message", param="messages")
        if self.template is None:
            raise InvalidRequest(f"model '{self.model}' has no chat template; use /v1/completions")
        _check_roles(req.messages)
        _check_contents(req.messages)
        if tools is None:
            tools = self._plan_tools(req)
        extra = dict(req.chat_template_kwargs or {})
        prompt = self.template.render(
            [_message_dict(m) for m in req.messages],
            add_generation_prompt=bool(extra.pop("add_generation_prompt", True)),
            tools=tools.template_tools,
            **extra,
        )
        return prompt + assistant_prefix

    def _check_can_fit(self, prompt: str, max_tokens: int | None, prompt_param: str) -> None:
        """Refuse a prompt that certainly cannot fit the context before tokenizing it: tokenizing
        costs time and, at its peak, ~140 bytes of memory per character (a 6 MB prompt: ~1 GB)."""
        least = self.tokenizer.min_tokens(prompt)
        ctx = self.context_length
        completion = max_tokens if max_tokens is not None and max_tokens > 0 else None
        if least >= ctx or (completion is not None and least + completion > ctx):
            raise InvalidRequest(
                f"This model's maximum context length is {ctx} tokens. However, you requested at least "
                f"{least + (completion or 1)} tokens (at least {least} in the {prompt_param}, "
                f"{completion or 1} in the completion). Please reduce the length of the prompt or the "
                "completion.",
                param=prompt_param,
                code="context_length_exceeded",
            )

    async def completion(self, req: CompletionRequest, request_id: str) -> Prepared:
        """One prompt, or a batch of them (a list of strings or of token id lists): each prompt gets
        `n` choices, indexed prompt by prompt as OpenAI does."""
        _refuse_unbuilt(req)
        prompts = _completion_prompts(req.prompt)
        n = req.n or 1
        if len(prompts) * n > MAX_BATCH_CHOICES:
            raise InvalidRequest(
                f"a batch of {len(prompts)} prompts with n={n} asks for {len(prompts) * n} choices; "
                f"at most {MAX_BATCH_CHOICES} per request",
                param="prompt",
            )
        if req.echo:
            raise InvalidRequest("'echo' is not supported", param="echo")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidRequest(f"logprobs must be within [0, {MAX_COMPLETION_LOGPROBS}]", param="logprobs")
        vocab = self.tokenizer.vocab_size
        for prompt in prompts:
            if isinstance(prompt, str):
                self._check_can_fit(prompt, req.max_tokens, "prompt")
            elif any(not 0 <= t < vocab for t in prompt):
                raise InvalidRequest(f"prompt token ids must be within [0, {vocab})", param="prompt")
        ids = [
            await self.tokenizer.encode_async(p, self._executor) if isinstance(p, str) else list(p)
            for p in prompts
        ]
        first, *rest = (
            self._finish(req, request_id, token_ids, req.max_tokens, "max_tokens", "prompt", req.logprobs)
            for token_ids in ids
        )
        if not rest:
            return first
        batch = tuple(
            msgspec.structs.replace(p.request, request_id=f"{request_id}-p{i}") for i, p in enumerate(rest, 1)
        )
        return first._replace(batch=batch)

    def _finish(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        request_id: str,
        token_ids: list[int],
        max_tokens: int | None,
        max_param: str,
        prompt_param: str,
        logprobs: int | None,
    ) -> Prepared:
        if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
            raise InvalidRequest("temperature must be within [0, 2]", param="temperature")
        if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
            raise InvalidRequest("top_p must be within (0, 1]", param="top_p")
        if req.min_p is not None and not 0.0 <= req.min_p <= 1.0:
            raise InvalidRequest("min_p must be within [0, 1]", param="min_p")
        if req.n is not None and not 1 <= req.n <= MAX_N:
            raise InvalidRequest(f"n must be within [1, {MAX_N}]", param="n")
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequest(f"{max_param} must be at least 1", param=max_param)
        if req.min_tokens < 0:
            raise InvalidRequest("min_tokens must be at least 0", param="min_tokens")
        if max_tokens is not None and req.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens must not exceed {max_param}", param="min_tokens")
        if req.top_k is not None and req.top_k < -1:
            raise InvalidRequest("top_k must be -1 or 0 (no limit), or at least 1", param="top_k")
        if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX:
            raise InvalidRequest(f"seed must be within [{SEED_MIN}, {SEED_MAX}]", param="seed")
        vocab = self.tokenizer.vocab_size
        if req.stop_token_ids and any(not 0 <= t < vocab for t in req.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids must be within [0, {vocab})", param="stop_token_ids")
        stops = _stop_strings(req.stop)
        prompt_len = len(token_ids)
        ctx = self.context_length
        if prompt_len >= ctx or (max_tokens is not None and prompt_len + max_tokens > ctx):
            asked = prompt_len + (max_tokens or 1)
            raise InvalidRequest(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{asked} tokens ({prompt_len} in the {prompt_param}, {max_tokens or 1} in the "
                "completion). Please reduce the length of the prompt or the completion.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        resolved_max = max_tokens if max_tokens is not None else ctx - prompt_len
        if req.min_tokens > resolved_max:
            raise InvalidRequest(f"min_tokens must not exceed {resolved_max} here", param="min_tokens")
        preprocessed = PreprocessedRequest(
            request_id=request_id,
            model=self.model,
            token_ids=token_ids,
            sampling=SamplingOptions(
                temperature=req.temperature,
                top_p=req.top_p,
                min_p=req.min_p,
                seed=req.seed,
                logprobs=logprobs,
                top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
                **sampling_knobs(req, self.tokenizer),
            ),
            stop=StopConditions(
                max_tokens=resolved_max,
                min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos,
                stop_token_ids=tuple(req.stop_token_ids or ()),
            ),
            eos_token_ids=self._eos_ids,
        )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(preprocessed, stops, bool(req.stream), include_usage, req.n or 1)
