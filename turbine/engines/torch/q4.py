"""A GGUF file's Q4_0 / Q4_1 / Q4_K weights, kept 4-bit for the CPU's small steps.

A CPU decode step of a few rows is bound by the weight bytes it reads. SmolLM2-135M's layers are
212 MB in bfloat16 but 66 MB as the file's 4-bit blocks, and torch's CPU int4 kernel reads the
blocks as they are, so a decode step of one to eight rows is faster on them in the real forward
(`benchmarks/results/engine_cpu.md`). Beyond that the kernel is compute-bound and loses, and a prefill
would be many times slower. So the engine keeps both: the dequantized weights (the model as converted)
for large steps, and these blocks for steps of at most `--q4-max-rows` rows. Where Turbine's CPU
kernels run (`cpu_kernels.py`: AMX), steps of 4 or more of those rows use its exact AMX kernel on the
same blocks instead, which is not compute-bound there.

Format facts (ggml): a block is 32 consecutive weights of a row. Q4_0 stores an fp16 `d`, then 16
bytes whose low nibbles are weights 0-15 and high nibbles weights 16-31: w = d·(q − 8). Q4_1 stores
`d`, an fp16 minimum `m`, then the same 16 bytes: w = d·q + m. Q4_K (the 4-bit tensors of the
common Q4_K_M files) groups 8 sub-blocks of 32 into a 144-byte super-block: fp16 `d` and `dmin`,
12 bytes of 6-bit sub-block scales `sc` and mins `mn`, then 4 runs of 32 bytes whose low nibbles
are one sub-block and high nibbles the next: w = d·sc·q − dmin·mn. torch's kernel computes
w = (q − 8)·scale + zero per group of 32 along the input, so scale = d and zero = 0 (Q4_0),
m + 8d (Q4_1), or scale = d·sc and zero = 8·d·sc − dmin·mn (Q4_K). Scale and zero are held in the
compute dtype (bfloat16, see `applies`), so they are rounded as the dequantized weights are. A Q4_K_M
file mixes Q4_K with Q6_K tensors; a fused matmul (q/k/v, gate/up) gets the 4-bit path only when
all its parts are 4-bit.

`gguf.py` writes the blocks of every Q4 linear weight beside the converted model, in `SIDECAR`
(outside the checkpoint's `*.safetensors`, so other readers of the directory never see them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

GROUP = 32
SIDECAR = Path("q4") / "blocks.safetensors"
KINDS = ("Q4_0", "Q4_1", "Q4_K")

Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""nibbles uint8 [rows, cols/32, 16] in Q4_0's layout (byte i: weight i low, weight i + 16 high),
scale and zero float32 [rows, cols/32]."""


def decode(raw: np.ndarray, kind: str, rows: int, cols: int) -> Blocks:
    """The blocks of a `[rows, cols]` weight from its GGUF bytes (`kind` in `KINDS`)."""
    if kind == "Q4_K":
        return _decode_q4_k(raw, rows, cols)
    size = 18 if kind == "Q4_0" else 20
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_0":
        zero = np.zeros_like(d)
    else:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d
    nibbles = torch.from_numpy(blocks[..., size - 16 :].copy())
    return nibbles, torch.from_numpy(d), torch.from_numpy(zero)


def _decode_q4_k(raw: np.ndarray, rows: int, cols: int) -> Blocks:
    supers = np.ascontiguousarray(raw).reshape(rows, cols // 256, 144)
    d = supers[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = supers[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = supers[..., 4:16].astype(np.uint16)
    lo, mid, hi = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    # Sub-blocks 0-3 keep their 6 bits in bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take
    # their low 4 bits from bytes 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7.
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1).astype(np.float32)
    mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=-1).astype(np.float32)
    scale = (d[..., None] * sc).reshape(rows, cols // GROUP)
    zero = (8 * d[..., None] * sc - dmin[..., None] * mn).reshape(rows, cols // GROUP)
    qs = supers[..., 16:].reshape(rows, cols // 256, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(rows, cols // GROUP, GROUP)
    # Into this module's layout, that of Q4_0/Q4_1: byte i holds weights i (low) and i + 16 (high).
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    return torch.from_numpy(nibbles.copy()), torch.from_numpy(scale), torch.from_numpy(zero)


def unpack(nibbles: torch.Tensor) -> torch.Tensor:
    """The weights' 4-bit values 0..15, int32 [rows, cols], in column order."""
    rows, groups, _ = nibbles.shape
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1)  # weights 0-15, then 16-31, of each block
    return q.view(rows, groups * GROUP).to(torch.int32)


def dequantize(blocks: Blocks) -> torch.Tensor:
    """float32 [rows, cols]: what the int4 kernel multiplies by (for tests and checks)."""
    nibbles, scale, zero = blocks
    q = unpack(nibbles).float().view(*scale.shape, GROUP)
    return ((q - 8) * scale[..., None] + zero[..., None]).view(q.shape[0], -1)


def concat(parts: list[Blocks]) -> Blocks:
    """The blocks of weights stacked along their rows (q/k/v into qkv, gate/up into gate_up)."""
    return (
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]),
    )


def applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on `device` computing in `dtype` gains from the blocks: on CPU in bfloat16.
    In float32 the kernel is several times slower than the plain matmul, so float32 keeps the
    dequantized weights."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    )


class Q4Matmul(Protocol):
    """A 4-bit weight ready for a kernel: `w(x)` is `x @ W.T` for 2-D `x`."""

    @property
    def nbytes(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


Q4Kernel = Callable[[Blocks, torch.dtype], Q4Matmul]
"""Packs blocks for one kernel: `Q4Weight` (torch's) or `cpu_kernels.VnniQ4Weight` (Turbine's)."""


class Q4Weight:
    """A 4-bit weight in the int4 kernel's layout; `w(x)` is `x @ W.T` for 2-D `x` of `dtype`."""

    __slots__ = ("nbytes", "packed", "scales_zeros")

    def __init__(self, blocks: Blocks, dtype: torch.dtype) -> None:
        nibbles, scale, zero = blocks
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(nibbles), 1)
        # The kernel wants [groups, rows, 2]: each group's (scale, zero) for every output row.
        self.scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        self.nbytes = self.packed.nbytes + self.scales_zeros.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, GROUP, self.scales_zeros
        )
        return out


def save(blocks: dict[str, Blocks], model_dir: Path) -> None:
    """Write `blocks` (by checkpoint weight name) to the model directory's sidecar file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, (nibbles, scale, zero) in blocks.items():
        tensors[name + ".nibbles"] = nibbles
        tensors[name + ".scale"] = scale
        tensors[name + ".zero"] = zero
    path = model_dir / SIDECAR
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def load(model_dir: Path) -> dict[str, Blocks]:
    """The sidecar's blocks by weight name; empty when the model has none."""
    path = model_dir / SIDECAR
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    names = {key.rsplit(".", 1)[0] for key in tensors}
    return {n: (tensors[n + ".nibbles"], tensors[n + ".scale"], tensors[n + ".zero"]) for n in names}
