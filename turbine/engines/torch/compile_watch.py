"""Kernel compiles and CUDA-graph captures after start-up, made visible.

A worker compiles its Triton kernels and captures its decode graphs during the start-up warm-up
(`TorchExecutor.warm_up`); a compile on the request path stalls every request of the step for as
long as it takes (tens to hundreds of milliseconds). `CompileWatch` counts both kinds of event; once
the worker is serving, each one is logged as a warning naming what was compiled, so a shape the
warm-up missed shows in the log instead of as an unexplained latency spike.

Triton reports compiles through one process-wide hook (`triton.knobs.runtime.jit_post_compile_hook`):
the watch installs itself there while it is open and puts back what was there before when closed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class CompileWatch:
    """Owned by one loaded model (one per process); thread-safe (the runner thread compiles)."""

    def __init__(self) -> None:
        self.compiles = 0
        """Compiles and captures seen in all."""
        self.late = 0
        """Those seen after `serving()`."""
        self._served = False
        self._warming = 0
        self._lock = threading.Lock()
        self._previous: Any = None
        self._installed = False

    def open(self) -> None:
        """Start counting Triton compiles (a no-op where Triton is not installed)."""
        try:
            from triton import knobs
        except ImportError:
            return
        self._previous = knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_post_compile_hook = self._on_triton_compile
        self._installed = True

    def close(self) -> None:
        if not self._installed:
            return
        from triton import knobs

        if knobs.runtime.jit_post_compile_hook == self._on_triton_compile:
            knobs.runtime.jit_post_compile_hook = self._previous
        self._installed = False

    @contextlib.contextmanager
    def warming_up(self) -> Iterator[None]:
        """Compiles inside are expected. Once the first warm-up is over, a compile while none is in
        progress (engines of one process warm up one after another) is a warning."""
        with self._lock:
            self._warming += 1
        try:
            yield
        finally:
            with self._lock:
                self._warming -= 1
                self._served = True

    def record(self, what: str) -> None:
        with self._lock:
            self.compiles += 1
            late = self._served and self._warming == 0
            if late:
                self.late += 1
        if late:
            log.warning("compiled %s while serving: the start-up warm-up did not cover this shape", what)

    def _on_triton_compile(self, *args: Any, **kwargs: Any) -> bool | None:
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or str(kwargs.get("repr", "a Triton kernel"))
        self.record(f"Triton kernel {name}")
        if callable(self._previous):
            result: bool | None = self._previous(*args, **kwargs)
            return result
        return None
