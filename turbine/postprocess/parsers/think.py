"""Reasoning between `<think>` and `</think>` (DeepSeek R1, Qwen3, QwQ and many others).

Three registered flavours of one format:
- `basic` and `qwen3`: reasoning only inside an explicit `<think>…</think>`; a reply without the tag
  is all content (Qwen3 with thinking switched off). Text before `<think>` is content.
- `deepseek_r1`: the reply starts inside the reasoning, since R1's chat template ends the prompt with
  `<think>\\n`; a leading `<think>` is dropped if the model writes it anyway, and everything up to
  `</think>` is reasoning (all of it, when `</think>` never comes).
Qwen3's thinking-only models whose template already opens the block in the prompt (the 2507
"Thinking" releases) write no `<think>`: serve them with `deepseek_r1`. Deciding it from the output
would mean holding every reply until a `</think>` either comes or not, which streaming cannot afford.
Only the first block counts: after `</think>` everything is content. A reply cut off inside the
block (length limit) keeps what it had as reasoning.
"""

from __future__ import annotations

from turbine.postprocess.parsers.base import ReasoningParse, held_suffix

START = "<think>"
END = "</think>"


class ThinkParser:
    __slots__ = ("_buf", "_state")

    def __init__(self, *, starts_in_reasoning: bool) -> None:
        # "before": no tag yet; "leading": R1's optional opening tag may still come; "inside"; "after".
        self._state = "leading" if starts_in_reasoning else "before"
        self._buf = ""

    def feed(self, text: str) -> ReasoningParse:
        if not self._buf and "<" not in text:
            # The common case: no tag can start in this piece, nothing held.
            if self._state == "inside":
                return ReasoningParse(text, "")
            if self._state != "leading":
                return ReasoningParse("", text)
        reasoning: list[str] = []
        content: list[str] = []
        buf = self._buf + text
        while buf:
            state = self._state
            if state == "after":
                content.append(buf)
                buf = ""
            elif state == "leading":
                head = buf.lstrip()
                if not head or (START.startswith(head) and head != START):
                    break  # whitespace, or a prefix of <think>: wait
                self._state = "inside"
                if head.startswith(START):
                    buf = head[len(START) :]
            else:
                marker = START if state == "before" else END
                at = buf.find(marker)
                out = content if state == "before" else reasoning
                if at >= 0:
                    out.append(buf[:at])
                    buf = buf[at + len(marker) :]
                    self._state = "inside" if state == "before" else "after"
                    continue
                keep = held_suffix(buf, [marker])
                out.append(buf[: len(buf) - keep])
                buf = buf[len(buf) - keep :]
                break
        self._buf = buf
        return ReasoningParse("".join(reasoning), "".join(content))

    def finish(self) -> ReasoningParse:
        rest, self._buf = self._buf, ""
        if self._state == "inside":
            return ReasoningParse(rest, "")
        if self._state == "leading" and rest.strip():
            return ReasoningParse(rest, "")
        return ReasoningParse("", rest)


def basic() -> ThinkParser:
    return ThinkParser(starts_in_reasoning=False)


def deepseek_r1() -> ThinkParser:
    return ThinkParser(starts_in_reasoning=True)
