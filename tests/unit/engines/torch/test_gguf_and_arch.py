"""GGUF → model directory conversion (checked against transformers' own GGUF loader) and the
architecture checks that refuse what the torch engine cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from turbine.engines.torch import gguf as gguf_module
from turbine.engines.torch.arch import read_arch
from turbine.engines.torch.gguf import _unpermute, convert_gguf, served_name
from turbine.errors import ConfigError

pytestmark = pytest.mark.integration


def test_served_name_drops_the_quantization_suffix() -> None:
    assert served_name(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert served_name(Path("/m/Llama-3.2-1B.F16.gguf")) == "Llama-3.2-1B"
    assert served_name(Path("qwen2.5-0.5b.gguf")) == "qwen2.5-0.5b"


def test_unpermute_inverts_llama_cpp_rope_row_interleave() -> None:
    heads, head_dim, cols = 3, 8, 5
    w = torch.arange(heads * head_dim * cols, dtype=torch.float32).reshape(heads * head_dim, cols)
    # llama.cpp's converter: per head, rows [first half, second half] → interleaved pairs.
    permuted = w.reshape(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(_unpermute(permuted, heads), w)


@pytest.mark.timeout(300)
def test_smollm2_conversion_equals_transformers_gguf_loading(
    smollm2_gguf: Path, smollm2_dir: Path, gguf_cache: Path
) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ours = load_file(str(smollm2_dir / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).state_dict()
    assert len(ours) == 272
    assert all(torch.equal(tensor, hf[name]) for name, tensor in ours.items())
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    template = json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template
    # A second start finds the converted directory instead of converting again.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_module, "_convert", _never_converts)
        assert convert_gguf(smollm2_gguf, gguf_cache, progress=False) == smollm2_dir


def _never_converts(path: Path, out: Path, progress: bool) -> None:
    raise AssertionError(f"{path} converted again")


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        convert_gguf(bogus, tmp_path / "cache", progress=False)


def test_unsupported_architecture_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel is not supported") as info:
        read_arch(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"config\.json is missing"):
        read_arch(tmp_path / "nowhere")


def test_qwen3_and_llama3_scaling_switches(tmp_path: Path) -> None:
    base = {
        "vocab_size": 10,
        "hidden_size": 64,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    (tmp_path / "config.json").write_text(json.dumps({**base, "architectures": ["Qwen3ForCausalLM"]}))
    arch = read_arch(tmp_path)
    assert arch.qk_norm and not arch.attention_bias and arch.num_kv_heads == 4
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = {**base, "architectures": ["LlamaForCausalLM"], "rope_scaling": scaling}
    (tmp_path / "config.json").write_text(json.dumps(config))
    inv = read_arch(tmp_path).inv_freq()
    plain = [1.0 / 10000.0 ** (i / 16) for i in range(0, 16, 2)]
    assert inv[0] == plain[0]  # the highest frequency is kept
    assert inv[-1] == pytest.approx(plain[-1] / 8.0)  # the lowest is slowed by the factor


def test_older_conversions_of_the_same_file_are_pruned(tmp_path: Path) -> None:
    from turbine.engines.torch.gguf import prune_stale

    source = tmp_path / "models" / "Tiny.Q4_1.gguf"
    other = tmp_path / "elsewhere" / "Tiny.Q4_1.gguf"
    root = tmp_path / "cache"

    def conversion(key: str, of: Path | None) -> Path:
        entry = root / f"Tiny-{key}"
        entry.mkdir(parents=True)
        (entry / "model.safetensors").write_bytes(b"x")
        if of is not None:
            (entry / ".turbine-complete").write_text(f"{of}\n")
        return entry

    current = conversion("new", source)
    old = conversion("old", source)
    foreign = conversion("foreign", other)  # another file of the same name: not ours to remove
    unfinished = conversion("partial", None)  # no marker: maybe a conversion in progress
    assert prune_stale(root, current, source) == [old]
    assert not old.exists()
    assert current.is_dir() and foreign.is_dir() and unfinished.is_dir()
