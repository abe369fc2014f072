"""Generate the bundled tiny model files under `turbine/models/tiny/`.

The tiny model is tokenizer files and configs only (no weights): enough for the frontend to template,
tokenize and detokenize, and for mock workers to "serve" it, without any download.

Run once and commit the output:

    .venv/bin/python scripts/make_tiny_model.py            # writes turbine/models/tiny/
    .venv/bin/python scripts/make_tiny_model.py --out DIR  # writes elsewhere (e.g. to diff)

Deterministic for a given Python and `tokenizers` version: the corpus is the docstrings of the Python
standard library read from its source files (sorted, parsed with `ast`, never imported — importing
`antigravity` opens a browser and `this` prints), and BPE training breaks count ties by pair order.
Both versions are recorded in config.json so a mismatch can be explained.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import platform
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 4096
CONTEXT_LENGTH = 8192

# The plain ChatML template used by Qwen2-family models, without the default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "turbine" / "models" / "tiny"


def _source_files(stdlib: Path) -> Iterator[Path]:
    """Source files of every pure-Python stdlib module, in a fixed order; test suites are skipped."""
    for name in sorted(sys.stdlib_module_names):
        if name in ("test", "idlelib", "lib2to3"):
            # Test suites and IDE code are large and repetitive; they would skew the merges.
            continue
        module = stdlib / f"{name}.py"
        package = stdlib / name
        if module.is_file():
            yield module
        elif (package / "__init__.py").is_file():
            for path in sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package).as_posix()):
                parts = path.relative_to(package).parts
                if not any(part in ("test", "tests") for part in parts):
                    yield path


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError):
        return
    # ast.walk is breadth-first over a deterministic tree, so the order is stable.
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def build_corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [doc for path in _source_files(stdlib) for doc in _docstrings(path)]


def train_tokenizer(corpus: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        # Listed first so they get ids 0, 1, 2 in this order.
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any byte string is encodable even if the corpus never showed it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual = tokenizer.token_to_id(token)
        assert actual == expected_id, f"{token} got id {actual}, expected {expected_id}"
    return tokenizer


def _added_token(content: str) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model(out: Path, tokenizer: Tokenizer, corpus_sha256: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Compact JSON keeps the committed file well under 1 MB; pretty=True would roughly double it.
    tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    eos_id = SPECIAL_TOKENS.index("<|im_end|>")
    pad_id = SPECIAL_TOKENS.index("<|endoftext|>")
    _write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": {str(i): _added_token(tok) for i, tok in enumerate(SPECIAL_TOKENS)},
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "model_max_length": CONTEXT_LENGTH,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(
        out / "config.json",
        {
            "model_type": "turbine-tiny",
            "architectures": [],
            "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
            "max_position_embeddings": CONTEXT_LENGTH,
            "bos_token_id": None,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            # Not read by anything; says how to reproduce tokenizer.json byte for byte.
            "turbine_generator": {
                "script": "scripts/make_tiny_model.py",
                "python": platform.python_version(),
                "tokenizers": tokenizers.__version__,
                "corpus_sha256": corpus_sha256,
            },
        },
    )
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": pad_id},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    corpus = build_corpus()
    digest = hashlib.sha256("\0".join(corpus).encode("utf-8")).hexdigest()
    tokenizer = train_tokenizer(corpus)
    write_model(args.out, tokenizer, digest)
    size = sum(len(doc) for doc in corpus)
    print(f"corpus: {len(corpus)} docstrings, {size} chars, sha256 {digest[:16]}…")
    print(f"vocab: {tokenizer.get_vocab_size(with_added_tokens=True)} → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
