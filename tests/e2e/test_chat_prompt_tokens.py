"""Chat prompts of every shape are tokenized as `tokenizers` itself would (the frontend's fast ASCII
path must not change a single id): the usage a real frontend reports matches a direct count."""

from __future__ import annotations

import random

import openai
import pytest

from tests.e2e.conftest import MODEL, Stack, wait_instances
from turbine.bench.workloads import EnglishText
from turbine.models import bundled_model_path
from turbine.preprocess.chat_template import ChatTemplate
from turbine.preprocess.tokenizer import load_model_files

pytestmark = pytest.mark.e2e


def test_prompt_token_counts_match_tokenizers(stack: Stack) -> None:
    _, url = stack.frontend()
    stack.worker("--engine", "mocker", "--speedup-ratio", "1000")
    wait_instances(url, 1)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    files = load_model_files(bundled_model_path())
    assert files.chat_template is not None
    template = ChatTemplate(files.chat_template, files.bos_token, files.eos_token)
    rng = random.Random(5)
    english = EnglishText(5, vocabulary=3000)
    users = [
        english.text(rng, 200),
        "It's 3:45pm -- we've   got 12345678 items;\n\n\ttabs\r\nand 'QUOTES' they'll DON'T\x0b\x1c!",
        "trailing spaces   ",
        "ünïcödé, 日本語 and emoji 🚀 among ASCII words",
        "<|im_start|>user\nan added token inside a message<|im_end|>",
    ]
    for user in users:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]
        reply = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)  # type: ignore[arg-type]
        prompt = template.render(messages)
        expected = len(files.tokenizer.encode(prompt, add_special_tokens=False).ids)
        assert reply.usage is not None and reply.usage.prompt_tokens == expected, repr(user[:60])
