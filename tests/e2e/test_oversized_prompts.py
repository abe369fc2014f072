"""Oversized prompts do not grow the frontend: many multi-megabyte prompts, each refused with 400
for exceeding the context, leave its resident memory where it was. One model's tokenizer gives a
lower bound on tokens per byte (refused before tokenizing); the other's does not (an NFC normalizer),
so its prompts are tokenized in full and the memory that takes must be given back."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import MODEL, Proc, Stack, http, wait_instances
from turbine.models import bundled_model_path

pytestmark = pytest.mark.e2e

UNBOUNDED = "tiny-nfc"
EMBED = "tiny-embed"
JSON = {"Content-Type": "application/json"}


def _rss_mb(proc: Proc) -> float:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _prompt(rng: random.Random, chars: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "café", "日本"]
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(words) + str(rng.randint(0, 999))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, str]]:
    root = tmp_path_factory.mktemp("oversized")
    nfc = root / "nfc-model"
    shutil.copytree(bundled_model_path(), nfc)
    spec = json.loads((nfc / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFC"}
    (nfc / "tokenizer.json").write_text(json.dumps(spec))
    stack = Stack(root)
    try:
        proc, url = stack.frontend("--enable-anthropic-api")
        stack.worker("--engine", "mocker", "--speedup-ratio", "1000")
        stack.worker("--engine", "echo", "--model-name", UNBOUNDED, "--model-path", str(nfc))
        stack.worker("--engine", "echo", "--model-name", EMBED, "--model-type", "embedding")
        for model in (MODEL, UNBOUNDED, EMBED):
            wait_instances(url, 1, model=model)
        yield proc, url
    finally:
        stack.stop()


def _refused(url: str, path: str, body: dict[str, object]) -> float:
    started = time.monotonic()
    status, _, raw = http("POST", url + path, json.dumps(body).encode(), JSON, timeout=120)
    assert status == 400, raw[:300]
    assert b"context" in raw
    return time.monotonic() - started


def test_many_oversized_prompts_leave_memory_bounded(served: tuple[Proc, str]) -> None:
    proc, url = served
    rng = random.Random(7)
    # Warm up every path once (imports, first allocations), then take the baseline.
    _refused(url, "/v1/completions", {"model": MODEL, "prompt": _prompt(rng, 300_000)})
    _refused(url, "/v1/completions", {"model": UNBOUNDED, "prompt": _prompt(rng, 100_000)})
    baseline = _rss_mb(proc)
    seconds = []
    big = _prompt(rng, 6_000_000)
    for i in range(8):
        text = f"request {i}: {big}"
        if i % 2:
            body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
            seconds.append(_refused(url, "/v1/chat/completions", body))
        else:
            seconds.append(
                _refused(url, "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 4})
            )
    messages = [{"role": "user", "content": big}]
    seconds.append(_refused(url, "/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": messages}))
    seconds.append(_refused(url, "/v1/embeddings", {"model": EMBED, "input": ["short", big]}))
    # Refused on their size alone: no multi-second tokenization each.
    assert max(seconds) < 2.0, seconds
    peak = _rss_mb(proc)
    # Tokenized in full: about 100 MB of tokenizer memory each at the peak, which must be returned.
    for _ in range(3):
        _refused(url, "/v1/completions", {"model": UNBOUNDED, "prompt": _prompt(rng, 700_000)})
        peak = max(peak, _rss_mb(proc))
    final = _rss_mb(proc)
    assert final < baseline + 60, (baseline, peak, final)
