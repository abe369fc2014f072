"""Linear layers, with the weight pre-packed for the CPU's GEMM library where that pays off.

On a CPU with native bfloat16, oneDNN's matmul on a weight reordered once, at load, into its own
blocked layout runs faster than `F.linear` on the plain `[out, in]` tensor for a decode step's few
rows (`benchmarks/results/README.md`), and the results are bit-identical. A decode step of a small
model is mostly these
matmuls, so the gain reaches the tokens/s almost whole.

float32 keeps `F.linear`. MKL's packed float32 GEMM is tied to one batch size and falls back to the
plain weight for any other, and float32 is the dtype the tests compare with `transformers` token for
token. CUDA keeps `F.linear` (cuBLAS needs no packing).

A weight that came from a GGUF file's 4-bit blocks can also carry them (`q4.py`): inputs of few rows
then go through the int4 kernel, which reads a quarter of the bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from turbine.engines.torch.q4 import Q4Matmul


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `Linear` pre-packs weights of this dtype on this device."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class Linear:
    """`y = x @ weight.T + bias` for 2-D `x`, with the weight in the fastest layout for its device."""

    __slots__ = ("_bias", "_nbytes", "_packed", "_q4", "_q4_rows", "weight")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        pack: bool = False,
        q4: Q4Matmul | None = None,
        q4_max_rows: int = 0,
    ) -> None:
        """`q4`: the same weight as 4-bit blocks, used for inputs of at most `q4_max_rows` rows."""
        self._bias = bias
        self._q4 = q4
        self._q4_rows = q4_max_rows if q4 is not None else 0
        self._nbytes = weight.numel() * weight.element_size() + (
            0 if bias is None else bias.numel() * bias.element_size()
        )
        self._packed: torch.Tensor | None = None
        self.weight: torch.Tensor | None = weight
        if pack:
            # The batch size is only a hint for the layout; any number of rows works afterwards.
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
            self.weight = None  # the packed copy replaces it: no second copy of the weights in memory

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q4 = self._q4
        if q4 is not None and x.shape[0] <= self._q4_rows:
            y = q4(x)
            return y if self._bias is None else y + self._bias
        if self._packed is not None:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self._packed, self._bias, "none", [], ""
            )
            return out
        assert self.weight is not None
        return F.linear(x, self.weight, self._bias)

    @property
    def nbytes(self) -> int:
        """Bytes of the weight and bias as loaded (what a forward reads)."""
        return self._nbytes

    @property
    def q4_nbytes(self) -> int:
        """Bytes of the 4-bit copy, if any."""
        return 0 if self._q4 is None else self._q4.nbytes
