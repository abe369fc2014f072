"""--exp-python-factory: a model's requests go through a Python engine built by the given factory."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from tests.e2e.conftest import MODEL, Stack, wait_instances

pytestmark = pytest.mark.e2e


def test_factory_engine_serves_the_model(stack: Stack) -> None:
    _, url = stack.frontend("--exp-python-factory", "examples.reverse_words:make_engine")
    stack.worker("--engine", "mocker", "--speedup-ratio", "100")  # announces the model
    wait_instances(url, 1)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = oai.completions.create(model=MODEL, prompt="one two three four", max_tokens=50)
    assert out.choices[0].text == "four three two one"
    assert out.choices[0].finish_reason == "stop"
    chunks = list(oai.completions.create(model=MODEL, prompt="alpha beta gamma", max_tokens=50, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "gamma beta alpha"
    short = oai.completions.create(model=MODEL, prompt="a b c d e f g h", max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage is not None
    assert short.usage.completion_tokens == 3


@pytest.mark.parametrize("spec", ["nocolon", "examples.nope:make", "examples.reverse_words:missing"])
def test_bad_factory_fails_fast(spec: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "turbine", "frontend", "--exp-python-factory", spec, "--http-port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "--exp-python-factory" in result.stderr and "Traceback" not in result.stderr
