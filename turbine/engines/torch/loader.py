"""Read a Hugging Face model directory's safetensors into tensors of the compute dtype.

Sharded checkpoints (`model.safetensors.index.json` + shards) and single files both work; tensors are
converted one at a time, so peak memory stays near the model's size in the compute dtype. A progress
bar on stderr counts tensors while they load (the slow part on a cold disk or a large model).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from turbine.errors import ConfigError

log = logging.getLogger(__name__)


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{index} could not be read: {exc}") from None
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir} has no *.safetensors weights (the torch engine reads safetensors)")
    return files


def load_weights(model_dir: Path, dtype: torch.dtype, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, as `dtype` on the CPU, keyed by its checkpoint name."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = weight_files(model_dir)
    handles: list[Any] = []  # safetensors' handles are untyped
    total = 0
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{path} is missing (listed by the checkpoint's index)")
        handle: Any = safe_open(str(path), framework="pt")
        handles.append(handle)
        total += len(list(handle.keys()))
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(
        total=total,
        desc=f"Loading {model_dir.name}",
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for handle in handles:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                out[name] = handle.get_tensor(name).to(dtype)
                bar.update(1)
    return out
