"""Render a model's jinja chat template with Hugging Face `apply_chat_template` semantics.

Templates come from model repositories, so they are untrusted code: they run in jinja's immutable
sandbox. The environment mirrors what `transformers` builds (trim_blocks, lstrip_blocks, loopcontrols,
`raise_exception`, `strftime_now`, a non-HTML-escaping `tojson`, the `{% generation %}` tag) because
templates are written and tested against exactly that; any difference changes the prompt a model sees.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
from jinja2.sandbox import ImmutableSandboxedEnvironment

from turbine.errors import ConfigError, InvalidRequest

__all__ = ["ChatTemplate"]

# How the text parts of one message are joined. OpenAI documents no separator; a newline keeps parts
# from running into each other and matches vLLM's "string" content format.
_PART_SEPARATOR = "\n"


class _RaisedByTemplate(jinja2.TemplateError):
    """Raised by the template's own `raise_exception(...)`: its message is meant for the user as is."""


def _raise_exception(message: str) -> NoReturn:
    raise _RaisedByTemplate(message)


def _strftime_now(format: str) -> str:
    # Local time, like transformers: templates use it to stamp "today's date" into system prompts.
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's built-in tojson HTML-escapes `<`, `>`, `&` and `'`, which would corrupt tool schemas in the
    # prompt; transformers overrides it with plain json.dumps and these keyword options.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}`: marks assistant text for training masks in transformers.

    Rendering ignores the marker and outputs the body; without the tag, templates that use it (several
    recent models' do) would fail to compile.
    """

    tags = {"generation"}  # noqa: RUF012 - jinja2.ext.Extension declares it this way

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _text_of_parts(parts: list[Any], index: int) -> str:
    texts: list[str] = []
    for part in parts:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text":
            raise InvalidRequest(
                f"messages[{index}].content: only text parts are supported, got type {kind!r}",
                param=f"messages[{index}].content",
                code="unsupported_content_part",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(
                f"messages[{index}].content: a text part needs a string 'text'",
                param=f"messages[{index}].content",
            )
        texts.append(text)
    return _PART_SEPARATOR.join(texts)


def _normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` whose content is a plain string, as most templates expect: null content
    (an assistant turn that only calls tools) becomes "", as vLLM passes it, so that templates that
    concatenate the content do not fail on it."""
    normalized: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"messages[{index}] must be an object", param=f"messages[{index}]")
        content = message.get("content")
        if content is None:
            normalized.append({**message, "content": ""})
        elif isinstance(content, str):
            normalized.append(dict(message))
        elif isinstance(content, list):
            normalized.append({**message, "content": _text_of_parts(content, index)})
        else:
            raise InvalidRequest(
                f"messages[{index}].content must be a string or a list of parts",
                param=f"messages[{index}].content",
            )
    return normalized


def _build_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        # Default `Undefined` (not strict), as in transformers: templates routinely test or print
        # variables that are only sometimes passed (`tools`, `bos_token`, model-specific flags).
        undefined=jinja2.Undefined,
    )
    filters: dict[str, Callable[..., Any]] = env.filters
    filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """One model's compiled chat template. Immutable after construction; safe to share across tasks.

    `bos_token` / `eos_token` are exposed to the template under those names, as transformers does;
    a None token is left undefined (renders as empty text), again as transformers does.
    """

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None) -> None:
        self.source = source
        self._special_tokens: dict[str, str] = {}
        if bos_token is not None:
            self._special_tokens["bos_token"] = bos_token
        if eos_token is not None:
            self._special_tokens["eos_token"] = eos_token
        try:
            # Compiled once: compiling costs milliseconds, rendering microseconds.
            self._template = _build_environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"chat template does not compile: {_describe(exc)}") from exc
        # The template's globals flattened once: `Template.render` merges them into every render's
        # variables from a ChainMap, whose pure-Python iteration cost more than rendering a short chat.
        self._globals = dict(self._template.globals)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`, with special tokens written out as text.

        `tools` is passed as given (already JSON-schema dicts); `extra` keyword arguments become
        template variables (e.g. `enable_thinking`), overriding the special tokens on a name clash.
        Raises `InvalidRequest` if the messages cannot be rendered by this template, including the
        template's own `raise_exception(...)` (e.g. "roles must alternate user/assistant").
        """
        context: dict[str, Any] = {
            **self._globals,
            **self._special_tokens,
            "documents": None,
            **extra,
            "messages": _normalize_messages(messages),
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        template = self._template
        try:
            try:
                # What `Template.render` does, with the globals already in `context` (`shared`: use it
                # as the context's variables as it is, without merging them in again) and given as a
                # dict (the context lists their names, which again iterated the ChainMap).
                ctx = jinja2.runtime.new_context(
                    template.environment, template.name, template.blocks, context, True, self._globals
                )
                return template.environment.concat(template.root_render_func(ctx))
            except Exception:
                template.environment.handle_exception()  # jinja's traceback rewriting; re-raises
                raise
        except _RaisedByTemplate as exc:
            raise InvalidRequest(exc.message or "rejected by the chat template", param="messages") from exc
        except jinja2.TemplateError as exc:
            raise InvalidRequest(
                f"chat template failed on these messages: {_describe(exc)}",
                param="messages",
                code="chat_template_error",
            ) from exc
        except (TypeError, ValueError, LookupError, ArithmeticError) as exc:
            # Python errors inside template expressions, e.g. `'x' + message['content']` when the
            # request has `content: null`. The request does not fit the template: the client's side.
            raise InvalidRequest(
                f"chat template failed on these messages: {type(exc).__name__}: {exc}",
                param="messages",
                code="chat_template_error",
            ) from exc


def _describe(exc: jinja2.TemplateError) -> str:
    line = getattr(exc, "lineno", None)
    where = f" (template line {line})" if line else ""
    return f"{type(exc).__name__}: {exc.message}{where}"
