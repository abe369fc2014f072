"""`python -m turbine.frontend -i`, driven in a pseudo-terminal as a person would type at it."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pexpect
import pytest

from tests.e2e.conftest import MODEL, Stack

pytestmark = pytest.mark.e2e

PROMPT = "\r\n> "  # the prompt, at the start of a line


@pytest.fixture
def spawn(stack: Stack) -> Iterator[list[pexpect.spawn[str]]]:
    children: list[pexpect.spawn[str]] = []
    yield children
    for child in children:
        if child.isalive():
            child.terminate(force=True)


def _interactive(stack: Stack, spawned: list[pexpect.spawn[str]], *args: str) -> pexpect.spawn[str]:
    argv = ["-m", "turbine.frontend", "-i", "--log-level", "warning", *stack.common(), *args]
    child = pexpect.spawn(
        sys.executable, argv, env=stack.env, encoding="utf-8", timeout=15, dimensions=(50, 400)
    )
    spawned.append(child)
    return child


def _say(child: pexpect.spawn[str], text: str) -> str:
    """Type a line; return the answer printed before the next prompt (without the terminal's echo)."""
    child.sendline(text)
    child.expect_exact(text + "\r\n")  # the terminal's echo of the typed line
    child.expect_exact(PROMPT)
    return _text(child.before)


def _text(shown: object) -> str:
    """What the terminal showed, with the pty's line endings made plain."""
    assert isinstance(shown, str)
    return shown.replace("\r\n", "\n")


def _exit_code(child: pexpect.spawn[str]) -> int | None:
    child.expect(pexpect.EOF)
    child.close()
    code: int | None = child.exitstatus
    return code


def test_chat_streams_and_keeps_the_conversation(stack: Stack, spawn: list[pexpect.spawn[str]]) -> None:
    child = _interactive(stack, spawn, "--interactive-system-prompt", "You are terse.")
    # No worker yet: the chat says it waits, then starts when the model appears.
    child.expect_exact("waiting for a model")
    stack.worker("--engine", "echo")
    child.expect_exact(f"Chatting with {MODEL}")
    child.expect_exact("> ")
    # The echo engine answers with the templated conversation (special tokens are not printed).
    first = _say(child, "alpha one")
    assert first.startswith("system\nYou are terse.\nuser\nalpha one\nassistant"), first
    second = _say(child, "bravo two")
    assert "user\nalpha one" in second, second  # the first question was sent again…
    assert "assistant\nsystem\nYou are terse." in second, second  # …and so was the first answer
    assert second.rstrip().endswith("user\nbravo two\nassistant"), second
    child.sendline("/exit")
    assert _exit_code(child) == 0


def test_ctrl_c_stops_a_long_answer_and_ctrl_d_quits(stack: Stack, spawn: list[pexpect.spawn[str]]) -> None:
    # Real-time mocker with no token limit: an answer that would take far longer than the test.
    stack.worker("--engine", "mocker", "--speedup-ratio", "1")
    child = _interactive(stack, spawn)
    child.expect_exact("> ")
    child.sendline("tell me a long story")
    child.expect_exact("story\r\n")
    child.expect(r"\S{20}")  # tokens are streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)  # still running, back at the prompt
    child.sendeof()
    assert _exit_code(child) == 0


def test_a_stopped_answer_stays_in_the_history_and_ctrl_c_at_the_prompt_quits(
    stack: Stack, spawn: list[pexpect.spawn[str]]
) -> None:
    stack.worker("--engine", "echo", "--echo-delay-ms", "20")
    child = _interactive(stack, spawn)
    child.expect_exact("> ")
    child.sendline("one two three four five six seven eight nine ten")
    child.expect_exact("ten\r\n")
    child.expect_exact("one two")  # the slow echo has begun answering
    shown = _text(child.before) + _text(child.after)
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    # What was printed before " [stopped]", less the "^C" the terminal echoes wherever it falls.
    shown += _text(child.before)
    partial = shown.replace("^C", "").removesuffix(" [stopped]")
    assert partial.startswith("user\none two") and "ten" not in partial, partial
    second = _say(child, "bravo")
    # The conversation now holds the stopped answer as the assistant's turn.
    assert f"assistant\n{partial}" in second, (partial, second)
    assert second.rstrip().endswith("user\nbravo\nassistant"), second
    child.sendintr()
    assert _exit_code(child) == 0
