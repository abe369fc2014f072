"""CompileWatch: compiles during a warm-up are expected; after it, each is a logged warning."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from turbine.engines.torch.compile_watch import CompileWatch


def test_compiles_after_the_warm_up_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    watch = CompileWatch()
    watch.record("before any warm-up")
    with watch.warming_up():
        watch.record("a warm-up compile")
    assert (watch.compiles, watch.late) == (2, 0)
    with caplog.at_level(logging.WARNING, logger="turbine.engines.torch.compile_watch"):
        watch.record("Triton kernel _k")
    assert (watch.compiles, watch.late) == (3, 1)
    assert "compiled Triton kernel _k while serving" in caplog.text
    # A second engine of the process warming up: its compiles are expected again.
    with watch.warming_up():
        watch.record("the second engine's graphs")
    assert watch.late == 1


def test_the_triton_hook_is_chained_and_restored() -> None:
    knobs = pytest.importorskip("triton").knobs
    seen: list[Any] = []
    before = knobs.runtime.jit_post_compile_hook

    def previous(*args: Any, **kwargs: Any) -> None:
        seen.append(kwargs.get("repr"))

    knobs.runtime.jit_post_compile_hook = previous
    try:
        watch = CompileWatch()
        watch.open()
        hook = knobs.runtime.jit_post_compile_hook
        assert hook is not previous
        hook(
            key=None, repr="_kernel[...]", fn=None, compile={}, is_manual_warmup=False, already_compiled=False
        )
        assert watch.compiles == 1 and seen == ["_kernel[...]"]
        watch.close()
        assert knobs.runtime.jit_post_compile_hook is previous
    finally:
        knobs.runtime.jit_post_compile_hook = before
