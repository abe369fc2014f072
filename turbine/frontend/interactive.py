"""`turbine frontend -i`: chat with a discovered model in the terminal instead of serving HTTP.

Discovery runs as usual; the chat uses the first model to appear (or `--model-name`) through the same
path an HTTP request takes: `ModelRegistry` → `Preprocessor.chat` → `ModelPipeline.generate`. The
conversation (system prompt, user and assistant turns) is re-sent every turn, and tokens print as they
arrive.

Keys: Enter sends a line; `/exit` or Ctrl-D quits; Ctrl-C stops the answer being written (what was
written stays in the history) or, at the prompt, quits. stdin is read by a daemon thread with `os.read`
(no Python-level lock a blocked read could hold at exit), so the event loop never blocks on the terminal.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import TextIO

from turbine.config import FrontendConfig
from turbine.errors import TurbineError
from turbine.frontend.models import ModelRegistry
from turbine.frontend.openai_format import new_id
from turbine.protocol.openai import ChatCompletionRequest, ChatMessage

log = logging.getLogger(__name__)

PROMPT = "> "
QUIT_COMMANDS = ("/exit", "/quit")


class LineReader:
    """Lines of a file descriptor, read by a daemon thread and handed to the event loop.

    `readline()` returns one line without its newline, or None at end of input. The thread stops at
    end of input or when the loop is closed; a read it is blocked in never delays the process's exit.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._thread = threading.Thread(target=self._read, name="interactive-stdin", daemon=True)
        self._thread.start()

    async def readline(self) -> str | None:
        return await self._queue.get()

    def _put(self, line: str | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, line)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            pending += decoder.decode(chunk, final=not chunk)
            *lines, pending = pending.split("\n")
            if not chunk and pending:
                # Ctrl-D after some text (or input without a final newline): still a line.
                lines.append(pending)
            for line in lines:
                if not self._put(line.rstrip("\r")):
                    return
            if not chunk:
                self._put(None)
                return


class ChatSession:
    """One terminal conversation with one model, kept for the session's life."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        model_name: str | None,
        max_tokens: int | None,
        system_prompt: str | None,
        out: TextIO | None = None,
    ) -> None:
        self._registry = registry
        self._model_name = model_name
        self._max_tokens = max_tokens
        self.history: list[ChatMessage] = []
        if system_prompt:
            self.history.append(ChatMessage(role="system", content=system_prompt))
        self._out = out if out is not None else sys.stdout
        self._answer: asyncio.Task[None] | None = None
        self._at_line_start = True

    def _write(self, text: str) -> None:
        if text:
            self._out.write(text)
            self._out.flush()
            self._at_line_start = text.endswith("\n")

    def _end_line(self) -> None:
        if not self._at_line_start:
            self._write("\n")

    def interrupt(self) -> bool:
        """Ctrl-C: stop the answer being written; False when none is (the caller then quits)."""
        if self._answer is not None and not self._answer.done():
            self._answer.cancel()
            return True
        return False

    async def wait_for_model(self) -> str:
        """The name of the model to chat with, once one has a live worker."""
        announced = False
        while True:
            for pipeline in self._registry.models():
                if self._model_name is None or pipeline.name == self._model_name:
                    return pipeline.name
            if not announced:
                wanted = f"model '{self._model_name}'" if self._model_name else "a model"
                self._write(f"waiting for {wanted} to appear in discovery… (Ctrl-C quits)\n")
                announced = True
            await self._registry.changed.wait()

    async def run(self, reader: LineReader) -> None:
        """Chat until /exit, end of input, or cancellation."""
        try:
            await self._chat(reader)
        except asyncio.CancelledError:
            self._end_line()  # Ctrl-C at the prompt: leave the shell a clean line
            raise

    async def _chat(self, reader: LineReader) -> None:
        model = await self.wait_for_model()
        self._write(f"Chatting with {model}. /exit or Ctrl-D quits; Ctrl-C stops an answer.\n")
        while True:
            self._write(PROMPT)
            line = await reader.readline()
            if line is None:
                self._write("\n")
                return
            self._at_line_start = True  # the terminal echoed the user's Enter
            text = line.strip()
            if text in QUIT_COMMANDS:
                return
            if not text:
                continue
            await self.turn(model, text)

    async def turn(self, model: str, text: str) -> str:
        """Send one user message; stream and record the answer (partial if interrupted)."""
        self.history.append(ChatMessage(role="user", content=text))
        parts: list[str] = []
        self._answer = asyncio.get_running_loop().create_task(self._stream(model, parts))
        try:
            await asyncio.wait({self._answer})
        finally:
            if not self._answer.done():  # we were cancelled ourselves: stop the answer too
                self._answer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._answer
        answer = "".join(parts)
        error = None if self._answer.cancelled() else self._answer.exception()
        self._answer = None
        if error is not None:
            message = error.message if isinstance(error, TurbineError) else f"internal error: {error!r}"
            if not isinstance(error, TurbineError):
                log.error("interactive turn failed", exc_info=error)
            self._end_line()
            self._write(f"error: {message}\n")
            if not answer:
                self.history.pop()  # nothing came back: let the user rephrase instead
                return answer
        else:
            self._end_line()
        if answer or error is None:
            self.history.append(ChatMessage(role="assistant", content=answer))
        return answer

    async def _stream(self, model: str, parts: list[str]) -> None:
        pipeline = self._registry.get(model)
        request = ChatCompletionRequest(
            model=model, messages=list(self.history), max_tokens=self._max_tokens, stream=True
        )
        prepared = await pipeline.preprocessor.chat(request, new_id("chatcmpl"))
        gen = pipeline.generate(prepared)
        try:
            async for delta in gen:
                if delta.text:
                    parts.append(delta.text)
                    self._write(delta.text)
        except asyncio.CancelledError:
            self._write(" [stopped]")
            raise
        finally:
            await gen.aclose()  # an interrupted stream is cancelled at the worker


async def serve_interactive(cfg: FrontendConfig, registry: ModelRegistry, stop: asyncio.Event) -> None:
    """Run discovery and the terminal chat until the user quits or `stop` is set (SIGTERM).

    Owns the registry's watch task and the chat task; SIGINT is taken over for the chat's own use
    and given back to `stop` afterwards."""
    loop = asyncio.get_running_loop()
    session = ChatSession(
        registry,
        model_name=cfg.model_name,
        max_tokens=cfg.interactive_max_tokens,
        system_prompt=cfg.interactive_system_prompt,
    )
    reader = LineReader(sys.stdin.fileno())
    watcher = loop.create_task(registry.run(), name="model-registry")
    chat = loop.create_task(session.run(reader), name="interactive-chat")

    def on_sigint() -> None:
        if not session.interrupt():
            chat.cancel()  # Ctrl-C at the prompt (or while waiting for a model) quits

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    stop_wait = loop.create_task(stop.wait())
    try:
        await asyncio.wait({chat, watcher, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done():
            watcher.result()  # discovery failed: surface the error
        if chat.done() and not chat.cancelled():
            chat.result()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, stop.set)
        for task in (chat, watcher, stop_wait):
            task.cancel()
        for task in (chat, watcher, stop_wait):
            with contextlib.suppress(asyncio.CancelledError):
                await task
