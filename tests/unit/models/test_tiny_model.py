"""The bundled tiny model: files present and consistent, and reproducible by its generator script."""

from __future__ import annotations

import importlib.util
import json
import platform
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tokenizers
from tokenizers import Tokenizer

from turbine.models import bundled_model_path

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "make_tiny_model.py"
FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json")


def _json(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bundled_model_path() / name).read_text(encoding="utf-8"))
    return data


def _tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(bundled_model_path() / "tokenizer.json"))


def test_bundled_path_holds_the_model_files() -> None:
    path = bundled_model_path()
    assert path.is_dir()
    assert path.name == "tiny"
    for name in FILES:
        assert (path / name).is_file(), name
    # Small enough to commit and ship in the wheel.
    assert (path / "tokenizer.json").stat().st_size < 1_000_000


def test_special_tokens_have_fixed_ids() -> None:
    tok = _tokenizer()
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2
    assert all(added.special for added in tok.get_added_tokens_decoder().values())


def test_configs_agree_with_the_tokenizer() -> None:
    tok = _tokenizer()
    config = _json("config.json")
    tokenizer_config = _json("tokenizer_config.json")
    generation = _json("generation_config.json")
    assert config["model_type"] == "turbine-tiny"
    assert config["vocab_size"] == tok.get_vocab_size(with_added_tokens=True) == 4096
    assert config["max_position_embeddings"] == tokenizer_config["model_max_length"] == 8192
    assert config["bos_token_id"] is None
    assert config["eos_token_id"] == generation["eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert tokenizer_config["bos_token"] is None
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["pad_token"] == "<|endoftext|>"
    assert {k: v["content"] for k, v in tokenizer_config["added_tokens_decoder"].items()} == {
        "0": "<|endoftext|>",
        "1": "<|im_start|>",
        "2": "<|im_end|>",
    }
    assert "<|im_start|>" in tokenizer_config["chat_template"]


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x\n",
        "emoji 🎉🧪 and CJK 日本語 and Arabic مرحبا",
        "\x00\x01\x7f control \ufffd replacement",
        "  leading and trailing spaces  ",
    ],
)
def test_any_text_round_trips(text: str) -> None:
    tok = _tokenizer()
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_every_byte_has_a_token() -> None:
    # The initial alphabet covers all 256 bytes, so no input can hit an unknown token.
    vocab = _tokenizer().get_vocab()
    assert all(symbol in vocab for symbol in tokenizers.pre_tokenizers.ByteLevel.alphabet())


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tiny_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # trains the tokenizer again
def test_generator_reproduces_the_committed_files(tmp_path: Path) -> None:
    generator = _json("config.json")["turbine_generator"]
    if (generator["python"], generator["tokenizers"]) != (platform.python_version(), tokenizers.__version__):
        pytest.skip("the corpus and the trainer are only reproducible with the recorded versions")
    script = _load_script()
    assert script.main(["--out", str(tmp_path)]) == 0
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (bundled_model_path() / name).read_bytes(), name
