"""gpt-oss reasoning: OpenAI's Harmony format, where every message names its channel.

    <|channel|>analysis<|message|>The user asks about Paris.<|end|>
    <|start|>assistant<|channel|>final<|message|>Paris is sunny.<|return|>

`analysis` is reasoning; `final` (and `commentary` without a recipient: tool-call preambles) is
content. A message addressed to a tool (`to=functions.NAME` in its header) is a call: it is passed on
in the content as `<|start|>HEADER<|message|>ARGS<|call|>`, which the `harmony` tool-call parser
turns into a call (without that parser it stays visible as text). The markers are special tokens,
so the frontend keeps special tokens in the text when this parser is active. Output without any
Harmony message (another model) is all content.
"""

from __future__ import annotations

import re

from turbine.postprocess.parsers.base import ReasoningParse, find_first, held_suffix

START = "<|start|>"
CHANNEL = "<|channel|>"
MESSAGE = "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
CALL = "<|call|>"
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL_NAME = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")


class HarmonyReasoningParser:
    __slots__ = ("_buf", "_header", "_in_body", "_kind", "_saw_message", "_tool_body")

    def __init__(self) -> None:
        self._buf = ""
        self._in_body = False
        self._header = ""
        # Where the current message's body goes: "reasoning", "content" or "tool".
        self._kind = "content"
        self._tool_body = ""
        self._saw_message = False

    def _open(self, header: str) -> None:
        channel = _CHANNEL_NAME.search(header)
        name = channel[1] if channel else ""
        if _RECIPIENT.search(header):
            self._kind = "tool"
        elif name == "analysis":
            self._kind = "reasoning"
        else:
            self._kind = "content"
        self._header = header
        self._tool_body = ""
        self._in_body = True
        self._saw_message = True

    def feed(self, text: str) -> ReasoningParse:
        reasoning: list[str] = []
        content: list[str] = []
        buf = self._buf + text
        while True:
            if not self._in_body:
                at = buf.find(MESSAGE)
                if at < 0:
                    break  # the header is held whole until its <|message|>
                self._open(buf[:at])
                buf = buf[at + len(MESSAGE) :]
                continue
            at, marker = find_first(buf, ENDS)
            end = at if at >= 0 else len(buf) - held_suffix(buf, ENDS)
            body, buf = buf[:end], buf[end:]
            if self._kind == "tool":
                self._tool_body += body
            else:
                (reasoning if self._kind == "reasoning" else content).append(body)
            if at < 0:
                break
            buf = buf[len(marker) :]
            if self._kind == "tool":
                content.append(self._tool_markup())
            self._in_body = False
        self._buf = buf
        return ReasoningParse("".join(reasoning), "".join(content))

    def _tool_markup(self) -> str:
        header = self._header.removeprefix(START)
        return f"{START}{header}{MESSAGE}{self._tool_body}{CALL}"

    def finish(self) -> ReasoningParse:
        rest, self._buf = self._buf, ""
        if not self._in_body:
            # Trailing header text (`<|start|>assistant`) is dropped; text that never became a
            # message at all was not Harmony, and is the answer.
            return ReasoningParse("", "" if self._saw_message else rest)
        self._in_body = False
        if self._kind == "tool":
            self._tool_body += rest
            return ReasoningParse("", self._tool_markup())
        return ReasoningParse(rest, "") if self._kind == "reasoning" else ReasoningParse("", rest)
