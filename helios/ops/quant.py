"""Weight-only quantization for CPU serving: int8 (per output channel) and int4 (groups of 32, scale + minimum).

Weights are quantized once at load; activations stay float32 and the kernels (helios._C int8_linear /
int4_linear) dequantize tiles on the fly. At decode batch sizes a linear's cost is reading its weights, so int8
reads 1/4 and int4 ~1/6 of the float32 bytes. The dequantize_* functions are the oracle: a quantized linear must
equal F.linear with the dequantized weight up to float32 summation order.

int4 is the Q4_1 scheme of llama.cpp: per group of 32 input features, scale = (max - min) / 15, q = round((w - min)
/ scale) in 0..15, w ≈ q * scale + min. Bytes: group g's 32 values in 16 bytes, byte i = q[i] | q[16 + i] << 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP = 32
TILE_ROWS = 4  # output rows interleaved per tile (csrc/cpu/quant_ops.cpp: one tile is one sequential stream)


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, got {quantization!r}")


def _pad(weight: torch.Tensor, k_align: int) -> torch.Tensor:
    """float32 [N, K] zero-padded to whole tiles of rows and to a multiple of k_align columns."""
    n, k = weight.shape
    return F.pad(weight.float(), (0, -k % k_align, 0, -n % TILE_ROWS))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int8 [tiles, K/8, 4, 8], scale float32 [tiles * 4]): symmetric per row, w ≈ q * scale."""
    w = _pad(weight, 8)
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp_(-127, 127).to(torch.int8)
    n, k = q.shape
    tiled = q.reshape(n // TILE_ROWS, TILE_ROWS, k // 8, 8).transpose(1, 2)
    return tiled.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 [tiles * 4, K] weight (padding included) that int8_linear multiplies by."""
    tiles, kb = q.shape[:2]
    rows = q.transpose(1, 2).reshape(tiles * TILE_ROWS, kb * 8)
    return rows.float() * scale[:, None]


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q uint8 [tiles, K/32, 4, 16], scale and minimum float32 [tiles, K/32, 4])."""
    w = _pad(weight, INT4_GROUP)
    n, k = w.shape
    groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
    minimum = groups.amin(dim=-1)
    scale = (groups.amax(dim=-1) - minimum) / 15
    q = torch.round((groups - minimum[..., None]) / torch.where(scale > 0, scale, 1)[..., None]).clamp_(0, 15)
    q = q.to(torch.uint8)
    half = INT4_GROUP // 2
    packed = q[..., :half] | (q[..., half:] << 4)  # [N, groups, 16]

    def tiled(t: torch.Tensor) -> torch.Tensor:  # [N, groups, ...] -> [tiles, groups, 4, ...]
        return t.reshape(n // TILE_ROWS, TILE_ROWS, *t.shape[1:]).transpose(1, 2).contiguous()

    return tiled(packed), tiled(scale), tiled(minimum)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    tiles, groups = packed.shape[:2]
    rows = packed.transpose(1, 2).reshape(tiles * TILE_ROWS, groups, INT4_GROUP // 2)
    q = torch.cat([rows & 0x0F, rows >> 4], dim=-1).float()
    s = scale.transpose(1, 2).reshape(tiles * TILE_ROWS, groups, 1)
    m = minimum.transpose(1, 2).reshape(tiles * TILE_ROWS, groups, 1)
    return (q * s + m).reshape(tiles * TILE_ROWS, groups * INT4_GROUP)


class QuantizedLinear:
    """y = x·Wᵀ + b with W held as int8 or int4; the same interface as helios.ops.linear.Linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quantization: str):
        check_quantization(quantization)
        if quantization is None:
            raise ValueError("QuantizedLinear needs quantization='int8' or 'int4'")
        if weight.device.type != "cpu":
            raise ValueError(f"quantized linears run on CPU only, not on {weight.device.type}")
        self.quantization = quantization
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = None if bias is None else bias.float().contiguous()
        self.packed = None  # (Linear's oneDNN handle; a quantized weight is never oneDNN-packed)
        self.weight = None
        self.parts = quantize_int8(weight) if quantization == "int8" else quantize_int4(weight)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts)

    def dequantized(self) -> torch.Tensor:
        """The float32 [out_features, in_features] weight this linear multiplies by (the oracle's weight)."""
        full = dequantize_int8(*self.parts) if self.quantization == "int8" else dequantize_int4(*self.parts)
        return full[:self.out_features, :self.in_features]

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        x32 = x.float()
        res = None if residual is None else residual.float()
        if self.quantization == "int8":
            y = torch.ops.helios.int8_linear(x32, *self.parts, self.out_features, self.bias, res)
        else:
            y = torch.ops.helios.int4_linear(x32, *self.parts, self.out_features, self.bias, res)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._run(x, residual)


def quantized_linear_reference(x: torch.Tensor, linear: QuantizedLinear) -> torch.Tensor:
    """The oracle: F.linear in float64 with the dequantized weight."""
    bias = None if linear.bias is None else linear.bias.double()
    return F.linear(x.double(), linear.dequantized().double(), bias)
