"""load_model_files (HF directory layout quirks → values or ConfigError) and the Tokenizer wrapper."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest
from tokenizers import processors

from turbine.errors import ConfigError
from turbine.models import bundled_model_path
from turbine.preprocess.tokenizer import DEFAULT_CONTEXT_LENGTH, Tokenizer, load_model_files

pytestmark = pytest.mark.unit

P = ParamSpec("P")
T = TypeVar("T")


def _model_dir(tmp_path: Path, **files: Any) -> Path:
    """A model directory with the bundled tokenizer.json plus the given files (dicts → JSON)."""
    shutil.copy(bundled_model_path() / "tokenizer.json", tmp_path / "tokenizer.json")
    for name, content in files.items():
        filename = name.replace("__", ".")
        text = content if isinstance(content, str) else json.dumps(content)
        (tmp_path / filename).write_text(text, encoding="utf-8")
    return tmp_path


def test_bundled_model() -> None:
    files = load_model_files(bundled_model_path())
    assert files.model_dir == bundled_model_path()
    assert files.bos_token is None
    assert files.eos_token == "<|im_end|>"
    assert files.eos_token_ids == (2,)
    assert files.context_length == 8192
    assert files.chat_template is not None and "<|im_start|>" in files.chat_template
    assert files.tokenizer.get_vocab_size() == 4096


def test_missing_tokenizer_json_is_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"tokenizer\.json is missing"):
        load_model_files(tmp_path)


def test_model_path_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        load_model_files(tmp_path / "nope")


def test_corrupt_tokenizer_json_is_config_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_model_files(tmp_path)


def test_malformed_config_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json is not readable JSON"):
        load_model_files(_model_dir(tmp_path, config__json="{oops"))
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_model_files(_model_dir(tmp_path, config__json="[1, 2]"))


def test_only_tokenizer_json(tmp_path: Path) -> None:
    files = load_model_files(_model_dir(tmp_path))
    assert files.chat_template is None
    assert (files.bos_token, files.eos_token, files.eos_token_ids) == (None, None, ())
    assert files.context_length == DEFAULT_CONTEXT_LENGTH


def test_special_tokens_as_added_token_objects(tmp_path: Path) -> None:
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>"},
    }
    files = load_model_files(_model_dir(tmp_path, tokenizer_config__json=config))
    assert (files.bos_token, files.eos_token, files.eos_token_ids) == ("<|endoftext|>", "<|im_end|>", (2,))


def test_bad_special_token_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eos_token must be"):
        load_model_files(_model_dir(tmp_path, tokenizer_config__json={"eos_token": {"id": 2}}))


def test_eos_token_outside_vocabulary_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        load_model_files(_model_dir(tmp_path, tokenizer_config__json={"eos_token": "</s>"}))


def test_eos_ids_are_merged_in_order_without_duplicates(tmp_path: Path) -> None:
    files = load_model_files(
        _model_dir(
            tmp_path,
            tokenizer_config__json={"eos_token": "<|im_end|>"},
            generation_config__json={"eos_token_id": [0, 2]},
            config__json={"eos_token_id": 7},
        )
    )
    assert files.eos_token_ids == (2, 0, 7)


@pytest.mark.parametrize("bad", ["2", [2, "x"], True, {"id": 2}])
def test_bad_eos_token_id_is_config_error(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match="eos_token_id must be"):
        load_model_files(_model_dir(tmp_path, generation_config__json={"eos_token_id": bad}))


def test_chat_template_as_named_list(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    files = load_model_files(_model_dir(tmp_path, tokenizer_config__json={"chat_template": templates}))
    assert files.chat_template == "D"


def test_chat_template_list_without_default_is_config_error(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "T"}]
    with pytest.raises(ConfigError, match="no 'default'"):
        load_model_files(_model_dir(tmp_path, tokenizer_config__json={"chat_template": templates}))


def test_chat_template_of_wrong_type_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chat_template must be"):
        load_model_files(_model_dir(tmp_path, tokenizer_config__json={"chat_template": 3}))


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    files = load_model_files(
        _model_dir(tmp_path, tokenizer_config__json={"chat_template": "config"}, chat_template__jinja="file")
    )
    assert files.chat_template == "file"


def test_chat_template_json_file(tmp_path: Path) -> None:
    files = load_model_files(
        _model_dir(
            tmp_path,
            tokenizer_config__json={"chat_template": "config"},
            chat_template__json={"chat_template": "legacy"},
        )
    )
    assert files.chat_template == "legacy"


@pytest.mark.parametrize(
    ("config", "tokenizer_config", "expected"),
    [
        ({"max_position_embeddings": 32768}, {"model_max_length": 1024}, 32768),
        ({"n_positions": 1024}, {}, 1024),
        ({"text_config": {"max_position_embeddings": 131072}}, {}, 131072),
        ({}, {"model_max_length": 2048}, 2048),
        # transformers' "no limit" sentinel, int(1e30), must not become the context length.
        ({}, {"model_max_length": 1000000000000000019884624838656}, DEFAULT_CONTEXT_LENGTH),
        ({"max_position_embeddings": None}, {}, DEFAULT_CONTEXT_LENGTH),
    ],
)
def test_context_length(
    tmp_path: Path, config: dict[str, Any], tokenizer_config: dict[str, Any], expected: int
) -> None:
    files = load_model_files(
        _model_dir(tmp_path, config__json=config, tokenizer_config__json=tokenizer_config)
    )
    assert files.context_length == expected


def _tokenizer() -> Tokenizer:
    return Tokenizer(load_model_files(bundled_model_path()).tokenizer)


def test_encode_maps_special_token_text_to_ids() -> None:
    tok = _tokenizer()
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 1
    assert 2 in ids
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.decode(ids) == "user\nhi\n"


def test_encode_adds_no_special_tokens() -> None:
    hf = load_model_files(bundled_model_path()).tokenizer
    # A post-processor that would prepend <|endoftext|> if special tokens were added.
    hf.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    assert hf.encode("hello").ids[0] == 0
    assert 0 not in Tokenizer(hf).encode("hello")


def test_encode_batch_matches_encode() -> None:
    tok = _tokenizer()
    texts = ["a", "", "emoji 🎉", "<|im_end|>x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_vocab_and_token_lookup() -> None:
    tok = _tokenizer()
    assert tok.vocab_size == 4096
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.token_to_id("no such token") is None
    assert tok.hf.get_vocab_size() == 4096


class _RecordingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def test_encode_async_inline_for_short_text_executor_for_long() -> None:
    tok = Tokenizer(load_model_files(bundled_model_path()).tokenizer, inline_max_chars=100)
    with _RecordingExecutor() as executor:
        short = "x" * 99
        assert await tok.encode_async(short, executor) == tok.encode(short)
        assert executor.submitted == 0
        long = "wörd " * 20
        assert await tok.encode_async(long, executor) == tok.encode(long)
        assert executor.submitted == 1
        # ASCII text takes the fast path, which holds the GIL: inline up to INLINE_ASCII_FACTOR times.
        ascii_text = "word " * 79
        assert await tok.encode_async(ascii_text, executor) == tok.encode(ascii_text)
        assert executor.submitted == 1
        ascii_text = "word " * 80
        assert await tok.encode_async(ascii_text, executor) == tok.encode(ascii_text)
        assert executor.submitted == 2


async def test_encode_async_default_executor() -> None:
    tok = _tokenizer()
    long = "The quick brown fox. " * 200
    assert len(long) >= Tokenizer.INLINE_MAX_CHARS
    assert await tok.encode_async(long) == tok.encode(long)


def test_piecewise_cache_gives_the_same_ids_and_hits_on_shared_prefixes() -> None:
    import random

    from turbine.models import bundled_model_path
    from turbine.preprocess.tokenizer import Tokenizer as _Tokenizer
    from turbine.preprocess.tokenizer import load_model_files as _load

    hf = _load(bundled_model_path()).tokenizer
    plain = _Tokenizer(hf)
    cached = _Tokenizer(hf, cache_entries=4)
    rng = random.Random(7)
    alphabet = [
        "a",
        "b",
        " ",
        "\n",
        "é",
        "日本",
        "🚀",
        "<|im_start|>",
        "<|im_end|>",
        "word",
        "  x",
        "<|endoftext|>",
    ]
    system = "".join(rng.choice(alphabet[:7]) for _ in range(1500))  # no added tokens inside
    for i in range(30):
        text = (
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
            + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 3000)))
            + f"{i}<|im_end|>\n<|im_start|>assistant\n"
        )
        assert cached.encode(text) == plain.encode(text)
    assert cached.cache_hits >= 29
