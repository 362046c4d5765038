"""Linear layers: oneDNN pre-packed weights on CPU (when the CPU supports the dtype), F.linear elsewhere."""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


@functools.cache
def onednn_linear_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can run pre-packed linears of this dtype here (a tiny probe against F.linear).

    fp32 works on any x86 CPU; bf16/fp16 need AVX512 or AVX-NE-CONVERT. HELIOS_ONEDNN=0 turns it off.
    """
    if os.environ.get("HELIOS_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=generator).to(dtype)
        x = torch.randn(3, 40, generator=generator).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return torch.allclose(got.float(), F.linear(x, weight).float(), atol=1e-2, rtol=1e-2)


class Linear:
    """y = x·Wᵀ + b. On CPU the weight is packed once for oneDNN (as torch.compile's CPU freezing does):
    1.2-3x faster than MKL's sgemm at decode batch sizes (M <= 32), within 10% for prefill; F.linear elsewhere.

    plain=True keeps the float32 weight in its [out, in] layout for helios' own kernel (helios._C linear: decode
    batches through the register-blocked kernel the fused decode stack also runs, prefill through at::linear), so
    a model served by the stack holds one copy of each weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, batch_hint: int = 16,
                 plain: bool = False):
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.packed = None
        self.weight = weight
        self.plain = plain and plain_linear_supported(weight)
        if self.plain:
            self.weight = weight.contiguous()
        elif weight.device.type == "cpu" and onednn_linear_supported(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
            self.weight = None  # the packed copy replaces it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.plain and x.dtype == torch.float32:
            return torch.ops.helios.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ + b + residual; on CPU the residual add is fused into the matmul (one op, no temporary)."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        if self.plain and x.dtype == torch.float32 and residual.dtype == torch.float32:
            return torch.ops.helios.linear(x, self.weight, self.bias, residual)
        return torch.add(F.linear(x, self.weight, self.bias), residual)


def plain_linear_supported(weight: torch.Tensor) -> bool:
    """Whether helios._C's float32 linear can serve this weight (CPU float32, extension built)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    from helios._ext import extension_available

    return extension_available()
